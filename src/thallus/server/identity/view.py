"""The in-process view that decides authenticated requests without a query (docs/design.md §12).

A Bearer or API-key request needs three facts besides the token's signature and claims: is the
session (or key) still open, is the user still active, and what are their role and features.
:class:`IdentityView` keeps those facts in memory — loaded from the database the first time a
session, user or key is seen, then kept current by the ``identity_changes`` log:

* every change that can turn a credential away (a session revoked by logout, refresh-token reuse or
  expiry handling; a user's password, role, features or active flag changed; a key revoked) writes
  a row in the same transaction, and the writing instance applies it to its own view at once;
* every instance reads the rows after the last it saw (``seq > n``: a primary-key range) every
  ``poll_interval`` seconds, and on PostgreSQL is woken at once by ``NOTIFY thallus_identity``;
  applying a row drops what it concerns, so the next request reloads it;
* the view is *fresh* while its last successful read is at most ``bound`` seconds old (1 s). A
  stale view is not trusted: every request is decided by the database, as before (fail closed;
  logged once), until a read succeeds — then the view starts empty again, since what it missed is
  unknown.

So a revocation holds at once on the instance that made it and within ``bound`` everywhere else.
Key and session expiry are times in the records, checked on every request. A load that raced a
change (the change was applied while the load was in flight) serves its request but is not cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from thallus.server.storage import Database
from thallus.server.storage.models import IdentityChange, utcnow

logger = logging.getLogger("thallus.server.identity")

ChangeKind = Literal["session", "user", "api_key"]
NOTIFY_CHANNEL = "thallus_identity"
DEFAULT_BOUND = 1.0
DEFAULT_POLL_INTERVAL = 0.25
DEFAULT_CAPACITY = 100_000
#: How often a lost LISTEN connection is tried again (the poll keeps the view current meanwhile).
RELISTEN_INTERVAL = 5.0
#: Change rows older than this are pruned: an instance that has not read for so long is stale
#: anyway, and starts again from an empty view.
CHANGE_RETENTION = timedelta(days=1)
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class UserView:
    """What a request needs of its user."""

    id: str
    email: str
    name: str
    role: str
    api_access: bool
    is_active: bool
    created_at: datetime

    @property
    def features(self) -> list[str]:
        return ["api_access"] if self.api_access else []


@dataclass(frozen=True, slots=True)
class SessionView:
    """What a request needs of its session (one login)."""

    id: str
    user_id: str
    expires_at: datetime
    revoked: bool


class BoundedCache(Generic[K, V]):
    """A least-recently-used map of at most ``capacity`` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def drop_where(self, condition: Callable[[V], bool]) -> None:
        for key in [key for key, value in self._entries.items() if condition(value)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class IdentityView:
    """Sessions, users and API-key records in memory, kept current from ``identity_changes``."""

    def __init__(
        self,
        database: Database,
        *,
        bound: float = DEFAULT_BOUND,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.bound = bound
        self.poll_interval = poll_interval
        self.clock = clock
        self.sessions: BoundedCache[str, SessionView] = BoundedCache(capacity)
        self.users: BoundedCache[str, UserView] = BoundedCache(capacity)
        self.keys: BoundedCache[str, Any] = BoundedCache(capacity)  # key hash → KeyRecord, or False: no such key
        self.last_seq = 0
        self.synced_at = -float("inf")
        #: Bumped by every applied change: a load that sees it move must not cache its result.
        self.generation = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._listen_failed = False
        self._stale_logged = False

    # -- freshness -----------------------------------------------------------------------------

    @property
    def fresh(self) -> bool:
        """Whether the view may decide requests (its last read is at most ``bound`` seconds old)."""
        return self.clock() - self.synced_at <= self.bound

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start from now (the log's newest row), then follow it; wake on NOTIFY where there is one."""
        self._wake = asyncio.Event()
        async with self.database.session() as db:
            self.last_seq = int(await db.scalar(select(func.coalesce(func.max(IdentityChange.seq), 0))) or 0)
        self.synced_at = self.clock()
        if self.database.dialect == "postgresql":
            await self._listen()
        self._task = asyncio.create_task(self._follow(), name="identity-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

    async def _listen(self) -> None:
        """A connection of its own that wakes the reader on ``NOTIFY``; without it, polling alone."""
        import asyncpg

        url = self.database.url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            self._listener = await asyncpg.connect(url, timeout=5)
            await self._listener.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
        except Exception as exc:  # polling still keeps the view current
            if not self._listen_failed:
                logger.warning("identity changes: no LISTEN connection (%s); polling only", type(exc).__name__)
            self._listen_failed = True
            self._listener = None
            return
        if self._listen_failed:
            logger.info("identity changes: LISTEN connection back")
        self._listen_failed = False

    async def _follow(self) -> None:
        next_listen = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            await self.catch_up()
            lost = self._listener is None or self._listener.is_closed()
            if self.database.dialect == "postgresql" and lost and self.clock() >= next_listen:
                next_listen = self.clock() + RELISTEN_INTERVAL  # polling covers the gap meanwhile
                await self._listen()

    async def catch_up(self) -> None:
        """Read and apply the changes since the last one seen; on failure the view ages towards stale."""
        was_stale = not self.fresh
        try:
            async with self.database.session() as db:
                rows = (
                    await db.execute(
                        select(IdentityChange.seq, IdentityChange.kind, IdentityChange.subject_id)
                        .where(IdentityChange.seq > self.last_seq)
                        .order_by(IdentityChange.seq)
                        .limit(10_000)
                    )
                ).all()
        except Exception as exc:
            if not self.fresh and not self._stale_logged:
                self._stale_logged = True
                logger.error(
                    "identity view stale (no change log read for over %s s): every request is checked in the "
                    "database until it recovers: %s",
                    self.bound,
                    type(exc).__name__,
                )
            return
        if was_stale:  # what happened meanwhile is unknown: start again from an empty view
            self.clear()
            if self._stale_logged:
                logger.warning("identity view current again")
            self._stale_logged = False
        for seq, kind, subject_id in rows:
            self.apply(kind, subject_id)
            self.last_seq = max(self.last_seq, int(seq))
        self.synced_at = self.clock()

    # -- reading through the view ------------------------------------------------------------

    async def through(self, cache: BoundedCache[K, V], key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """``cache[key]`` while the view is fresh; otherwise (or on a miss) ``load()`` from the
        database — kept only if the view is fresh and no change was applied while it loaded (a
        change applied meanwhile may concern it: it serves this request, and is not cached)."""
        fresh = self.fresh
        if fresh:
            cached = cache.get(key)
            if cached is not None:
                return cached
        generation = self.generation
        loaded = await load()
        if loaded is not None and fresh and self.generation == generation:
            cache.put(key, loaded)
        return loaded

    # -- changes ---------------------------------------------------------------------------------

    async def record(self, db: AsyncSession, kind: ChangeKind, subject_id: str) -> None:
        """Write a change in the caller's transaction (and, on PostgreSQL, NOTIFY at its commit).
        After the commit, the caller applies it here with :meth:`apply`."""
        db.add(IdentityChange(kind=kind, subject_id=subject_id, created_at=utcnow()))
        if self.database.dialect == "postgresql":
            await db.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def apply(self, kind: str, subject_id: str) -> None:
        """Drop what a change concerns; the next request reloads it from the database."""
        self.generation += 1
        if kind == "session":
            self.sessions.pop(subject_id)
        elif kind == "user":
            self.users.pop(subject_id)
            self.sessions.drop_where(lambda session: session.user_id == subject_id)
            self.keys.drop_where(lambda record: bool(record) and record.user_id == subject_id)
        elif kind == "api_key":
            self.keys.drop_where(lambda record: bool(record) and record.key_id == subject_id)
        else:  # an unknown kind from a newer version: drop everything rather than guess
            self.clear()

    def clear(self) -> None:
        self.generation += 1
        self.sessions.clear()
        self.users.clear()
        self.keys.clear()

    async def prune(self) -> int:
        """Delete change rows older than :data:`CHANGE_RETENTION`; how many."""
        async with self.database.session() as db:
            result = await db.execute(
                delete(IdentityChange).where(IdentityChange.created_at < utcnow() - CHANGE_RETENTION)
            )
            await db.commit()
        return int(getattr(result, "rowcount", 0) or 0)
