"""Fault tests of the audit log against real `thallus serve` processes on PostgreSQL.

1. The database vanishes part-way through a concurrent load (a TCP proxy between the service and
   PostgreSQL is cut, then restored): afterwards the store holds exactly one ``request`` record per
   request, the chain verifies.
2. The server is stopped with SIGTERM mid-load and started again: the same holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.engine import URL

from tests.server import THALLUS, running_server
from tests.tcp_proxy import tcp_proxy
from thallus.server.storage import Database
from thallus.server.storage.models import AuditLog

REQUESTS = 2000
CONCURRENCY = 50


def environment(database_url: str, data_dir: Path) -> dict[str, str]:
    return {
        "THALLUS_ENV": "test",
        "THALLUS_SECRET_KEY": "f" * 48,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_DATABASE_URL": database_url,
        "THALLUS_DATA_DIR": str(data_dir),
        "THALLUS_RATE_LIMIT": "1000000/minute",
        "THALLUS_RATE_LIMIT_AUTH": "1000000/minute",
        "THALLUS_AUDIT_WRITE_TIMEOUT": "2",
        "THALLUS_LOG_LEVEL": "WARNING",
    }


async def load(url: str, on_progress: Callable[[int], None], prefix: str = "fault") -> dict[str, int | None]:
    """POST a state-changing request REQUESTS times; each one's status, or None when it got no answer."""
    statuses: dict[str, int | None] = {}
    done = 0
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(number: int) -> None:
            nonlocal done
            correlation_id = f"{prefix}-{number:05d}"
            async with semaphore:
                try:
                    response = await client.post("/api/v1/auth/logout", headers={"X-Correlation-ID": correlation_id})
                    statuses[correlation_id] = response.status_code
                except httpx.TransportError:
                    statuses[correlation_id] = None
            done += 1
            on_progress(done)

        await asyncio.gather(*(one(number) for number in range(REQUESTS)))
    return statuses


def request_records(database_url: str) -> list[AuditLog]:
    async def read() -> list[AuditLog]:
        database = Database(database_url)
        try:
            async with database.session() as db:
                statement = select(AuditLog).where(AuditLog.action == "request").order_by(AuditLog.seq)
                return list((await db.scalars(statement)).all())
        finally:
            await database.dispose()

    return asyncio.run(read())


def wait_for_records(database_url: str, expected: int, timeout: float = 60) -> list[AuditLog]:
    deadline = time.monotonic() + timeout
    while True:
        records = request_records(database_url)
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def verify(database_url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(THALLUS_DATABASE_URL=database_url, THALLUS_DATA_DIR=str(data_dir))
    return subprocess.run(
        [THALLUS, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_record_per_request(records: list[AuditLog], statuses: dict[str, int | None]) -> None:
    counts = Counter(record.correlation_id for record in records)
    duplicated = [cid for cid, count in counts.items() if count > 1]
    assert not duplicated, f"{len(duplicated)} requests have more than one record, e.g. {duplicated[:3]}"
    answered = {cid for cid, status in statuses.items() if status is not None}
    missing = answered - set(counts)
    assert not missing, f"{len(missing)} answered requests have no record, e.g. {sorted(missing)[:3]}"
    assert set(counts) <= set(statuses), "no record for a request that was never sent"
    by_id = {record.correlation_id: record for record in records}
    assert all(by_id[cid].status_code == statuses[cid] for cid in answered), "each record has its response's status"


def test_database_outage_mid_load(empty_postgres: URL, tmp_path: Path) -> None:
    direct = empty_postgres.render_as_string(hide_password=False)
    assert empty_postgres.host is not None
    with tcp_proxy(empty_postgres.host, empty_postgres.port or 5432) as proxy:
        proxied = empty_postgres.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        with running_server(environment(proxied, tmp_path)) as server:
            phases: list[str] = []

            def cut_and_restore(done: int) -> None:
                if done == REQUESTS // 4:
                    proxy.cut()
                    phases.append("cut")
                elif done == REQUESTS * 3 // 4:
                    proxy.restore()
                    phases.append("restored")

            statuses = asyncio.run(load(server.url, cut_and_restore))
            assert phases == ["cut", "restored"]
            assert all(status == 204 for status in statuses.values()), Counter(statuses.values())
            wait_for_records(direct, REQUESTS)
            output = server.output()  # stops it: SIGTERM, lifespan flush
    assert '"audit store unreachable' in output or "journalling" in output, "the outage really hit the writer"
    records = request_records(direct)
    assert len(records) == REQUESTS
    assert_one_record_per_request(records, statuses)
    result = verify(direct, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((tmp_path / "audit-journal").glob("journal-*.jsonl")), "every journal was replayed"


def test_sigterm_mid_load_then_restart(empty_postgres: URL, tmp_path: Path) -> None:
    url = empty_postgres.render_as_string(hide_password=False)
    env = environment(url, tmp_path)
    with running_server(env) as server:

        def stop_part_way(done: int) -> None:
            if done == REQUESTS // 3:
                server.process.send_signal(signal.SIGTERM)

        statuses = asyncio.run(load(server.url, stop_part_way))
        server.process.wait(60)
        # uvicorn shuts down gracefully (lifespan flush included), then re-raises the signal it caught;
        # the records below are the proof that the flush happened
        assert server.process.returncode in (0, -signal.SIGTERM)
    answered = sum(status is not None for status in statuses.values())
    assert REQUESTS // 3 <= answered < REQUESTS, "the stop really happened mid-load"
    with running_server(env):  # a restart replays whatever the stop left in a journal
        wait_for_records(url, answered)
    assert_one_record_per_request(request_records(url), statuses)
    result = verify(url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_instances_write_one_chain(empty_postgres: URL, tmp_path: Path) -> None:
    """Two servers append to one PostgreSQL chain at once: one sequence, every link intact."""
    url = empty_postgres.render_as_string(hide_password=False)
    with (
        running_server(environment(url, tmp_path / "a")) as first,
        running_server(environment(url, tmp_path / "b")) as second,
    ):

        async def both() -> tuple[dict[str, int | None], dict[str, int | None]]:
            return await asyncio.gather(load(first.url, lambda done: None), load(second.url, lambda done: None, "twin"))

        left, right = asyncio.run(both())
        expected = {**left, **right}
        assert len(expected) == 2 * REQUESTS and all(status == 204 for status in expected.values())
        records = wait_for_records(url, 2 * REQUESTS)
    assert [record.seq for record in records] == list(range(records[0].seq, records[0].seq + len(records)))
    assert_one_record_per_request(records, expected)
    result = verify(url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
