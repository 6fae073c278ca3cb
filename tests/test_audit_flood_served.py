"""One client cannot fill the audit log: measured against a real ``thallus serve`` (production profile).

Each scenario starts a server on its own SQLite file, floods it from one client (127.0.0.1) over a
few keep-alive connections, stops it with SIGTERM (the lifespan shutdown flushes the coalesced
summaries), then reads the audit table directly and runs ``thallus audit verify``.

"Bytes added" is the growth of the database file plus its WAL between the server answering its
first health check (the WAL then checkpointed) and the server having stopped — what the disk saw;
the rows' own size (every stored value as text) is printed beside it. Figures (``pytest -s``),
before these rules → after, on the shared 2-CPU test machine:

* 10,000 refusals (5,000 refused preflights, 5,000 POSTs answered 429, ~16–20 s): 15,005 rows,
  10.3 MB of file (5.2 MB of values) → 9 rows (5 ``request`` for the 404s, 2 ``cors_rejected``,
  2 ``rate_limited``), 8 KB of file (4 KB of values);
* 2,000 requests to 2 KB random paths (~5 s): 2,995 rows, 13.2 MB of file → 9 rows, 37 KB.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import string
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server import THALLUS, Server, running_server

CLIENTS = 4  # keep-alive connections, one per thread
PREFLIGHT = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
LIMIT = 5


def production(data_dir: Path) -> dict[str, str]:
    return {
        "THALLUS_ENV": "production",
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_SECRET_KEY": "f" * 48,
        "THALLUS_DATA_DIR": str(data_dir),
        "THALLUS_RATE_LIMIT": f"{LIMIT}/minute",
        "THALLUS_LOG_LEVEL": "ERROR",  # every refusal logs a warning; the pipe would fill
    }


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Flood:
    statuses: Counter[tuple[str, int]]
    seconds: float
    rows: list[dict[str, object]]
    bytes_added: int
    returncode: int | None


def files_size(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in data_dir.glob("thallus.db*") if path.is_file())


def checkpoint(data_dir: Path) -> None:
    """Fold the WAL into the database file, so the size measured before the flood is not made of
    pages that the checkpoint at shutdown would merely move (the server is idle at that point)."""
    with sqlite3.connect(data_dir / "thallus.db") as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def row_bytes(rows: list[dict[str, object]]) -> int:
    """The stored rows' own size: every value's text (``details`` as its JSON)."""
    return sum(
        len(json.dumps(value)) if name == "details" else len(str(value))
        for row in rows
        for name, value in row.items()
        if value is not None
    )


def send_all(url: str, requests: list[Request]) -> Counter[tuple[str, int]]:
    """``requests`` shared out over :data:`CLIENTS` keep-alive clients, each on a thread sending its
    share in turn (sync clients: about half the CPU per request of async ones, and the client, not
    the server, is what limits the rate here)."""

    def share(part: list[Request]) -> Counter[tuple[str, int]]:
        statuses: Counter[tuple[str, int]] = Counter()
        with httpx.Client(base_url=url, timeout=30) as client:
            for request in part:
                response = client.request(request.method, request.path, headers=request.headers)
                statuses[(request.method, response.status_code)] += 1
        return statuses

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(pool.map(share, (requests[n::CLIENTS] for n in range(CLIENTS))), Counter())


def audit_rows(data_dir: Path) -> list[dict[str, object]]:
    with sqlite3.connect(data_dir / "thallus.db") as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM audit_logs ORDER BY seq").fetchall()
    return [{**dict(row), "details": json.loads(row["details"] or "null")} for row in rows]


def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(production(data_dir))
    return subprocess.run(
        [THALLUS, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def stop_gracefully(server: Server) -> int | None:
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.stop()
        return None


def flood(data_dir: Path, requests: list[Request]) -> Flood:
    with running_server(production(data_dir)) as server:
        checkpoint(data_dir)
        before = files_size(data_dir)
        started = time.perf_counter()
        statuses = send_all(server.url, requests)
        seconds = time.perf_counter() - started
        returncode = stop_gracefully(server)
    return Flood(statuses, seconds, audit_rows(data_dir), files_size(data_dir) - before, returncode)


def counts(rows: list[dict[str, object]], action: str) -> list[int]:
    return [int(row["details"]["count"]) for row in rows if row["action"] == action]  # type: ignore[index]


def report(name: str, result: Flood) -> None:
    kinds = Counter(str(row["action"]) for row in result.rows)
    print(
        f"\n{name}: {sum(result.statuses.values())} requests in {result.seconds:.1f} s "
        f"({dict(result.statuses)}); {len(result.rows)} audit rows {dict(kinds)}; "
        f"{row_bytes(result.rows):,} bytes of row values; database + WAL grew {result.bytes_added:,} bytes"
    )


def assert_verifies(data_dir: Path) -> None:
    verified = verify(data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("audit chain intact")


def test_ten_thousand_refusals_add_a_few_rows(tmp_path: Path) -> None:
    """5,000 refused preflights and 5,000 POSTs answered 429, from one client."""
    refused_preflights, limited_posts = 5000, 5000
    requests = [Request("OPTIONS", f"/api/v1/users/{n}", PREFLIGHT) for n in range(refused_preflights)]
    requests += [Request("POST", f"/api/v1/nowhere/{n}", {}) for n in range(limited_posts + LIMIT)]
    random.Random(7).shuffle(requests)
    result = flood(tmp_path, requests)
    report("10,000 refusals", result)
    assert result.returncode in (0, -signal.SIGTERM), "stopped gracefully (not killed)"
    assert result.statuses == {("OPTIONS", 403): refused_preflights, ("POST", 404): LIMIT, ("POST", 429): limited_posts}
    assert len(result.rows) <= 30, "a few dozen rows at most"
    assert result.bytes_added < 1_000_000 and row_bytes(result.rows) < 1_000_000
    assert sum(counts(result.rows, "cors_rejected")) == refused_preflights
    assert sum(counts(result.rows, "rate_limited")) == limited_posts
    requests_recorded = [row for row in result.rows if row["action"] == "request"]
    assert [row["status_code"] for row in requests_recorded] == [404] * LIMIT, "no request record for a 429"
    assert_verifies(tmp_path)


def random_path(generator: random.Random, length: int = 2048) -> str:
    return "/" + "".join(generator.choices(string.ascii_letters + string.digits, k=length - 1))


def test_long_paths_do_not_grow_the_log(tmp_path: Path) -> None:
    """2,000 requests to 2 KB random paths: refused preflights and POSTs (404 while under the limit,
    then 429). Bound: the rows are one ``request`` row per 404 (:data:`LIMIT`) and two per refused
    kind (first + summary), each under ~5 KiB stored (a 2 KiB path, the rest small), so with SQLite's
    4 KiB pages and the index entries they stay far under 256 KiB. Before, each request stored a row
    with its 2 KiB path (the 429s two): megabytes."""
    generator = random.Random(11)
    requests = [Request("OPTIONS", random_path(generator), PREFLIGHT) for _ in range(1000)]
    requests += [Request("POST", random_path(generator), {}) for _ in range(1000)]
    generator.shuffle(requests)
    result = flood(tmp_path, requests)
    report("2,000 requests to 2 KB paths", result)
    assert result.returncode in (0, -signal.SIGTERM), "stopped gracefully (not killed)"
    assert result.statuses == {("OPTIONS", 403): 1000, ("POST", 404): LIMIT, ("POST", 429): 1000 - LIMIT}
    assert len(result.rows) <= LIMIT + 4
    assert result.bytes_added < 256 * 1024
    assert all(len(str(row["path"])) <= 2048 for row in result.rows)
    assert sum(counts(result.rows, "cors_rejected")) == 1000
    assert sum(counts(result.rows, "rate_limited")) == 1000 - LIMIT
    assert_verifies(tmp_path)
