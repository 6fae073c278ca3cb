"""The persistent audit log at scale: queries over a million records, export memory, request latency.

Three parts, chosen with ``--part queries|export|latency|all`` (default ``all``):

* ``queries`` — a fresh database per backend (a SQLite file in a temporary directory; a PostgreSQL
  database of the run's own on the server of ``THALLUS_TEST_DATABASE_URL``, dropped at the end) is
  migrated with ``Database.migrate()`` (the real schema and indexes) and seeded with ``--rows``
  valid, hash-chained records (a realistic mix of actions, ~1000 users, outcomes, resources,
  correlation IDs, ``created_at`` spread over 90 days). Then the store's own query path,
  ``AuditStore.query(AuditFilter(...), limit=100)`` newest first, is timed with every filter of the
  API, for the first page and for the second (``before_seq``), plus ``count()`` and ``verify()``.
  Queries slower than ``--slow-ms`` get their plan (``EXPLAIN``) printed.
* ``export`` — ``export_lines(store, AuditFilter(), "jsonl"|"csv")`` streamed over every record,
  output dropped, with the process's resident memory sampled at every chunk: rows/s and RSS growth.
  Needs the seeded database too (seeded once when both parts run).
* ``latency`` — two real ``thallus serve`` processes per backend (``tests.server.running_server``),
  ``THALLUS_AUDIT_ENABLED=false`` and ``true``, loaded in turn (off, on, off, on, …) by the same
  closed-loop client (httpx, ``--concurrency`` workers) sending ``POST /api/v1/auth/logout`` (a 204
  and one ``request`` audit record each): requests/s and p50/p90/p99 latency; afterwards the
  ``request`` records the audit-on server stored are counted against the requests it answered.

PostgreSQL is skipped, with the reason printed, when its server does not answer.
Run ``.venv/bin/python benchmarks/bench_audit.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import resource
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.engine import URL, make_url

from common import describe, environment, progress
from thallus.server.api.routes.audit_logs import export_lines
from thallus.server.audit.chain import FIELDS, link_hash
from thallus.server.audit.store import AuditFilter, AuditStore
from thallus.server.storage import Database
from thallus.server.storage.models import GENESIS_HASH, AuditChainHead, AuditLog, utcnow

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
POSTGRES_URL_VARIABLE = "THALLUS_TEST_DATABASE_URL"
BACKENDS = ("sqlite", "postgresql")
PARTS = ("queries", "export", "latency", "all")
PACKAGES = ("thallus", "sqlalchemy", "aiosqlite", "asyncpg", "alembic", "uvicorn", "fastapi", "httpx")

PAGE = 100
#: Untimed executions before a query is timed: pages cached, and PostgreSQL past the 5 custom plans
#: after which its plan cache may switch a prepared statement (asyncpg prepares them) to a generic plan.
WARMUPS = 5
SPAN = timedelta(days=90)
USERS = 1000
#: The columns in the order the PostgreSQL COPY sends them.
COPY_COLUMNS = ("seq", *FIELDS, "prev_hash", "hash")

SERVER_SETTINGS = {
    "THALLUS_ENV": "test",
    "THALLUS_SECRET_KEY": "bench-audit-secret-" + "k" * 29,  # 48 characters
    "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_RATE_LIMIT": "10000000/minute",
    "THALLUS_RATE_LIMIT_AUTH": "10000000/minute",
    "THALLUS_LOG_LEVEL": "WARNING",
}
LATENCY_PATH = "/api/v1/auth/logout"


# -- databases ---------------------------------------------------------------------------------


def postgres_server_url() -> URL:
    return make_url(os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL))


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_execute(url: URL, *statements: str) -> None:
    connection = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@asynccontextmanager
async def postgres_database(purpose: str) -> AsyncIterator[tuple[URL | None, str | None]]:
    """A database of this run's own on the configured server (as ``tests/databases.py`` makes
    one), dropped at the end; ``(None, reason)`` when the server does not answer."""
    server = postgres_server_url()
    name = f"thallus_bench_audit_{purpose}_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        await _pg_execute(server, f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        shown = server.render_as_string(hide_password=True)
        yield None, f"PostgreSQL at {shown} is not reachable ({type(exc).__name__}: {exc})"
        return
    progress(f"created PostgreSQL database {name}")
    try:
        yield server.set(database=name), None
    finally:
        await _pg_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        progress(f"dropped PostgreSQL database {name}")


@asynccontextmanager
async def backend_database(backend: str, purpose: str) -> AsyncIterator[tuple[str | None, str | None]]:
    """A SQLAlchemy URL of an empty database for ``backend``, removed at the end, or (None, reason)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix=f"thallus-bench-audit-{purpose}-") as directory:
            yield f"sqlite+aiosqlite:///{directory}/audit.db", None
        return
    async with postgres_database(purpose) as (url, reason):
        yield (url.render_as_string(hide_password=False) if url is not None else None), reason


# -- the data ----------------------------------------------------------------------------------

USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "python-requests/2.32.3",
    "curl/8.5.0",
)
#: Kinds of state-changing request and their share; each gives one ``request`` record, some an
#: identity/security event before it (same correlation ID), as the real layers do.
KINDS: tuple[tuple[str, float], ...] = (
    ("write", 0.564),
    ("refresh", 0.14),
    ("login", 0.10),
    ("logout", 0.06),
    ("login_failed", 0.05),
    ("rate_limited", 0.03),
    ("csrf_rejected", 0.02),
    ("permission_denied", 0.01),
    ("api_key_create", 0.008),
    ("api_key_revoke", 0.005),
    ("password_change", 0.004),
    ("cors_rejected", 0.004),
    ("account_locked", 0.003),
    ("account_unlocked", 0.001),
    ("token_reuse_detected", 0.001),
)

#: ``write`` and ``refresh`` give only their ``request`` record, every other kind an event too.
RECORDS_PER_REQUEST = 1 + sum(weight for name, weight in KINDS if name not in ("write", "refresh")) / sum(
    weight for _, weight in KINDS
)


def uuid7_at(nanoseconds: int, rng: random.Random) -> str:
    """A UUIDv7 for an instant (as ``thallus.correlation.uuid7`` mints them, but for a given time)."""
    milliseconds, remainder = divmod(nanoseconds, 1_000_000)
    stamp = (milliseconds << 12) | (remainder * 4096 // 1_000_000)
    value = ((stamp >> 12) << 80) | (0x7 << 76) | ((stamp & 0xFFF) << 64) | (0b10 << 62) | rng.getrandbits(62)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True)
class Targets:
    """Values the query filters look for, taken from the middle of the generated data."""

    anchor: datetime  # the newest record is about here
    user_id: str  # a user of middling activity
    correlation_id: str
    session_id: str  # a session created by a login (resource_type "session")


class AuditData:
    """``rows`` valid chained records, the same for every backend (seeded ``random``).

    Records are made in the shape the store reads back (every §11 field, ``created_at`` an aware
    datetime) and linked with the chain's ``link_hash``: ``verify()`` must pass over them.
    """

    def __init__(self, rows: int, anchor: datetime, seed: int = 20261129) -> None:
        self.rows = rows
        self.anchor = anchor
        self.seed = seed
        self.head: tuple[int, str] = (0, GENESIS_HASH)
        self.build_seconds = 0.0
        self._targets: dict[str, str] = {}

    def _setup(self, rng: random.Random) -> None:
        start_ns = int((self.anchor - SPAN - timedelta(days=365)).timestamp() * 1e9)
        self.users = [uuid7_at(start_ns + i * 31_000_000_000, rng) for i in range(USERS)]
        # a skewed activity: some users do much more than others
        order = list(range(USERS))  # order[rank] is the user of that activity rank
        rng.shuffle(order)
        weights = [0.0] * USERS
        for rank, user in enumerate(order):
            weights[user] = 1 / (rank + 1) ** 0.7
        self.user_weights = list(_cumulative(weights))
        self.middle_user = self.users[order[USERS // 2]]
        self.user_ips = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in self.users]
        self.user_agents = [rng.choice(USER_AGENTS) for _ in self.users]
        self.sessions: dict[str, str] = {}
        self.api_keys: dict[str, str] = {}
        self.kind_names = [name for name, _ in KINDS]
        self.kind_weights = list(_cumulative(weight for _, weight in KINDS))

    def targets(self) -> Targets:
        """What the filters look for; known once the data has been made (by :meth:`batches`)."""
        if self.head[0] != self.rows:
            for _ in self.batches(10_000):
                pass
        found = self._targets
        # with very few rows a target may be missing: the filter then matches nothing, still a query
        return Targets(
            self.anchor,
            found.get("user_id", self.middle_user),
            found.get("correlation_id", "none"),
            found.get("session_id", "none"),
        )

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """The records in chain order, ``size`` at a time, each with ``seq``, ``prev_hash``, ``hash``."""
        rng = random.Random(self.seed)
        self._setup(rng)
        self.build_seconds = 0.0
        started = time.perf_counter()
        base = self.anchor - SPAN
        step = SPAN.total_seconds() / (self.rows / RECORDS_PER_REQUEST)  # per request: the rows span SPAN
        clock = 0.0
        seq, previous = 0, GENESIS_HASH
        batch: list[dict[str, Any]] = []
        while seq < self.rows:
            clock += rng.expovariate(1 / step)
            when = base + timedelta(seconds=clock)
            middle = seq >= self.rows // 2
            for record in self._request(rng, when, middle):
                if seq == self.rows:
                    break
                seq += 1
                digest = link_hash(previous, record, seq)
                record["seq"], record["prev_hash"], record["hash"] = seq, previous, digest
                previous = digest
                batch.append(record)
            if len(batch) >= size or seq == self.rows:
                self.build_seconds += time.perf_counter() - started
                yield batch
                batch = []
                started = time.perf_counter()
        self.head = (seq, previous)

    def _request(self, rng: random.Random, when: datetime, middle: bool) -> list[dict[str, Any]]:
        """The records of one state-changing request: perhaps an event, then its ``request`` record."""
        kind = rng.choices(self.kind_names, cum_weights=self.kind_weights)[0]
        index = rng.choices(range(USERS), cum_weights=self.user_weights)[0]
        user = self.users[index]
        nanoseconds = int(when.timestamp() * 1e9)
        correlation_id = uuid7_at(nanoseconds, rng)
        common = {
            "correlation_id": correlation_id,
            "ip_address": self.user_ips[index] if rng.random() < 0.9 else f"198.51.100.{rng.randrange(1, 255)}",
            "user_agent": self.user_agents[index],
            "created_at": when,
        }
        auth = "api_key" if rng.random() < 0.15 else "session"
        via: dict[str, Any] = {"auth_method": auth}
        if auth == "api_key":
            via["api_key_id"] = self.api_keys.setdefault(user, uuid7_at(nanoseconds - 86_400_000_000_000, rng))
        event_record: dict[str, Any] | None = None
        request_user: str | None = user
        details: dict[str, Any] = via
        method, path, status = "POST", "/api/v1/items", 201

        def event(action: str, outcome: str, **fields: Any) -> dict[str, Any]:
            return {"action": action, "outcome": outcome, "user_id": user, **fields}

        if kind == "write":
            method = rng.choice(("POST", "POST", "PUT", "PATCH", "DELETE"))
            path = "/api/v1/items" if method == "POST" else f"/api/v1/items/{rng.randrange(1, 100_000)}"
            status = {"POST": 201, "PUT": 200, "PATCH": 200, "DELETE": 204}[method]
            if rng.random() < 0.04:
                status = rng.choice((400, 404, 409, 422))
        elif kind == "refresh":
            path, status, request_user, details = "/api/v1/auth/refresh", 200, None, {"auth_method": None}
            if rng.random() < 0.05:
                status = 401
        elif kind == "login":
            session = uuid7_at(nanoseconds, rng)
            self.sessions[user] = session
            if middle and "session_id" not in self._targets:
                self._targets["session_id"] = session
            event_record = event("login", "success", resource_type="session", resource_id=session)
            path, status, request_user, details = "/api/v1/auth/login", 200, None, {"auth_method": None}
        elif kind == "logout":
            session = self.sessions.pop(user, "") or uuid7_at(nanoseconds - 3_600_000_000_000, rng)
            event_record = event("logout", "success", resource_type="session", resource_id=session)
            path, status, details = "/api/v1/auth/logout", 204, {"auth_method": "session"}
        elif kind == "login_failed":
            if rng.random() < 0.7:
                event_record = event("login_failed", "denied", details={"reason": "wrong password"})
            else:
                address = f"user{rng.randrange(100_000)}@example.com"
                event_record = event("login_failed", "failure", user_id=None, details={"email": address})
            path, status, request_user, details = "/api/v1/auth/login", 401, None, {"auth_method": None}
        elif kind in ("rate_limited", "csrf_rejected", "cors_rejected"):
            status = 429 if kind == "rate_limited" else 403
            reason = {"rate_limited": {"policy": "general"}, "csrf_rejected": {"reason": "origin not trusted"}}
            event_record = event(
                kind,
                "denied",
                user_id=None,
                status_code=status,
                details=reason.get(kind, {"origin": "https://evil.example"}),
                method=method,
                path=path,
            )
            request_user, details = None, {"auth_method": None}
        elif kind == "permission_denied":
            event_record = event("permission_denied", "denied", details={"needs": "api_access"})
            path, status = "/api/v1/api-keys", 403
        elif kind == "api_key_create":
            key = uuid7_at(nanoseconds, rng)
            self.api_keys[user] = key
            preview = f"thk_{rng.getrandbits(16):04x}…{rng.getrandbits(16):04x}"
            event_record = event(
                "api_key_create",
                "success",
                resource_type="api_key",
                resource_id=key,
                details={"name": "ci deploy", "preview": preview, "auth_method": "session"},
            )
            path, details = "/api/v1/api-keys", {"auth_method": "session"}
        elif kind == "api_key_revoke":
            key = self.api_keys.pop(user, "") or uuid7_at(nanoseconds - 86_400_000_000_000, rng)
            event_record = event("api_key_revoke", "success", resource_type="api_key", resource_id=key)
            method, path, status, details = "DELETE", f"/api/v1/api-keys/{key}", 204, {"auth_method": "session"}
        elif kind == "password_change":
            ok = rng.random() < 0.8
            event_record = event(
                "password_change",
                "success" if ok else "failure",
                error_message=None if ok else "wrong current password",
            )
            path, status, details = "/api/v1/auth/password", 204 if ok else 401, {"auth_method": "session"}
        elif kind == "account_locked":
            event_record = event("account_locked", "denied", details={"failures": 5, "seconds": 900})
            path, status, request_user, details = "/api/v1/auth/login", 401, None, {"auth_method": None}
        elif kind == "account_unlocked":
            admin = self.users[0]
            event_record = event(
                "account_unlocked", "success", user_id=user, resource_type="user", resource_id=user
            ) | {"details": {"by": admin}}
            method, path, status, request_user = "POST", f"/api/v1/admin/users/{user}/unlock", 204, admin
        else:  # token_reuse_detected
            session = self.sessions.pop(user, "") or uuid7_at(nanoseconds - 3_600_000_000_000, rng)
            event_record = event(
                "token_reuse_detected",
                "denied",
                resource_type="session",
                resource_id=session,
                details={"session_id": session},
            )
            path, status, request_user, details = "/api/v1/auth/refresh", 401, None, {"auth_method": None}

        records: list[dict[str, Any]] = []
        if event_record is not None:
            event_record.setdefault("method", method)
            event_record.setdefault("path", path)
            records.append(_record(rng, nanoseconds - 400_000, common | event_record))
        outcome = "success" if status < 400 else ("denied" if status in (401, 403, 429) else "failure")
        request = {
            "action": "request",
            "outcome": outcome,
            "user_id": request_user,
            "details": details,
            "method": method,
            "path": path,
            "status_code": status,
            "duration_ms": round(rng.lognormvariate(1.5, 0.8), 3),
        }
        records.append(_record(rng, nanoseconds, common | request))
        if middle and "correlation_id" not in self._targets and event_record is not None:
            self._targets["correlation_id"] = correlation_id
        if middle and user == self.middle_user:
            self._targets.setdefault("user_id", user)
        return records


def _record(rng: random.Random, nanoseconds: int, fields: dict[str, Any]) -> dict[str, Any]:
    """A record in the shape the store reads back: every §11 field, ``created_at`` a datetime."""
    return {
        "id": uuid7_at(nanoseconds, rng),
        "action": fields["action"],
        "user_id": fields.get("user_id"),
        "outcome": fields["outcome"],
        "resource_type": fields.get("resource_type"),
        "resource_id": fields.get("resource_id"),
        "correlation_id": fields["correlation_id"],
        "details": fields.get("details"),
        "error_message": fields.get("error_message"),
        "ip_address": fields["ip_address"],
        "user_agent": fields["user_agent"],
        "method": fields.get("method"),
        "path": fields.get("path"),
        "status_code": fields.get("status_code"),
        "duration_ms": fields.get("duration_ms"),
        "created_at": fields["created_at"],
    }


def _cumulative(values: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


# -- seeding -----------------------------------------------------------------------------------


@dataclass
class Seeding:
    rows: int
    seconds: float  # everything: generating, hashing, inserting, the chain head (and ANALYZE)
    build_seconds: float  # generating the records and their hashes
    insert_seconds: float
    analyze_seconds: float | None
    method: str
    database_mb: float | None = None


async def seed(database: Database, url: str, data: AuditData, batch: int) -> Seeding:
    """Bulk-insert ``data`` into the migrated database, then point the chain head at its last record."""
    started = time.perf_counter()
    inserting = 0.0
    analyze: float | None = None
    if database.dialect == "postgresql":
        method = f"asyncpg copy_records_to_table, {batch:,} rows per COPY, then VACUUM (ANALYZE) audit_logs"
        connection = await asyncpg.connect(_dsn(make_url(url)), timeout=10)
        try:
            done = 0
            for rows in data.batches(batch):
                mark = time.perf_counter()
                records = [
                    tuple(json.dumps(row[c]) if c == "details" and row[c] is not None else row[c] for c in COPY_COLUMNS)
                    for row in rows
                ]
                await connection.copy_records_to_table("audit_logs", records=records, columns=COPY_COLUMNS)
                inserting += time.perf_counter() - mark
                done += len(rows)
                _seed_progress(done, data.rows, started)
            mark = time.perf_counter()
            # autovacuum analyses a table growing like this one on its own; after a bulk load it
            # has not yet, and the planner would work without statistics
            await connection.execute("VACUUM (ANALYZE) audit_logs")
            analyze = time.perf_counter() - mark
        finally:
            await connection.close()
    else:
        method = f"SQLAlchemy insert(AuditLog), executemany of {batch:,} rows per statement and transaction"
        done = 0
        for rows in data.batches(batch):
            mark = time.perf_counter()
            async with database.engine.begin() as connection:
                await connection.execute(insert(AuditLog), rows)
            inserting += time.perf_counter() - mark
            done += len(rows)
            _seed_progress(done, data.rows, started)
    last_seq, last_hash = data.head
    async with database.engine.begin() as connection:
        await connection.execute(
            update(AuditChainHead)
            .where(AuditChainHead.id == 1)
            .values(seq=last_seq, hash=last_hash, updated_at=utcnow())
        )
    return Seeding(
        rows=data.rows,
        seconds=time.perf_counter() - started,
        build_seconds=data.build_seconds,
        insert_seconds=inserting,
        analyze_seconds=analyze,
        method=method,
    )


def _seed_progress(done: int, total: int, started: float) -> None:
    if done % 100_000 < 10_000 or done == total:
        progress(f"  seeded {done:>9,} / {total:,} rows ({time.perf_counter() - started:.0f} s)")


async def database_size_mb(database: Database, url: str) -> float | None:
    if database.dialect == "postgresql":
        connection = await asyncpg.connect(_dsn(make_url(url)), timeout=5)
        try:
            size = await connection.fetchval("SELECT pg_total_relation_size('audit_logs')")
        finally:
            await connection.close()
        return int(size) / 2**20
    path = make_url(url).database
    if not path:
        return None
    return sum(Path(path + suffix).stat().st_size for suffix in ("", "-wal") if Path(path + suffix).exists()) / 2**20


# -- queries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryCase:
    name: str
    filters: AuditFilter
    #: the index the migration made for this filter, for the report
    index: str


def query_cases(targets: Targets) -> list[QueryCase]:
    anchor = targets.anchor
    day_start = anchor - timedelta(days=45)
    return [
        QueryCase("none", AuditFilter(), "primary key (seq)"),
        QueryCase("user_id", AuditFilter(user_id=targets.user_id), "ix_audit_logs_user_id_seq"),
        QueryCase("action=request (common)", AuditFilter(actions=("request",)), "ix_audit_logs_action_seq"),
        QueryCase("action=account_locked (rare)", AuditFilter(actions=("account_locked",)), "ix_audit_logs_action_seq"),
        QueryCase(
            "actions=login,login_failed", AuditFilter(actions=("login", "login_failed")), "ix_audit_logs_action_seq"
        ),
        QueryCase(
            "actions=api_key_create,api_key_revoke (rare)",
            AuditFilter(actions=("api_key_create", "api_key_revoke")),
            "ix_audit_logs_action_seq",
        ),
        QueryCase("outcome=denied", AuditFilter(outcome="denied"), "ix_audit_logs_outcome_seq"),
        QueryCase("correlation_id", AuditFilter(correlation_id=targets.correlation_id), "ix_audit_logs_correlation_id"),
        QueryCase(
            "resource_type+resource_id",
            AuditFilter(resource_type="session", resource_id=targets.session_id),
            "ix_audit_logs_resource_seq",
        ),
        QueryCase(
            "start+end (one day, 45 days ago)",
            AuditFilter(start=day_start, end=day_start + timedelta(days=1)),
            "ix_audit_logs_created_at",
        ),
        QueryCase("start (last 7 days)", AuditFilter(start=anchor - timedelta(days=7)), "ix_audit_logs_created_at"),
        QueryCase(
            "user_id+actions+start (30 days)",
            AuditFilter(user_id=targets.user_id, actions=("login", "login_failed"), start=anchor - timedelta(days=30)),
            "ix_audit_logs_user_id_seq",
        ),
        QueryCase(
            "action=request+start+end (one day)",
            AuditFilter(actions=("request",), start=day_start, end=day_start + timedelta(days=1)),
            "ix_audit_logs_action_seq / ix_audit_logs_created_at",
        ),
        QueryCase(
            "outcome=denied+start+end (one day)",
            AuditFilter(outcome="denied", start=day_start, end=day_start + timedelta(days=1)),
            "ix_audit_logs_outcome_seq / ix_audit_logs_created_at",
        ),
    ]


class StatementCapture:
    """Records the SQL and parameters the store sends, to ``EXPLAIN`` exactly that statement."""

    def __init__(self, database: Database) -> None:
        self.active = False
        self.statements: list[tuple[str, Any]] = []
        event.listen(database.engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, *context: Any) -> None:
        if self.active:
            self.statements.append((statement, parameters))


@dataclass
class QueryResult:
    name: str
    index: str
    matching: int
    page1_ms: float
    page2_ms: float | None
    page1_runs_ms: list[float]
    page2_runs_ms: list[float]
    returned: int
    plans: dict[str, list[str]] = field(default_factory=dict)


async def _timed(call: Callable[[], Awaitable[T]], repeat: int, warmups: int = WARMUPS) -> tuple[list[float], T]:
    for _ in range(warmups):
        result = await call()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await call()
        runs.append((time.perf_counter() - started) * 1000)
    return runs, result


async def explain(database: Database, statement: str, parameters: Any) -> dict[str, list[str]]:
    """The plan of a statement the store sent, with its parameters.

    On PostgreSQL, ``EXPLAIN (ANALYZE, BUFFERS)`` with the values (the custom plan of the first five
    executions of a prepared statement) and the generic plan, which the plan cache may use from the
    sixth on (``plan_cache_mode = force_generic_plan`` on a ``PREPARE``d copy).
    """
    async with database.engine.connect() as connection:
        if database.dialect == "postgresql":
            custom = await connection.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plans = {"custom plan": [str(row[0]) for row in custom]}
            values = ", ".join(_literal(value) for value in parameters)
            await connection.exec_driver_sql("PREPARE bench_audit_plan AS " + statement)
            try:
                await connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
                generic = await connection.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_audit_plan({values})"
                )
                plans["generic plan"] = [str(row[0]) for row in generic]
            finally:
                await connection.exec_driver_sql("DEALLOCATE bench_audit_plan")
                await connection.exec_driver_sql("RESET plan_cache_mode")
            return plans
        plan = await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        depth: dict[int, int] = {0: -1}
        lines = []
        for row in plan:
            node, parent, _, detail = tuple(row)  # SQLite: id, parent, notused, detail
            node, parent = int(node), int(parent)
            depth[node] = depth.get(parent, -1) + 1
            lines.append("  " * depth[node] + str(detail))
        return {"plan": lines}


def _literal(value: Any) -> str:
    """A parameter as a SQL literal (the statement casts each placeholder to its type)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


async def run_queries(
    database: Database, store: AuditStore, cases: Sequence[QueryCase], repeat: int, slow_ms: float
) -> list[QueryResult]:
    capture = StatementCapture(database)
    results = []
    for case in cases:
        async with database.session() as db:
            matching = int(await db.scalar(case.filters.apply(select(func.count()).select_from(AuditLog))) or 0)

        async def page1(case: QueryCase = case) -> list[AuditLog]:
            return await store.query(case.filters, limit=PAGE)

        runs1, rows = await _timed(page1, repeat)
        runs2: list[float] = []
        before = rows[-1].seq if len(rows) == PAGE else None
        if before is not None:

            async def page2(case: QueryCase = case, before: int = before) -> list[AuditLog]:
                return await store.query(case.filters, limit=PAGE, before_seq=before)

            runs2, _ = await _timed(page2, repeat)
        result = QueryResult(
            name=case.name,
            index=case.index,
            matching=matching,
            page1_ms=statistics.median(runs1),
            page2_ms=statistics.median(runs2) if runs2 else None,
            page1_runs_ms=[round(run, 3) for run in runs1],
            page2_runs_ms=[round(run, 3) for run in runs2],
            returned=len(rows),
        )
        # the plan of every query (it is cheap); the table prints those of the slow ones
        for label, before_seq in (("page 1", None), ("page 2", before)):
            if label == "page 2" and before_seq is None:
                continue
            capture.statements.clear()
            capture.active = True
            try:
                await store.query(case.filters, limit=PAGE, before_seq=before_seq)
            finally:
                capture.active = False
            selects = [(sql, params) for sql, params in capture.statements if sql.lstrip().upper().startswith("SELECT")]
            if selects:
                for kind, lines in (await explain(database, *selects[-1])).items():
                    result.plans[f"{label} {kind}"] = lines
        results.append(result)
        second = f"{result.page2_ms:8.2f}" if result.page2_ms is not None else "       -"
        slow = " SLOW" if max(result.page1_ms, result.page2_ms or 0) > slow_ms else ""
        progress(f"  {case.name:<46} {matching:>9,} rows  {result.page1_ms:8.2f} ms  {second} ms{slow}")
    return results


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    seconds: float
    reason: str | None


# -- export ------------------------------------------------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class ExportResult:
    format: str
    rows: int
    bytes: int
    seconds: float
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_mb: float
    #: RSS at 10 %, 20 %, …, 100 % of the rows
    rss_profile_mb: list[float]

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_start_mb

    @property
    def growth_after_10pct_mb(self) -> float:
        """Growth once the first tenth is exported: a leak keeps growing, a warm-up does not."""
        return self.rss_profile_mb[-1] - self.rss_profile_mb[0]


async def run_export(store: AuditStore, fmt: str, total: int) -> ExportResult:
    gc.collect()
    start_rss = peak = rss_bytes()
    profile: list[float] = []
    marks = [max(1, total * tenth // 10) for tenth in range(1, 11)]
    size = lines = 0
    header = 1 if fmt == "csv" else 0
    started = time.perf_counter()
    async for chunk in export_lines(store, AuditFilter(), fmt):
        size += len(chunk)
        lines += chunk.count(b"\n")
        now = rss_bytes()
        peak = max(peak, now)
        while marks and lines - header >= marks[0]:
            marks.pop(0)
            profile.append(now / 2**20)
        # the chunk is dropped here, as a client that reads and discards would
    seconds = time.perf_counter() - started
    end = rss_bytes()
    rows = lines - header
    if len(profile) < 10:
        profile.append(end / 2**20)
    return ExportResult(
        format=fmt,
        rows=rows,
        bytes=size,
        seconds=seconds,
        rss_start_mb=start_rss / 2**20,
        rss_peak_mb=peak / 2**20,
        rss_end_mb=end / 2**20,
        rss_profile_mb=[round(value, 1) for value in profile],
    )


# -- one backend: seed, query, verify, export -------------------------------------------------


async def database_part(backend: str, options: argparse.Namespace, anchor: datetime) -> dict[str, Any]:
    parts = {"queries", "export"} if options.part == "all" else {options.part}
    async with backend_database(backend, "data") as (url, reason):
        if url is None:
            progress(f"{backend}: skipped: {reason}")
            return {"available": False, "reason": reason}
        progress(f"{backend}: migrating and seeding {options.rows:,} rows")
        database = Database(url)
        try:
            await database.migrate()
            data = AuditData(options.rows, anchor)
            seeding = await seed(database, url, data, options.batch)
            if backend == "sqlite" and options.sqlite_analyze:
                async with database.engine.begin() as connection:
                    await connection.exec_driver_sql("ANALYZE")
                seeding.method += ", then ANALYZE (--sqlite-analyze)"
            elif backend == "sqlite":
                seeding.method += "; no ANALYZE (Thallus runs none: the planner has no statistics)"
            seeding.database_mb = await database_size_mb(database, url)
            progress(
                f"{backend}: seeded in {seeding.seconds:.1f} s (records and hashes {seeding.build_seconds:.1f} s, "
                f"insert {seeding.insert_seconds:.1f} s)"
            )
            store = AuditStore(database)
            document: dict[str, Any] = {"available": True, "reason": None, "seeding": asdict(seeding)}
            if "queries" in parts:
                targets = data.targets()
                document["targets"] = {
                    "user_id": targets.user_id,
                    "correlation_id": targets.correlation_id,
                    "session_id": targets.session_id,
                }
                progress(f"{backend}: timing queries (median of {options.repeat})")
                results = await run_queries(database, store, query_cases(targets), options.repeat, options.slow_ms)
                document["queries"] = [asdict(result) for result in results]
                runs, count = await _timed(store.count, options.repeat)
                document["count"] = {"rows": count, "ms": statistics.median(runs), "runs_ms": runs}
                progress(f"{backend}: verify() over {count:,} records")
                started = time.perf_counter()
                verification = await store.verify()
                document["verify"] = asdict(
                    VerifyResult(
                        verification.ok, verification.checked, time.perf_counter() - started, verification.reason
                    )
                )
                progress(f"{backend}: verify: {document['verify']}")
            if "export" in parts:
                document["export"] = []
                for fmt in ("jsonl", "csv"):
                    progress(f"{backend}: exporting {fmt}")
                    exported = await run_export(store, fmt, options.rows)
                    document["export"].append(
                        asdict(exported)
                        | {
                            "rows_per_second": exported.rows_per_second,
                            "growth_mb": exported.growth_mb,
                            "growth_after_10pct_mb": exported.growth_after_10pct_mb,
                        }
                    )
            return document
        finally:
            await database.dispose()


# -- latency -----------------------------------------------------------------------------------


@dataclass
class LoadRun:
    audit: bool
    repetition: int
    requests: int  # answered in the measured window
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int]  # every answer, warm-up included
    errors: int
    server_cpu_seconds: float
    client_cpu_seconds: float

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpxClient:
    """httpx's ``AsyncClient``: one connection pool, keep-alive."""

    errors = (httpx.HTTPError,)

    def __init__(self, url: str, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=30)

    async def post(self) -> int:
        return (await self.client.post(LATENCY_PATH)).status_code

    async def aclose(self) -> None:
        await self.client.aclose()


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the same request bytes each time,
    only the status line and ``content-length`` read back. Costs the client far less CPU than httpx,
    so on a small machine the server, not the client, sets the pace."""

    errors = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)

    def __init__(self, url: str, connections: int) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.request = (
            f"POST {LATENCY_PATH} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            "user-agent: bench-audit/raw\r\naccept: */*\r\ncontent-length: 0\r\n\r\n"
        ).encode()
        self.size = connections
        self.opened = 0
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def post(self) -> int:
        try:
            reader, writer = self.idle.get_nowait()
        except asyncio.QueueEmpty:
            if self.opened < self.size:
                self.opened += 1
                try:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                except BaseException:
                    self.opened -= 1
                    raise
            else:
                reader, writer = await self.idle.get()
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            self.opened -= 1
            raise
        self.idle.put_nowait((reader, writer))
        return status

    async def aclose(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()


CLIENTS: dict[str, type[HttpxClient] | type[RawClient]] = {"httpx": HttpxClient, "raw": RawClient}


async def load(
    url: str, pid: int, *, client_name: str, seconds: float, warmup: float, concurrency: int, rate: float
) -> LoadRun:
    """Closed loop (``rate`` 0): ``concurrency`` workers, each sending its next request once the
    last is answered. Open loop (``rate`` > 0): requests started on a fixed schedule, ``rate`` a
    second, over at most ``concurrency`` connections; latency counts from the scheduled start, so
    a request that waited for a connection counts its wait (no coordinated omission)."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    client = CLIENTS[client_name](url, concurrency)
    clock = time.perf_counter
    begin = clock()
    measure_from = begin + warmup
    stop = measure_from + seconds
    cpu: dict[str, float] = {}

    async def one(started: float) -> None:
        nonlocal errors
        try:
            status = await client.post()
        except client.errors:
            errors += 1
            return
        statuses[status] += 1
        if started >= measure_from:
            latencies.append((clock() - started) * 1000)

    async def worker() -> None:
        while (started := clock()) < stop:
            await one(started)

    async def scheduler() -> None:
        interval = 1 / rate
        pending: set[asyncio.Task[None]] = set()
        number = 0
        while (scheduled := begin + number * interval) < stop:
            number += 1
            if (delay := scheduled - clock()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - clock()))
        cpu["server"], cpu["client"] = process_cpu_seconds(pid), time.process_time()
        await asyncio.sleep(max(0.0, stop - clock()))
        cpu["server"] = process_cpu_seconds(pid) - cpu["server"]
        cpu["client"] = time.process_time() - cpu["client"]

    try:
        if rate > 0:
            await asyncio.gather(cpu_marks(), scheduler())
        else:
            await asyncio.gather(cpu_marks(), *(worker() for _ in range(concurrency)))
    finally:
        await client.aclose()
    return LoadRun(
        audit=False,
        repetition=0,
        requests=len(latencies),
        seconds=seconds,
        latencies_ms=latencies,
        statuses=dict(statuses),
        errors=errors,
        server_cpu_seconds=cpu.get("server", 0.0),
        client_cpu_seconds=cpu.get("client", 0.0),
    )


async def count_request_records(url: str) -> tuple[int, int | None]:
    """``request`` records in a server's database (read after the server has stopped), and on
    PostgreSQL how many appends (transactions) stored them: the rows one transaction inserted share
    its id, ``xmin``."""
    parsed = make_url(url)
    query = "SELECT count(*) FROM audit_logs WHERE action = 'request'"
    if parsed.get_backend_name() == "sqlite":
        with contextlib.closing(sqlite3.connect(parsed.database or "")) as connection:
            return int(connection.execute(query).fetchone()[0]), None
    connection = await asyncpg.connect(_dsn(parsed), timeout=5)
    try:
        appends = await connection.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM audit_logs WHERE action = 'request'"
        )
        return int(await connection.fetchval(query)), int(appends or 0)
    finally:
        await connection.close()


async def latency_part(backend: str, options: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # tests/ is importable from the repository root
    from tests.server import running_server

    async with backend_database(backend, "latency") as (url, reason):
        if url is None:
            progress(f"{backend}: latency skipped: {reason}")
            return {"available": False, "reason": reason}
        with ExitStack() as stack:
            servers = {}
            directories = {}
            for audit in (False, True):
                directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="thallus-bench-serve-"))
                directories[audit] = directory
                environment = SERVER_SETTINGS | {
                    "THALLUS_AUDIT_ENABLED": "true" if audit else "false",
                    "THALLUS_DATA_DIR": directory,
                }
                if backend == "postgresql":
                    environment["THALLUS_DATABASE_URL"] = url  # both servers share it; only one writes
                servers[audit] = stack.enter_context(running_server(environment))
            progress(
                f"{backend}: servers up (audit off: {servers[False].url}, on: {servers[True].url}); "
                f"{options.rounds} rounds of {options.seconds} s each, {options.client} client, "
                + (f"open loop at {options.rate:g} req/s" if options.rate else f"{options.concurrency} workers")
            )
            runs: list[LoadRun] = []
            for round_number in range(1, options.rounds + 1):
                for audit in (False, True):
                    gc.collect()
                    run = await load(
                        servers[audit].url,
                        servers[audit].process.pid,
                        client_name=options.client,
                        rate=options.rate,
                        seconds=options.seconds,
                        warmup=options.warmup,
                        concurrency=options.concurrency,
                    )
                    run.audit, run.repetition = audit, round_number
                    runs.append(run)
                    ordered = sorted(run.latencies_ms)
                    progress(
                        f"  round {round_number} audit {'on ' if audit else 'off'}: {run.requests / run.seconds:7.0f} "
                        f"req/s  p50 {percentile(ordered, 0.5):6.2f}  p99 {percentile(ordered, 0.99):6.2f} ms  "
                        f"statuses {run.statuses}  errors {run.errors}"
                    )
            outputs = {audit: servers[audit].output() for audit in (False, True)}  # stops them (flushes)
            record_url = url if backend == "postgresql" else f"sqlite+aiosqlite:///{directories[True]}/thallus.db"
            stored, appends = await count_request_records(record_url)
            journals = sorted(p.name for p in (Path(directories[True]) / "audit-journal").glob("*.jsonl"))
            answered_on = sum(run.answered for run in runs if run.audit)
            errors_on = sum(run.errors for run in runs if run.audit)
        return {
            "available": True,
            "reason": None,
            "runs": [_run_document(run) for run in runs],
            "summary": {label: _summary([run for run in runs if run.audit is audit]) for label, audit in AUDIT_LABELS},
            "audit_check": {
                "answered": answered_on,
                "errors": errors_on,
                "request_records": stored,
                "appends": appends,
                "journal_files_left": journals,
            },
            "server_output": {label: outputs[audit][-2000:] for label, audit in AUDIT_LABELS},
        }


AUDIT_LABELS = (("off", False), ("on", True))


def _run_document(run: LoadRun) -> dict[str, Any]:
    ordered = sorted(run.latencies_ms)
    return {
        "audit": run.audit,
        "round": run.repetition,
        "requests": run.requests,
        "seconds": run.seconds,
        "requests_per_second": run.requests / run.seconds,
        "p50_ms": percentile(ordered, 0.50),
        "p90_ms": percentile(ordered, 0.90),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else math.nan,
        "statuses": {str(status): count for status, count in sorted(run.statuses.items())},
        "errors": run.errors,
        "server_cpu_us_per_request": run.server_cpu_seconds / run.requests * 1e6 if run.requests else math.nan,
        "client_cpu_share": run.client_cpu_seconds / run.seconds,
        "server_cpu_share": run.server_cpu_seconds / run.seconds,
    }


def _summary(runs: Sequence[LoadRun]) -> dict[str, Any]:
    """All rounds of one server pooled."""
    ordered = sorted(value for run in runs for value in run.latencies_ms)
    requests = sum(run.requests for run in runs)
    seconds = sum(run.seconds for run in runs)
    server_cpu = sum(run.server_cpu_seconds for run in runs)
    return {
        "requests": requests,
        "requests_per_second": requests / seconds,
        "p50_ms": percentile(ordered, 0.50),
        "p90_ms": percentile(ordered, 0.90),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else math.nan,
        "p99_per_round_ms": [percentile(sorted(run.latencies_ms), 0.99) for run in runs],
        "server_cpu_us_per_request": server_cpu / requests * 1e6 if requests else math.nan,
        "client_cpu_share": sum(run.client_cpu_seconds for run in runs) / seconds,
        "server_cpu_share": server_cpu / seconds,
    }


# -- reporting ---------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for index, row in enumerate([header, *rows]):
        cells = [
            value.ljust(width) if column < left else value.rjust(width)
            for column, (value, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def render(document: dict[str, Any]) -> str:
    env = document["environment"]
    options = document["options"]
    lines = [
        *describe(env),
        f"part: {options['part']}; {options['rows']:,} rows; PostgreSQL server: {document['postgres_server']}",
    ]
    data = document.get("databases", {})
    available = [backend for backend in BACKENDS if data.get(backend, {}).get("available")]
    for backend in BACKENDS:
        if backend in data and not data[backend]["available"]:
            lines.append(f"{backend}: skipped: {data[backend]['reason']}")
    if available:
        lines += ["", "Seeding (migrate, bulk insert of valid chained records, chain head)", ""]
        rows = []
        for backend in available:
            seeding = data[backend]["seeding"]
            rows.append(
                (
                    backend,
                    f"{seeding['rows']:,}",
                    f"{seeding['seconds']:.1f}",
                    f"{seeding['build_seconds']:.1f}",
                    f"{seeding['insert_seconds']:.1f}",
                    f"{seeding['analyze_seconds']:.1f}" if seeding["analyze_seconds"] is not None else "-",
                    f"{seeding['rows'] / seeding['seconds']:,.0f}",
                    f"{seeding['database_mb']:.0f}" if seeding["database_mb"] is not None else "-",
                )
            )
        header = ("backend", "rows", "total s", "records+hash s", "insert s", "analyze s", "rows/s", "MB with indexes")
        lines += _table(header, rows, left=1)
        lines += [""] + [f"{backend}: {data[backend]['seeding']['method']}" for backend in available]
    if any("queries" in data[backend] for backend in available):
        lines += _render_queries(data, available, options)
    if any("export" in data[backend] for backend in available):
        lines += _render_export(data, available)
    if "latency" in document:
        lines += _render_latency(document["latency"], options)
    return "\n".join(lines)


def _render_queries(data: dict[str, Any], available: Sequence[str], options: dict[str, Any]) -> list[str]:
    with_queries = [backend for backend in available if "queries" in data[backend]]
    lines = [
        "",
        f"AuditStore.query(filter, limit={PAGE}), newest first: median ms of {options['repeat']} runs after "
        f"{options['warmup_executions']} untimed ones; page 2 = before_seq of page 1's last record; "
        "matching = rows the filter selects",
        "",
    ]
    header = ["filter", "matching"]
    for backend in with_queries:
        header += [f"{backend} p1 ms", f"{backend} p2 ms"]
    rows = []
    cases = [result["name"] for result in data[with_queries[0]]["queries"]]
    by_backend = {backend: {r["name"]: r for r in data[backend]["queries"]} for backend in with_queries}
    for name in cases:
        row = [name, f"{by_backend[with_queries[0]][name]['matching']:,}"]
        for backend in with_queries:
            result = by_backend[backend][name]
            row += [_ms(result["page1_ms"]), _ms(result["page2_ms"])]
        rows.append(row)
    count_row = ["count()", ""]
    verify_row = ["verify() (s, once)", ""]
    for backend in with_queries:
        count_row += [_ms(data[backend]["count"]["ms"]), ""]
        verification = data[backend]["verify"]
        state = "ok" if verification["ok"] else f"BROKEN: {verification['reason']}"
        verify_row += [f"{verification['seconds']:.1f} {state}", ""]
    rows += [count_row, verify_row]
    lines += _table(header, rows, left=1)
    for backend in with_queries:
        verification = data[backend]["verify"]
        lines.append(
            f"{backend}: verify() checked {verification['checked']:,} records in {verification['seconds']:.1f} s "
            f"({verification['checked'] / verification['seconds']:,.0f} records/s)"
        )
    slow = options["slow_ms"]
    for backend in with_queries:
        for result in data[backend]["queries"]:
            for label, key in (("page 1", "page1_ms"), ("page 2", "page2_ms")):
                value = result[key]
                if value is None or (value <= slow and not options["plans"]):
                    continue
                mark = "SLOW " if value > slow else ""
                lines += [
                    "",
                    f"{mark}{backend} / {result['name']} / {label}: {value:.2f} ms "
                    f"(index for this filter: {result['index']})",
                ]
                for name, plan in result["plans"].items():
                    if name.startswith(label):
                        lines += [f"  {name.removeprefix(label).strip()}:", *("    " + line for line in plan)]
    return lines


def _render_export(data: dict[str, Any], available: Sequence[str]) -> list[str]:
    lines = [
        "",
        "export_lines(store, AuditFilter(), format): every record streamed, output dropped; RSS sampled per chunk",
        "",
    ]
    header = (
        "backend",
        "format",
        "rows",
        "MB out",
        "s",
        "rows/s",
        "RSS start MB",
        "peak MB",
        "growth MB",
        "after 10% MB",
    )
    rows = []
    profiles = []
    for backend in available:
        for result in data[backend].get("export", []):
            rows.append(
                (
                    backend,
                    result["format"],
                    f"{result['rows']:,}",
                    f"{result['bytes'] / 2**20:.0f}",
                    f"{result['seconds']:.1f}",
                    f"{result['rows_per_second']:,.0f}",
                    f"{result['rss_start_mb']:.1f}",
                    f"{result['rss_peak_mb']:.1f}",
                    f"{result['growth_mb']:+.1f}",
                    f"{result['growth_after_10pct_mb']:+.1f}",
                )
            )
            profile = " ".join(f"{value:.0f}" for value in result["rss_profile_mb"])
            profiles.append(f"{backend} {result['format']}: RSS MB at 10%, 20%, … 100%: {profile}")
    lines += _table(header, rows, left=2)
    lines += ["", *profiles]
    return lines


def _render_latency(latency: dict[str, Any], options: dict[str, Any]) -> list[str]:
    if options["rate"]:
        loop = f"open loop at {options['rate']:g} req/s over at most {options['concurrency']} connections"
    else:
        loop = f"closed loop, {options['concurrency']} concurrent workers"
    lines = [
        "",
        f"POST {LATENCY_PATH} over loopback to `thallus serve` (1 worker), audit off vs on: {loop}, "
        f"{options['client']} client, {options['rounds']} rounds x {options['seconds']} s per server "
        f"(after {options['warmup']} s warm-up each), interleaved off, on, off, on; all rounds pooled",
        "",
    ]
    header = (
        "backend",
        "audit",
        "requests",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p99 per round",
        "server CPU µs/req",
        "server CPU",
        "client CPU",
    )
    rows = []
    notes = []
    for backend in BACKENDS:
        result = latency.get(backend)
        if result is None:
            continue
        if not result["available"]:
            notes.append(f"{backend}: skipped: {result['reason']}")
            continue
        for label, _ in AUDIT_LABELS:
            summary = result["summary"][label]
            rows.append(
                (
                    backend,
                    label,
                    f"{summary['requests']:,}",
                    f"{summary['requests_per_second']:,.0f}",
                    _ms(summary["p50_ms"]),
                    _ms(summary["p90_ms"]),
                    _ms(summary["p99_ms"]),
                    _ms(summary["max_ms"]),
                    " ".join(_ms(value) for value in summary["p99_per_round_ms"]),
                    f"{summary['server_cpu_us_per_request']:.0f}",
                    f"{summary['server_cpu_share']:.0%}",
                    f"{summary['client_cpu_share']:.0%}",
                )
            )
        off, on = result["summary"]["off"], result["summary"]["on"]
        check = result["audit_check"]
        complete = check["request_records"] == check["answered"] and not check["errors"]
        round_ratios = [
            on_p99 / off_p99 for off_p99, on_p99 in zip(off["p99_per_round_ms"], on["p99_per_round_ms"], strict=True)
        ]
        notes += [
            f"{backend}: p99 on/off = {on['p99_ms'] / off['p99_ms']:.3f} (target <= 1.10; per round "
            f"{' '.join(f'{ratio:.2f}' for ratio in round_ratios)}, median {statistics.median(round_ratios):.2f}); "
            f"p50 on/off = {on['p50_ms'] / off['p50_ms']:.3f}; "
            f"throughput on/off = {on['requests_per_second'] / off['requests_per_second']:.3f}; "
            f"server CPU per request +{on['server_cpu_us_per_request'] - off['server_cpu_us_per_request']:.0f} µs",
            f"{backend}: audit-on server answered {check['answered']:,} requests (warm-ups included, "
            f"{check['errors']} transport errors) and stored {check['request_records']:,} `request` records: "
            f"{'one per request' if complete else 'MISMATCH'}"
            + (f"; journal files left: {check['journal_files_left']}" if check["journal_files_left"] else "")
            + (
                f"; {check['appends']:,} appends, {check['request_records'] / check['appends']:.1f} records each"
                if check.get("appends")
                else ""
            ),
        ]
        for label, output in result["server_output"].items():
            if output.strip():
                notes.append(f"{backend}: audit-{label} server wrote: " + " | ".join(output.strip().splitlines()[-5:]))
    lines += _table(header, rows, left=2)
    lines += ["", *notes]
    return lines


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=PARTS, default="all", help="what to measure (default all)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of sqlite,postgresql")
    parser.add_argument("--rows", type=int, default=1_000_000, help="audit records to seed (default 1,000,000)")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per bulk insert statement (default 10,000)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per query (default 7)")
    parser.add_argument("--slow-ms", type=float, default=50.0, help="print the plan of queries above this (ms)")
    parser.add_argument("--plans", action="store_true", help="print the plan of every query, not only slow ones")
    parser.add_argument(
        "--sqlite-analyze",
        action="store_true",
        help="run ANALYZE on the SQLite database after seeding (Thallus never does; off by default)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per latency run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="latency rounds (each: audit off, then on; default 2)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="closed-loop client workers; with --rate, the most connections open at once (default 16)",
    )
    parser.add_argument(
        "--client",
        choices=tuple(CLIENTS),
        default="httpx",
        help="httpx AsyncClient (default), or raw: a minimal HTTP/1.1 client on asyncio streams that needs far "
        "less CPU, so the server rather than the client is the bottleneck",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests/s for an open loop (fixed schedule) instead of the closed loop (default 0: closed loop)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    options = parser.parse_args(argv)
    backends = [name.strip() for name in options.backends.split(",") if name.strip()]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    options.backends = [name for name in BACKENDS if name in backends]
    if options.rows < PAGE * 3 or options.batch < 1 or options.repeat < 1:
        parser.error(f"--rows must be >= {PAGE * 3}, --batch and --repeat >= 1")
    if options.seconds <= 0 or options.warmup < 0 or options.rounds < 1 or options.concurrency < 1 or options.rate < 0:
        parser.error("--seconds must be > 0, --warmup and --rate >= 0, --rounds and --concurrency >= 1")
    return options


async def run(options: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {
        "benchmark": "thallus bench_audit",
        "environment": environment(PACKAGES),
        "options": {
            "part": options.part,
            "backends": options.backends,
            "rows": options.rows,
            "batch": options.batch,
            "repeat": options.repeat,
            "slow_ms": options.slow_ms,
            "plans": options.plans,
            "sqlite_analyze": options.sqlite_analyze,
            "seconds": options.seconds,
            "warmup": options.warmup,
            "rounds": options.rounds,
            "concurrency": options.concurrency,
            "client": options.client,
            "rate": options.rate,
            "page": PAGE,
            "warmup_executions": WARMUPS,
        },
        "postgres_server": postgres_server_url().render_as_string(hide_password=True),
    }
    anchor = datetime.now(UTC).replace(microsecond=0)
    if options.part in ("queries", "export", "all"):
        document["databases"] = {}
        for backend in options.backends:
            document["databases"][backend] = await database_part(backend, options, anchor)
    if options.part in ("latency", "all"):
        document["latency"] = {}
        for backend in options.backends:
            document["latency"][backend] = await latency_part(backend, options)
    return document


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    document = asyncio.run(run(options))
    print(json.dumps(document, indent=2, default=str) if options.json else render(document))


if __name__ == "__main__":
    main()
