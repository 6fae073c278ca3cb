"""The benchmarks still run: ``./run bench``'s entry point loads, bench_core's requests are
answered as it expects (its pre-flight check fails the run on a wrong status or a missing header),
and bench_login's and bench_abuse's smallest runs complete against a real ``thallus serve``.

Benchmarks report; they never gate on a duration, and neither does this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
