"""Appending to the chain, at the driver level: what one audit append costs the event loop.

The writer appends on the loop that serves requests, so every microsecond of CPU an append spends
there is a microsecond some request waits (benchmarks/README.md, ``bench_audit.py``). Through the
SQLAlchemy Core path, one append cost ~2–3 ms of loop CPU whatever its size (a pool checkout with its
pre-ping, statement compilation, three to six driver calls each a thread hop or a round trip), which
at 300 requests/s was most of what the audit log added to the p99. So each production driver has an
appender of its own, holding its connection from one append to the next:

* PostgreSQL (asyncpg): one statement and one round trip per append. The appender remembers the head
  it last wrote; the statement moves the head *only if it is still that one* and inserts the batch
  only if it did (``UPDATE … WHERE seq = <remembered> AND hash = <remembered>`` in a CTE, the insert
  ``WHERE EXISTS`` it). If another writer (another instance) moved the head meanwhile, nothing is
  written and the appender falls back to the locking path: ``BEGIN``, lock and read the head, insert
  and move (the same statement), ``COMMIT``. Replays (which look stored ids up first) always lock.
* SQLite (a file): the whole transaction — ``BEGIN IMMEDIATE`` (the write lock), read the head, link,
  insert, move, ``COMMIT`` — runs as one call on a thread of the appender's own with a ``sqlite3``
  connection of its own: one hop from the loop instead of one per statement. SQLite's C code runs
  without the GIL; the linking runs in chunks between its calls.
* anything else (an in-memory SQLite database): SQLAlchemy Core on a pooled connection.

Either way ``seq`` is one sequence and ``prev_hash`` the hash of the record stored before, in commit
order, across every writer; records whose id is stored already are skipped when ``replay`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from thallus.server.audit.chain import FIELDS, Prepared, halves_hash, timestamp
from thallus.server.storage.database import Database, DatabaseUnavailableError, is_unavailable
from thallus.server.storage.models import AuditChainHead, AuditLog, utcnow

#: A stored row, in this order: ``seq``, the §11 fields, ``prev_hash``, ``hash``.
COLUMNS = ("seq", *FIELDS, "prev_hash", "hash")
_DETAILS, _CREATED_AT = FIELDS.index("details"), FIELDS.index("created_at")
#: What can be appended: a record (a mapping of the §11 fields, as journalled) or one prepared ahead.
Linkable = Mapping[str, Any] | Prepared
#: Records linked between two yields to the loop (or two SQLite calls): a few µs each when prepared
#: ahead (:class:`~thallus.server.audit.chain.Prepared`), ~15 µs when not (a replayed journal).
LINK_CHUNK = 64
#: A held PostgreSQL connection unused for this long goes back to the pool (which pings it on the
#: next checkout) rather than being trusted after a quiet spell.
IDLE_RELEASE_SECONDS = 5.0


class Appender(Protocol):
    #: The chain head's seq after this appender's last append (0 before the first).
    head_seq: int

    async def append(self, records: Sequence[Linkable], *, replay: bool = True) -> int:
        """Store records at the end of the chain, in order; returns how many were new."""

    async def close(self) -> None:
        """Release the connection (and thread) the appender holds."""


def appender_for(database: Database) -> Appender:
    """The cheapest appender for this database's driver (module doc)."""
    url = database.url
    driver = url.get_driver_name()
    if driver == "asyncpg":
        return PostgresAppender(database.engine)
    if driver == "aiosqlite" and url.database not in (None, "", ":memory:") and not url.query.get("uri"):
        return SqliteAppender(url.database)
    return CoreAppender(database.engine)


# -- linking ----------------------------------------------------------------------------------


def record_id(item: Linkable) -> str:
    return str(item.record["id"] if isinstance(item, Prepared) else item["id"])


def _same(value: Any) -> Any:
    return value


def _json_text(value: Any) -> str:
    return json.dumps(value, default=str)  # None is stored as JSON null, as SQLAlchemy's JSON type does


def _sqlite_time(value: str) -> str:
    return f"{value[:10]} {value[11:26]}"  # SQLAlchemy's SQLite DATETIME spelling: naive UTC, microseconds


class Chain:
    """Links records onto a head: their ``seq``, ``prev_hash`` and ``hash``, as row tuples (:data:`COLUMNS`).

    Records are :func:`~thallus.server.audit.chain.normalised` first (what is hashed is what reading the
    row back gives, so ``verify`` agrees); ``details`` and ``created_at`` are then stored as the
    backend wants them (``store_details``, ``store_time``).
    """

    def __init__(
        self,
        seq: int,
        previous: str,
        skip: Iterable[str] = (),
        *,
        store_details: Callable[[Any], Any] = _same,
        store_time: Callable[[str], Any] = _same,
    ) -> None:
        self.seq = seq
        self.previous = previous
        self.skip = set(skip)
        self.rows: list[tuple[Any, ...]] = []
        self._store_details = store_details
        self._store_time = store_time

    def add(self, records: Iterable[Linkable]) -> None:
        for item in records:
            prepared = item if isinstance(item, Prepared) else Prepared.of(item)
            record = prepared.record
            if record["id"] in self.skip:
                continue
            self.skip.add(record["id"])  # a record twice in one batch is stored once
            self.seq += 1
            digest = halves_hash(self.previous, prepared.halves, self.seq)
            values = list(record.values())  # FIELDS order
            values[_DETAILS] = self._store_details(values[_DETAILS])
            values[_CREATED_AT] = self._store_time(values[_CREATED_AT])
            self.rows.append((self.seq, *values, self.previous, digest))
            self.previous = digest

    async def add_yielding(self, records: Sequence[Linkable]) -> None:
        """:meth:`add` in chunks, handing the loop back between them: tasks that are ready to run (a
        request half-way through) are not held up by a whole big batch (a replay, a burst)."""
        for start in range(0, len(records), LINK_CHUNK):
            if start:
                await asyncio.sleep(0)
            self.add(records[start : start + LINK_CHUNK])


# -- PostgreSQL --------------------------------------------------------------------------------

_PG_TYPES = {"seq": "bigint", "status_code": "integer", "duration_ms": "double precision", "created_at": "timestamptz"}
#: The batch travels as one JSON array of row arrays (:data:`COLUMNS` order), taken apart by the server:
#: one text parameter is far cheaper for the driver to encode than a typed array per column, and as
#: ``jsonb`` (parsed once) far cheaper for the server to take apart than as ``json`` (measured: 43
#: instead of 71 µs of server CPU per record at 7 records an append).
#: ``details`` stays JSON (a JSON null is stored as JSON null, as SQLAlchemy's JSON type does).
_PG_VALUES = ", ".join(
    f"item->{i}" if name == "details" else f"(item->>{i})::{_PG_TYPES[name]}" if name in _PG_TYPES else f"item->>{i}"
    for i, name in enumerate(COLUMNS)
)
#: Moves the head from ($4, $5) to ($2, $3) and inserts the batch $1 — both, or neither when the head
#: is no longer where this appender last saw it. Autocommitted alone, or inside the locking path.
#: (Built once from the constant column names; every value is a parameter.)
PG_APPEND = (
    "WITH head AS (UPDATE audit_chain_head SET seq = $2, hash = $3, updated_at = now() "  # noqa: S608
    "WHERE id = 1 AND seq = $4 AND hash = $5 RETURNING 1) "
    f"INSERT INTO audit_logs ({', '.join(COLUMNS)}) SELECT {_PG_VALUES} "
    "FROM jsonb_array_elements($1::text::jsonb) AS item WHERE EXISTS (SELECT FROM head)"
)
PG_LOCK_HEAD = "UPDATE audit_chain_head SET updated_at = now() WHERE id = 1 RETURNING seq, hash"
PG_STORED_IDS = "SELECT id FROM audit_logs WHERE id = ANY($1::text[])"
#: asyncpg failures that mean "the database is not there" (besides a connection found closed).
_PG_UNAVAILABLE = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)


class PostgresAppender:
    """One round trip per append on a held pooled connection (module doc)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: Any = None  # the asyncpg connection under it
        self._head: tuple[int, str] | None = None  # (seq, hash) this appender last wrote or read
        self._last_used = -float("inf")
        self.head_seq = 0

    async def append(self, records: Sequence[Linkable], *, replay: bool = True) -> int:
        if not records:
            return 0
        try:
            driver = await self._checkout()
            if not replay and self._head is not None:
                stored = await self._append_if_head_unchanged(driver, records, *self._head)
                if stored is not None:
                    return stored
            return await self._append_locked(driver, records, replay=replay)
        except BaseException as exc:
            closed = self._driver is not None and self._driver.is_closed()
            await self._discard()
            if isinstance(exc, Exception) and (closed or is_unavailable(exc) or isinstance(exc, _PG_UNAVAILABLE)):
                raise DatabaseUnavailableError(f"audit append failed: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            self._last_used = time.monotonic()

    async def _append_if_head_unchanged(
        self, driver: Any, records: Sequence[Linkable], seq: int, previous: str
    ) -> int | None:
        """The one-round-trip path; ``None`` when another writer moved the head first (nothing written)."""
        chain = Chain(seq, previous)
        await chain.add_yielding(records)
        status = await driver.execute(PG_APPEND, _json_rows(chain.rows), chain.seq, chain.previous, seq, previous)
        if status == "INSERT 0 0":
            self._head = None
            return None
        _expect(status, len(chain.rows))
        self._head = (chain.seq, chain.previous)
        self.head_seq = chain.seq
        return len(chain.rows)

    async def _append_locked(self, driver: Any, records: Sequence[Linkable], *, replay: bool) -> int:
        async with driver.transaction():
            seq, previous = await driver.fetchrow(PG_LOCK_HEAD)
            stored: list[str] = []
            if replay:
                stored = [row[0] for row in await driver.fetch(PG_STORED_IDS, [record_id(r) for r in records])]
            chain = Chain(int(seq), str(previous), stored)
            await chain.add_yielding(records)
            if chain.rows:
                status = await driver.execute(
                    PG_APPEND, _json_rows(chain.rows), chain.seq, chain.previous, int(seq), str(previous)
                )
                _expect(status, len(chain.rows))
        self._head = (chain.seq, chain.previous)
        self.head_seq = chain.seq
        return len(chain.rows)

    async def _checkout(self) -> Any:
        if self._connection is not None and time.monotonic() - self._last_used > IDLE_RELEASE_SECONDS:
            await self.close()
        if self._connection is None:
            connection = await self.engine.connect()
            try:
                self._driver = (await connection.get_raw_connection()).driver_connection
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
        return self._driver

    async def _discard(self) -> None:
        """Drop the connection after a failure: its state (mid-transaction? mid-message?) is unknown."""
        connection, driver = self._connection, self._driver
        self._connection = self._driver = self._head = None
        if driver is not None:
            driver.terminate()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()

    async def close(self) -> None:
        connection = self._connection
        self._connection = self._driver = self._head = None
        if connection is not None:
            await connection.close()


def _json_rows(rows: list[tuple[Any, ...]]) -> str:
    return json.dumps(rows, separators=(",", ":"), default=str)


def _expect(status: str, count: int) -> None:
    if status != f"INSERT 0 {count}":
        raise RuntimeError(f"the audit chain head moved under its lock (statement status {status!r})")


# -- SQLite ------------------------------------------------------------------------------------

SQLITE_READ_HEAD = "SELECT seq, hash FROM audit_chain_head WHERE id = 1"
SQLITE_STORED_IDS = "SELECT id FROM audit_logs WHERE id IN (SELECT value FROM json_each(?))"
SQLITE_INSERT = f"INSERT INTO audit_logs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"  # noqa: S608
SQLITE_MOVE_HEAD = "UPDATE audit_chain_head SET seq = ?, hash = ?, updated_at = ? WHERE id = 1"


class SqliteAppender:
    """One thread hop per append: the transaction runs on the appender's own thread (module doc)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thallus-audit-sqlite")
        self._connection: sqlite3.Connection | None = None  # created, used and closed on that thread
        self.head_seq = 0

    async def append(self, records: Sequence[Linkable], *, replay: bool = True) -> int:
        if not records:
            return 0
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._append, list(records), replay)
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, unreadable file, no table
            raise DatabaseUnavailableError(f"audit append failed: {exc}") from exc

    def _append(self, records: list[Linkable], replay: bool) -> int:
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            head = connection.execute(SQLITE_READ_HEAD).fetchone()
            if head is None:
                raise RuntimeError("the audit chain head is missing (is the database migrated?)")
            stored: list[str] = []
            if replay:
                ids = json.dumps([record_id(record) for record in records])
                stored = [row[0] for row in connection.execute(SQLITE_STORED_IDS, (ids,))]
            chain = Chain(int(head[0]), str(head[1]), stored, store_details=_json_text, store_time=_sqlite_time)
            for start in range(0, len(records), LINK_CHUNK):  # the GIL is let go between chunks
                done = len(chain.rows)
                chain.add(records[start : start + LINK_CHUNK])
                connection.executemany(SQLITE_INSERT, chain.rows[done:])
            if chain.rows:
                connection.execute(SQLITE_MOVE_HEAD, (chain.seq, chain.previous, _sqlite_time(timestamp(utcnow()))))
            connection.execute("COMMIT")
            self.head_seq = chain.seq
            return len(chain.rows)
        except BaseException:
            self._abandon()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # autocommit mode (transactions are explicit); the pragmas of thallus.server.storage.database
            connection = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000"):
                connection.execute(f"PRAGMA {pragma}")
            self._connection = connection
        return self._connection

    def _abandon(self) -> None:
        """After a failure: roll back, or drop the connection when even that fails."""
        connection = self._connection
        if connection is None:
            return
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error:
            self._connection = None
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)


# -- SQLAlchemy Core (the fallback) ------------------------------------------------------------

_LOGS = cast(Table, AuditLog.__table__)  # Core tables: no ORM plugin on the way
_HEADS = cast(Table, AuditChainHead.__table__)
CORE_LOCK_HEAD = (
    update(_HEADS).where(_HEADS.c.id == 1).values(updated_at=bindparam("now")).returning(_HEADS.c.seq, _HEADS.c.hash)
)
CORE_MOVE_HEAD = (
    update(_HEADS)
    .where(_HEADS.c.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"), updated_at=bindparam("now"))
)
CORE_INSERT = insert(_LOGS)
CORE_STORED_IDS = select(_LOGS.c.id).where(_LOGS.c.id.in_(bindparam("ids", expanding=True)))


def _aware_time(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


class CoreAppender:
    """Three Core statements in one transaction on a pooled connection: lock and read the head
    (``UPDATE … RETURNING``), insert, move the head. For configurations the driver-level appenders
    do not cover."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.head_seq = 0

    async def append(self, records: Sequence[Linkable], *, replay: bool = True) -> int:
        if not records:
            return 0
        async with self.engine.begin() as connection:
            head = (await connection.execute(CORE_LOCK_HEAD, {"now": utcnow()})).one()
            stored: list[str] = []
            if replay:
                ids = [record_id(record) for record in records]
                stored = list((await connection.scalars(CORE_STORED_IDS, {"ids": ids})).all())
            chain = Chain(int(head.seq), str(head.hash), stored, store_time=_aware_time)
            await chain.add_yielding(records)
            if chain.rows:
                await connection.execute(CORE_INSERT, [dict(zip(COLUMNS, row, strict=True)) for row in chain.rows])
                await connection.execute(
                    CORE_MOVE_HEAD, {"new_seq": chain.seq, "new_hash": chain.previous, "now": utcnow()}
                )
        self.head_seq = chain.seq  # committed
        return len(chain.rows)

    async def close(self) -> None:
        return None
