"""The benchmarks still run: ``./run bench``'s entry point loads, bench_core's requests are
answered as it expects (its pre-flight check fails the run on a wrong status or a missing header),
bench_login's, bench_abuse's and bench_revocation's smallest runs complete against a real
``thallus serve``, and bench_service's anchor verifies what it is sent (and, with wrk installed,
its smallest run with the anchor completes).

Benchmarks report; they never gate on a duration, and neither does this test.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.databases import unavailable

ROOT = Path(__file__).resolve().parent.parent


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_entry_point_loads_every_part() -> None:
    result = run("-m", "benchmarks", "--help")
    assert result.returncode == 0, result.stderr
    assert "--parts" in result.stdout
    assert "bench_login.py" in result.stdout
    assert "bench_abuse.py" in result.stdout
    assert "bench_revocation.py" in result.stdout


def test_bench_core_runs_and_checks_its_requests() -> None:
    result = run(
        "benchmarks/bench_core.py",
        *("--seconds", "0.02", "--repeat", "1", "--warmup", "0", "--no-scaling", "--no-breakdown", "--json"),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    scenarios = {row["scenario"]: row for row in document["results"]}
    assert set(scenarios) == {
        "get",
        "get_cors",
        "get_refused",
        "preflight",
        "post_csrf",
        "post_api_key",
        "not_found",
    }
    assert scenarios["preflight"]["thallus"]["status"] == 204
    assert {row["scenario"] for row in document["layers"]} == {"get", "get_cors", "post_csrf", "not_found"}


def test_bench_login_help() -> None:
    result = run("benchmarks/bench_login.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--burst" in result.stdout
    assert "--concurrency" in result.stdout


def test_bench_login_smallest_run(tmp_path: Path) -> None:
    """One real ``thallus serve``: one sequential second of logins, an API-key baseline, a burst of 2.
    Checks only that the set-up works (users, key, forwarded addresses, login CSRF) and that the
    requests are answered as the benchmark expects; no figure is judged."""
    output = tmp_path / "login.json"
    result = run(
        "benchmarks/bench_login.py",
        *("--rounds", "1", "--seconds", "0.5", "--concurrency", "1", "--burst", "2", "--json", str(output)),
    )
    assert result.returncode == 0, result.stderr
    assert "Burst of 2 concurrent" in result.stdout
    document = json.loads(output.read_text())
    [throughput] = document["throughput"]
    assert throughput["valid"], throughput["problems"]
    [burst] = document["bursts"]
    assert set(burst["burst"]["statuses"]) <= {"401", "503"}
    assert burst["burst"]["requests"] == 2
    assert set(burst["api_key_baseline"]["statuses"]) == {"200"}


def test_bench_abuse_smallest_run(tmp_path: Path) -> None:
    """One real ``thallus serve``: 2 MiB bodies (one and four, declared and chunked), then four slow
    sockets of every kind for a couple of seconds with the header and body bounds at 1 s. Checks only
    that the run completes and its JSON has the figures the report is built from; no figure is judged."""
    output = tmp_path / "abuse.json"
    result = run(
        "benchmarks/bench_abuse.py",
        *("--rounds", "1", "--body-mib", "2", "--sockets", "4", "--seconds", "2.5", "--baseline", "0.5"),
        *("--health-rate", "10", "--header-timeout", "1", "--body-timeout", "1", "--json", str(output)),
    )
    assert result.returncode == 0, result.stderr
    assert "Oversized bodies" in result.stdout
    assert "Slow sockets" in result.stdout
    document = json.loads(output.read_text())
    assert {"environment", "source", "options", "bounds", "server", "bodies", "baseline", "attacks", "spread"} <= set(
        document
    )
    assert {(item["count"], item["framing"]) for item in document["bodies"]} == {
        (count, framing) for count in (1, 4) for framing in ("declared", "chunked")
    }
    for item in document["bodies"]:
        assert {"statuses", "answer_ms_max", "rss_before_mib", "peak_mib", "rss_after_mib"} <= set(item)
    assert [item["attack"] for item in document["attacks"]] == ["slowloris", "stalled-body", "held"]
    kinds = {name for item in document["attacks"] for name in item["kinds"]}
    assert kinds == {"slowloris", "stalled-body", "after-answer", "slow-body"}
    for item in document["attacks"]:
        assert {"requests", "p50_ms", "p99_ms", "max_ms"} <= set(item["health"])
        assert {"peak_open", "server_peak_fds"} <= set(item)
        for figures in item["kinds"].values():
            assert {"opened", "closed_by_server", "close_seconds_median", "close_seconds_max", "open_at_end"} <= set(
                figures
            )


def test_bench_revocation_smallest_run(tmp_path: Path) -> None:
    """Both set-ups (PostgreSQL left out, with its reason, when it does not answer): one round of a
    session and an API key revoked through A and followed on B. Checks only that the run completes,
    every revocation was refused by B within the benchmark's timeout, and the JSON has the figures
    the report is built from; no figure is judged."""
    output = tmp_path / "revocation.json"
    result = run("benchmarks/bench_revocation.py", *("--rounds", "1", "--revocations", "2", "--json", str(output)))
    assert result.returncode == 0, result.stderr
    assert "B p50" in result.stdout
    document = json.loads(output.read_text())
    assert {"environment", "source", "options", "setups", "skipped"} <= set(document)
    assert set(document["setups"]) | set(document["skipped"]) == {"postgresql", "sqlite"}
    assert "sqlite" in document["setups"]
    for setup in document["setups"].values():
        assert {"rounds", "pooled", "pooled_kinds", "spread"} <= set(setup)
        [first] = setup["rounds"]
        assert [item["kind"] for item in first["revocations"]] == ["session", "api_key"]
        for item in first["revocations"]:
            assert item["problem"] is None
            assert {"delay_ms", "last_accepted_ms", "polls", "a_next_refused", "a_next_ms", "revoke_ms"} <= set(item)
        assert {"p50_ms", "p99_ms", "max_ms", "a_next_refused"} <= set(setup["pooled"])


def test_the_anchor_verifies_what_it_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_service's anchor (a plain FastAPI app) must do the work it stands for: verify the
    token's signature, algorithm, kid and claims, and look the key up — a 401 otherwise."""
    import jwt
    from starlette.testclient import TestClient

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("BENCH_ANCHOR_SECRET", "s" * 48)
    monkeypatch.setenv("BENCH_ANCHOR_KID", "k1")
    monkeypatch.setenv("BENCH_ANCHOR_API_KEY", "thal_" + "a" * 43)
    for name in ("anchor_service", "bare_service"):
        sys.modules.pop(name, None)
    anchor = importlib.import_module("anchor_service")
    user = anchor.USER["id"]
    now = int(time.time())
    claims = {"sub": user, "sid": "s", "iat": now, "exp": now + 60, "jti": "j"}

    def token(secret: str = "s" * 48, kid: str = "k1", **changes: object) -> dict[str, str]:
        payload = {key: value for key, value in {**claims, **changes}.items() if value is not None}
        return {"Authorization": "Bearer " + jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})}

    with TestClient(anchor.app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/api/v1/users/me", headers=token()).json()["id"] == user
        assert client.get("/api/v1/users/me", headers={"X-API-Key": "thal_" + "a" * 43}).status_code == 200
        refused = [
            token(secret="t" * 48),
            token(kid="k2"),
            token(exp=now - 10),
            token(jti=None),
            {"X-API-Key": "thal_" + "b" * 43},
            {},
        ]
        for headers in refused:
            assert client.get("/api/v1/users/me", headers=headers).status_code == 401, headers


def test_bench_service_smallest_run_with_the_anchor() -> None:
    """The anchor and the three requests of the anchor table on the memory/SQLite server, one second
    each: the run completes, every run is valid and the anchor ratios are there; none is judged."""
    if shutil.which("wrk") is None:
        unavailable("wrk is not installed (apt-get install wrk; .ci/run installs it)")
    scenarios = "health_memory_sqlite,key_memory_sqlite,bearer_memory_sqlite"
    result = run(
        "benchmarks/bench_service.py", *("--seconds", "1", "--warmup", "0", "--scenarios", scenarios, "--json")
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"anchor/health", "anchor/me", "anchor/me_bearer", *scenarios.split(",")} <= set(document["summary"])
    assert all(item["valid"] for item in document["runs"])
    for name in scenarios.split(","):
        assert document["summary"][name]["vs_anchor"]["rps"] is not None
    assert document["source"]["commit"]
