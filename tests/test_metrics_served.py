"""The service's ``/metrics`` (thallus.server.metrics), served by real ``thallus serve`` processes.

* ``--workers 2`` (production profile, SQLite in a data directory of the test's own): two
  keep-alive connections, one on each worker (which worker holds a connection is read from
  ``/proc``), carry a scripted mix — 200s, 404s, a 401, a CSRF refusal, a refused and an allowed
  preflight, a 413, a registration, a sign-in, two failures that lock the address (threshold 2),
  a locked attempt, a login-CSRF refusal. Scrapes are polled (each worker publishes its snapshot
  every second) until the sum over both workers is exactly the mix, then every family is checked
  exactly, the audit writer's against the database itself. A worker is then killed: its counters
  stay in the sum (counters never go down), its gauges leave it.
* access: ``loopback`` answers a loopback peer whatever ``X-Forwarded-For`` says and refuses any
  other peer (a server on 0.0.0.0, read through this host's non-loopback address); ``token`` wants
  its bearer token (401 without, 403 with a wrong one); ``off`` has no ``/metrics`` at all (404).

In process: the workers' snapshot files (0600 in 0700 directories; a dead worker's gauges left
out, its counters kept; other runs' files deleted) and the settings' refusal of a short token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import Server, running_server
from tests.test_revocation_served import Endpoint
from thallus.csrf import REJECT_UNTRUSTED_ORIGIN
from thallus.metrics import Metrics, merge, render_snapshot
from thallus.server.metrics import WorkerSnapshots, run_id
from thallus.server.settings import ServiceSettings
from thallus.settings import ConfigurationError

PUBLIC = "https://api.example.com"
SPA = "https://app.example.com"
EVIL = "https://evil.example"
PASSWORD = "Correct-Horse-Battery-9!"
EMAIL = "ada@example.com"
TOKEN = "metrics-served-token-" + "m" * 27
GENEROUS = "1000000/minute"
MAX_BODY = 1024
#: How long the sum may take to reach the expected figures: snapshots are a second apart.
DEADLINE = 30.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The production profile, cheap Argon2, limits nothing reaches, a lock after two failures."""
    return {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "metrics-served-secret-" + "s" * 26,
        "THALLUS_ALLOWED_ORIGINS": SPA,
        "THALLUS_PUBLIC_ORIGIN": PUBLIC,
        "THALLUS_RATE_LIMIT": GENEROUS,
        "THALLUS_RATE_LIMIT_AUTH": GENEROUS,
        "THALLUS_ARGON2_TIME_COST": "1",
        "THALLUS_ARGON2_MEMORY_COST": "19456",
        "THALLUS_ARGON2_PARALLELISM": "1",
        "THALLUS_LOCKOUT_THRESHOLD": "2",
        "THALLUS_MAX_BODY_BYTES": str(MAX_BODY),
        "THALLUS_KEEP_ALIVE_TIMEOUT": "600",  # a pinned connection stays on its worker
        "THALLUS_LOG_LEVEL": "WARNING",
        "THALLUS_DATA_DIR": str(data_dir),
        **extra,
    }


def samples(exposition: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def table(
    found: Samples, name: str, *labels: str, skip: Callable[[dict[str, str]], bool] = lambda _: False
) -> dict[Any, float]:
    """The samples of ``name`` keyed by the values of ``labels`` (one value: the value itself)."""
    rows: dict[Any, float] = {}
    for (sample, label_set), value in found.items():
        label = dict(label_set)
        if sample == name and not skip(label):
            key = tuple(label[name_] for name_ in labels)
            rows[key[0] if len(key) == 1 else key] = value
    return rows


def not_counted_exactly(label: dict[str, str]) -> bool:
    """The scrapes themselves (as many as the polling took) and ``/health`` (the start-up probe may
    have sent more than one: a probe that timed out is answered later all the same)."""
    return label.get("route") in ("/metrics", "/health")


def requests_table(found: Samples) -> dict[Any, float]:
    return table(found, "thallus_http_requests_total", "method", "route", "status_class", skip=not_counted_exactly)


def files_total(data_dir: Path) -> Samples:
    """The sum of the workers' snapshot files as they are on disk."""
    paths = (data_dir / "metrics").glob("*/*.json")
    return samples(render_snapshot(merge(json.loads(path.read_text())["snapshot"] for path in paths)).decode())


def audit_rows(data_dir: Path) -> tuple[int, int]:
    """(records, the highest seq) in the audit log, read from the SQLite file."""
    with sqlite3.connect(f"file:{data_dir / 'thallus.db'}?mode=ro", uri=True) as connection:
        count, head = connection.execute("SELECT count(*), coalesce(max(seq), 0) FROM audit_logs").fetchone()
    return int(count), int(head)


def pinned_pair(server: Server) -> tuple[list[Endpoint], int]:
    """Two keep-alive connections, one on each worker; and how many ``GET /health`` it took."""
    by_worker: dict[int, Endpoint] = {}
    attempts = 0
    while len(by_worker) < 2:
        assert attempts < 60, "could not reach both workers"
        attempts += 1
        endpoint = Endpoint(f"connection {attempts}", server.url)
        worker = endpoint.pin(server.process.pid, server.port)
        if worker is None or worker in by_worker or worker == server.process.pid:
            endpoint.close()
            continue
        by_worker[worker] = endpoint
    return list(by_worker.values()), attempts


def scrape(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url + "/metrics", headers=headers, timeout=10)


def test_metrics_are_summed_over_every_worker_exactly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(environment(data_dir), "--workers", "2") as server:
        (first, second), pins = pinned_pair(server)
        try:
            run_mix(server, first, second)
            expected_requests: dict[Any, float] = {
                ("GET", "<unmatched>", "4xx"): 3,
                ("GET", "/api/v1/users/me", "4xx"): 2,
                ("POST", "<unmatched>", "4xx"): 2,  # the CSRF refusal and the 413: before any route
                ("OPTIONS", "<preflight>", "2xx"): 1,
                ("OPTIONS", "<preflight>", "4xx"): 1,
                ("POST", "/api/v1/auth/register", "2xx"): 1,
                ("POST", "/api/v1/auth/login", "2xx"): 1,
                ("POST", "/api/v1/auth/login", "4xx"): 4,  # two 401s, the locked 429, the login-CSRF 403
            }
            found = poll(server.url, data_dir, expected_requests)
            check_families(found, data_dir, expected_requests)
            health = table(found, "thallus_http_requests_total", "route")["/health"]
            assert health >= 1 + pins  # the start-up probe, then one per pinning attempt
            assert scrape(server.url, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200  # the peer decides

            snapshots = list((data_dir / "metrics").iterdir())
            assert len(snapshots) == 1, "one run"
            assert stat.S_IMODE(snapshots[0].stat().st_mode) == 0o700
            files = sorted(snapshots[0].glob("*.json"))
            assert {int(path.stem) for path in files} == {first.worker, second.worker}
            assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)

            # a worker dies (uvicorn starts another): what it counted stays in the sum. Killed once
            # its file holds all it counted (the files add up to the mix: neither lags its worker).
            wait_until(lambda: requests_table(files_total(data_dir)) == expected_requests, "both snapshots current")
            assert first.worker is not None
            os.kill(first.worker, signal.SIGKILL)
            first.close()
            after = poll(server.url, data_dir, expected_requests, check_audit=False)
            assert table(after, "thallus_logins_total", "outcome") == LOGINS
            assert table(after, "thallus_lockouts_total") == {(): 1}
            assert table(after, "thallus_refusals_total", "layer", "reason") == REFUSALS
        finally:
            first.close()
            second.close()


def run_mix(server: Server, first: Endpoint, second: Endpoint) -> None:
    """The scripted requests (module doc), alternating between the two workers."""
    for endpoint in (first, second, first):
        assert endpoint.request("GET", "/nowhere").status_code == 404
    for endpoint in (first, second):
        assert endpoint.request("GET", "/api/v1/users/me").status_code == 401
    csrf = second.request("POST", "/api/v1/auth/logout", headers={"Cookie": "s=1", "Origin": EVIL}, content=b"")
    assert (csrf.status_code, csrf.json()["details"]["reason"]) == (403, REJECT_UNTRUSTED_ORIGIN)
    refused = first.request(
        "OPTIONS", "/api/v1/users/me", headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"}
    )
    assert refused.status_code == 403
    allowed = second.request(
        "OPTIONS", "/api/v1/users/me", headers={"Origin": SPA, "Access-Control-Request-Method": "GET"}
    )
    assert allowed.status_code == 204
    too_large = httpx.post(  # a connection of its own: a 413 ends its connection
        server.url + "/api/v1/auth/login", content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "application/json"}
    )
    assert too_large.status_code == 413
    registered = second.request(
        "POST", "/api/v1/auth/register", json={"email": EMAIL, "password": PASSWORD, "name": "Ada"}
    )
    assert registered.status_code == 201, registered.text
    assert second.request("POST", "/api/v1/auth/login", json={"email": EMAIL, "password": PASSWORD}).status_code == 200
    wrong = {"email": EMAIL, "password": PASSWORD + "x"}
    # the lockout counts per worker without Redis: every attempt on the same one
    assert [first.request("POST", "/api/v1/auth/login", json=wrong).status_code for _ in range(3)] == [401, 401, 429]
    login_csrf = second.request("POST", "/api/v1/auth/login", json=wrong, headers={"Origin": EVIL})
    assert (login_csrf.status_code, login_csrf.json()["error"]) == (403, "CSRFError")


def poll(url: str, data_dir: Path, expected: dict[Any, float], *, check_audit: bool = True) -> Samples:
    """Scrape until the requests and (with ``check_audit``) the audit figures add up."""
    deadline = time.monotonic() + DEADLINE
    while True:
        response = scrape(url)
        assert response.status_code == 200, response.text
        found = samples(response.text)
        requests = requests_table(found)
        written = table(found, "thallus_audit_records_written_total").get((), -1)
        head = table(found, "thallus_audit_chain_head_seq").get((), -1)
        if requests == expected and (not check_audit or (written, head) == audit_rows(data_dir)):
            return found
        if time.monotonic() > deadline:
            assert requests == expected
            assert (written, head) == audit_rows(data_dir)
        time.sleep(0.2)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE} s: {what}"
        time.sleep(0.2)


REFUSALS = {
    ("csrf", REJECT_UNTRUSTED_ORIGIN): 1,
    ("cors", "origin"): 1,
    ("body_limit", "too_large"): 1,
    ("login_csrf", REJECT_UNTRUSTED_ORIGIN): 1,
}
LOGINS = {"success": 1, "failure": 2, "locked": 1, "concurrent_attempts": 0}


def check_families(found: Samples, data_dir: Path, expected_requests: dict[Any, float]) -> None:
    labels = ("method", "route", "status_class")

    def last_bucket(label: dict[str, str]) -> bool:
        return not_counted_exactly(label) or label["le"] != "+Inf"

    assert (
        table(found, "thallus_http_request_duration_seconds_count", *labels, skip=not_counted_exactly)
        == expected_requests
    )
    assert table(found, "thallus_http_request_duration_seconds_bucket", *labels, skip=last_bucket) == expected_requests
    sums = table(found, "thallus_http_request_duration_seconds_sum", *labels, skip=not_counted_exactly)
    assert set(sums) == set(expected_requests) and all(value > 0 for value in sums.values())
    assert table(found, "thallus_refusals_total", "layer", "reason") == REFUSALS
    assert table(found, "thallus_logins_total", "outcome") == LOGINS
    assert table(found, "thallus_lockouts_total") == {(): 1}
    assert table(found, "thallus_password_hash_queue_depth") == {(): 0}
    assert table(found, "thallus_audit_queue_depth") == {(): 0}
    records, head = audit_rows(data_dir)
    assert records > 0 and head == records  # a fresh database: seq 1…n
    assert table(found, "thallus_audit_records_written_total") == {(): records}
    assert table(found, "thallus_audit_chain_head_seq") == {(): head}  # the largest of the workers'
    batches = table(found, "thallus_audit_batches_written_total")[()]
    assert 2 <= batches <= records  # both workers wrote; how they batched is theirs
    assert table(found, "thallus_audit_journal_spilled_records_total", "cause") == {"store": 0, "queue_full": 0}
    assert table(found, "thallus_audit_journal_replayed_records_total") == {(): 0}


# -- access ---------------------------------------------------------------------------------------


def non_loopback_address() -> str | None:
    """This host's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_loopback_access_is_decided_by_the_tcp_peer(tmp_path: Path) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    with running_server(environment(tmp_path / "data"), "--host", "0.0.0.0") as server:
        assert scrape(server.url).status_code == 200
        assert scrape(server.url, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200
        remote = f"http://{address}:{server.port}"
        for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
            refused = scrape(remote, **headers)
            assert refused.status_code == 403, headers
            body = refused.json()
            assert (
                body["error"] == "PermissionDeniedError"
                and body["correlation_id"] == refused.headers["x-correlation-id"]
            )
        assert httpx.get(remote + "/health").status_code == 200  # the rest is served as usual


def test_token_access(tmp_path: Path) -> None:
    extra = {"THALLUS_METRICS_ACCESS": "token", "THALLUS_METRICS_TOKEN": TOKEN}
    with running_server(environment(tmp_path / "data", **extra)) as server:
        missing = scrape(server.url)
        assert (missing.status_code, missing.json()["error"]) == (401, "AuthenticationError")
        assert missing.headers["www-authenticate"] == 'Bearer realm="metrics"'
        wrong = scrape(server.url, Authorization=f"Bearer {TOKEN[:-1]}?")
        assert (wrong.status_code, wrong.json()["error"]) == (403, "PermissionDeniedError")
        allowed = scrape(server.url, Authorization=f"Bearer {TOKEN}")  # not taken for an access token
        assert allowed.status_code == 200
        assert allowed.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "thallus_http_requests_total" in allowed.text


def test_metrics_off_is_no_endpoint(tmp_path: Path) -> None:
    with running_server(environment(tmp_path / "data", THALLUS_METRICS_ACCESS="off")) as server:
        response = scrape(server.url)
        assert (response.status_code, response.json()["error"]) == (404, "NotFoundError")
        assert not (tmp_path / "data" / "metrics").exists()


def test_a_short_metrics_token_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="metrics_token: must be at least 32 characters"):
        ServiceSettings(metrics_access="token", metrics_token="short")
    with pytest.raises(ConfigurationError, match="METRICS_TOKEN: must be at least 32"):  # named as it came
        ServiceSettings(metrics_access="token")
    assert ServiceSettings().metrics_access == "loopback"
    assert ServiceSettings(metrics_access=" Off ").metrics_access == "off"


# -- the workers' snapshots, in process ------------------------------------------------------------


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def worker_metrics(depth: float, seq: float) -> Metrics:
    metrics = Metrics()
    metrics.gauge("queue_depth", "d", lambda: depth)
    metrics.gauge("head_seq", "s", lambda: seq, merge="max")
    metrics.refused("csrf", REJECT_UNTRUSTED_ORIGIN)
    return metrics


def write_as(snapshots: WorkerSnapshots, pid: int, metrics: Metrics) -> None:
    path = snapshots.directory / f"{pid}.json"
    path.write_text(json.dumps({"pid": pid, "snapshot": metrics.snapshot()}))


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path, dead_pid: int) -> None:
    async def run() -> Samples:
        ours = WorkerSnapshots(worker_metrics(1, 5), tmp_path / "metrics")
        await ours.start()
        try:
            write_as(ours, os.getppid(), worker_metrics(2, 7))  # alive
            write_as(ours, dead_pid, worker_metrics(40, 90))  # gone
            (ours.directory / "torn.json").write_text("{")  # unreadable: skipped
            return samples(ours.render().decode())
        finally:
            await ours.stop()

    found = asyncio.run(run())
    assert table(found, "thallus_refusals_total", "layer", "reason") == {("csrf", REJECT_UNTRUSTED_ORIGIN): 3}
    assert table(found, "queue_depth") == {(): 3}
    assert table(found, "head_seq") == {(): 7}


def test_snapshot_files_are_private_and_other_runs_are_forgotten(tmp_path: Path, dead_pid: int) -> None:
    root = tmp_path / "metrics"
    finished = root / "0123456789abcdef"
    finished.mkdir(parents=True)
    (finished / f"{dead_pid}.json").write_text("{}")
    live_other_run = root / "fedcba9876543210"
    live_other_run.mkdir()
    (live_other_run / f"{os.getppid()}.json").write_text("{}")

    async def run() -> Path:
        snapshots = WorkerSnapshots(worker_metrics(0, 0), root, interval=0.05)
        await snapshots.start()
        before = snapshots.path.stat().st_mtime_ns
        await asyncio.sleep(0.3)
        assert snapshots.path.stat().st_mtime_ns > before, "published every interval"
        await snapshots.stop()
        return snapshots.path

    path = asyncio.run(run())
    assert path.parent.name == run_id() and path.name == f"{os.getpid()}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not finished.exists(), "a run whose workers are gone is deleted"
    assert (live_other_run / f"{os.getppid()}.json").exists(), "another live run is left alone"
    assert [child.name for child in path.parent.iterdir()] == [path.name], "no temporary file left"


def test_the_run_id_is_shared_by_spawned_workers_and_by_no_other_process() -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        assert pool.apply(run_id) == run_id()
    other = subprocess.run(
        [sys.executable, "-c", "from thallus.server.metrics import run_id; print(run_id())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() != run_id()


def test_a_directory_that_cannot_be_written_never_stops_the_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # no directory can be made under a file

    async def run() -> Samples:
        snapshots = WorkerSnapshots(worker_metrics(2, 3), blocked / "metrics")
        await snapshots.start()
        try:
            return samples(snapshots.render().decode())  # this worker's own counts
        finally:
            await snapshots.stop()

    found = asyncio.run(run())
    assert table(found, "queue_depth") == {(): 2}
    assert [record.levelname for record in caplog.records if "metrics snapshot" in record.getMessage()] == ["ERROR"]
