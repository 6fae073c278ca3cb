"""What Thallus's rate limiter costs per request, and how the candidate algorithms compare.

Four tables, all in process (ASGI applications called directly on one asyncio event loop, a fresh
``scope`` per request, no sockets, server or test client; every request ``GET /items``):

1. **Stacks** — the limiter as shipped, alone (``RateLimitMiddleware`` → a bare Starlette app) and
   inside ``protect()``, with memory and with Redis storage, against the same apps without it; the
   client address rotates over ``--ips`` addresses. Wall time (``perf_counter``), one loop pass
   after each request as a server gives between requests.
2. **Candidates in memory** — the same ``RateLimitMiddleware`` over each candidate algorithm, in
   front of a null ASGI app, at 1, 1,000 and 50,000 client keys: today's moving window (limits'
   ``MovingWindowRateLimiter`` semantics over limits' synchronous ``MemoryStorage``, one call, as
   Thallus had it), limits' fixed window and sliding-window counter through limits' own strategies
   (``hit`` then ``get_window_stats``) over the same storage, throttled-py's GCRA through its own
   async API and memory store, and Thallus's sliding-window counter (``create_storage(None, …)``).
   Timed by the **process's CPU time** (``process_time``: every thread of the process, so limits'
   timer-thread sweep counts, and time spent descheduled by other work on the machine does not).
3. **Candidates on Redis** — the same candidates on one Redis (limits' ``RedisStorage`` through
   limits' strategies, throttled-py's ``RedisStore``, Thallus's ``RedisStore``): wall µs per
   request at 1,000 keys, and **Redis commands per request**, counted on the wire by a proxy in
   this process that parses what each client sends (calls are sequential, so each command is one
   round trip).
4. **Burst** — each candidate's real implementation under a fake clock, against adversarial
   schedules (as fast as allowed from the start; one hit, then everything just before a window
   boundary; the same a window later): the most requests taken within any 1 s and within any
   window's length, and the long-run rate.

The Redis URL is ``THALLUS_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); the run uses
a key prefix of its own and deletes its keys at the end. Without a reachable Redis, the Redis rows
are skipped and the reason is printed; without throttled-py (the ``bench`` extra), its rows are.
Run ``.venv/bin/python benchmarks/bench_ratelimit.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import secrets
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import coredis
import limits.storage.memory
import limits.strategies
from limits import RateLimitItem
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from limits.storage import MemoryStorage as SyncMemoryStorage
from limits.storage import storage_from_string
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import describe, environment, progress, redacted_url, text_table
from thallus import Settings, protect
from thallus.limiter_store import LimitsStore, MemoryCounter, WindowHit, WindowStore
from thallus.ratelimit import RateLimitMiddleware, RateLimitStorage, create_storage, parse_limit

SECRET = "x" * 40
APP_ORIGIN = "https://app.example.com"
PUBLIC_ORIGIN = "https://api.example.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_VARIABLE = "THALLUS_TEST_REDIS_URL"
#: Requests timed between two clock reads; the same for every stack.
BATCH = 100
PACKAGES = ("thallus", "starlette", "limits", "coredis", "throttled-py", "redis")
#: The policy every request falls under (``GET /items`` is neither an auth path nor exempt).
POLICY = "general"
#: Client keys of the candidates table.
KEY_COUNTS = (1, 1000, 50_000)
#: The candidates' limit: never reached, so every timed request is taken (a refusal is a 429).
CANDIDATE_LIMIT = "1000000000/minute"
HAVE_THROTTLED = importlib.util.find_spec("throttled") is not None


# -- the application ---------------------------------------------------------------------------

ITEMS = {"items": [{"id": 1, "name": "widget", "price": 9.5}, {"id": 2, "name": "gadget", "price": 12.0}]}


async def list_items(request: Request) -> JSONResponse:
    return JSONResponse(ITEMS)


def make_app() -> Starlette:
    """A fresh Starlette app; each stack gets its own (``protect`` installs handlers on it)."""
    return Starlette(routes=[Route("/items", list_items, methods=["GET"])])


# -- the stacks --------------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    description: str
    app: ASGIApp
    #: the stack this one is compared with (``None`` for the reference)
    baseline: str | None
    #: whether responses carry the ``RateLimit`` headers (checked before timing)
    limited: bool


def thallus_settings(*, limit: str, enabled: bool = True, redis_url: str | None = None, prefix: str) -> Settings:
    return Settings(
        env="production",
        allowed_origins=(APP_ORIGIN,),
        public_origin=PUBLIC_ORIGIN,
        rate_limit_enabled=enabled,
        rate_limit=limit,
        redis_url=redis_url,
        redis_key_prefix=prefix,
    )


def limiter_alone(storage: RateLimitStorage, *, limit: str, prefix: str) -> RateLimitMiddleware:
    return RateLimitMiddleware(make_app(), storage, general=limit, key_prefix=prefix)


def build_stacks(limit: str, redis: RedisTarget) -> list[Stack]:
    memory_storage = create_storage(None, "bench-memory")
    stack_storage = create_storage(None, "bench-stack")
    stacks = [
        Stack("bare", "Starlette, GET /items", make_app(), None, limited=False),
        Stack(
            "memory",
            "RateLimitMiddleware, memory storage → bare app",
            limiter_alone(memory_storage, limit=limit, prefix="bench-memory"),
            "bare",
            limited=True,
        ),
    ]
    if redis.available:
        prefix = f"{redis.prefix}/mw"
        stacks.append(
            Stack(
                "redis",
                "RateLimitMiddleware, Redis storage → bare app",
                limiter_alone(create_storage(redis.url, prefix), limit=limit, prefix=prefix),
                "bare",
                limited=True,
            )
        )
    stacks += [
        Stack(
            "stack",
            "protect(app, production settings), rate_limit_enabled=False",
            protect(make_app(), thallus_settings(limit=limit, enabled=False, prefix="bench-stack")),
            "bare",
            limited=False,
        ),
        Stack(
            "stack+memory",
            "the same, limiter on, memory storage",
            # the storage protect() would create itself without redis_url, passed in
            protect(
                make_app(),
                thallus_settings(limit=limit, prefix="bench-stack"),
                rate_limit_storage=stack_storage,
            ),
            "stack",
            limited=True,
        ),
    ]
    if redis.available:
        stacks.append(
            Stack(
                "stack+redis",
                "the same, limiter on, redis_url set",
                protect(make_app(), thallus_settings(limit=limit, redis_url=redis.url, prefix=f"{redis.prefix}/stack")),
                "stack",
                limited=True,
            )
        )
    return stacks


# -- Redis -------------------------------------------------------------------------------------


@dataclass
class RedisTarget:
    url: str
    #: a key prefix of this run's own; every key it creates starts with it
    prefix: str
    client: coredis.Redis[bytes] | None = None
    version: str | None = None
    skipped: str | None = None
    keys_deleted: int = 0

    @property
    def available(self) -> bool:
        return self.client is not None

    @property
    def display_url(self) -> str:
        """The URL without credentials."""
        return redacted_url(self.url)


async def connect_redis(url: str, *, skip: str | None) -> RedisTarget:
    target = RedisTarget(url, f"thallus-bench-{os.getpid()}-{secrets.token_hex(4)}")
    if skip:
        target.skipped = skip
        return target
    try:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=2, stream_timeout=2)
        await asyncio.wait_for(client.ping(), timeout=5)
        info = await client.info("server")
    except Exception as exc:  # any failure to reach it: skip the Redis rows, say why
        target.skipped = f"Redis at {target.display_url} is not reachable: {type(exc).__name__}: {exc}"
        return target
    version = info.get("redis_version")
    target.version = version.decode() if isinstance(version, bytes) else str(version)
    target.client = client
    return target


async def delete_keys(redis: RedisTarget) -> None:
    """SCAN + DEL every key under the run's prefix."""
    if redis.client is None:
        return
    keys = [key async for key in redis.client.scan_iter(match=f"{redis.prefix}*")]
    for start in range(0, len(keys), 1000):
        redis.keys_deleted += await redis.client.delete(tuple(keys[start : start + 1000]))


# -- the harness -------------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]
Clock = Callable[[], int]


def client_addresses(count: int) -> list[str]:
    """``count`` distinct addresses from 10.0.0.1 on."""
    first = int(ipaddress.IPv4Address("10.0.0.1"))
    return [str(ipaddress.IPv4Address(first + index)) for index in range(count)]


class RotatingRequest:
    """``GET /items`` from the next client address of the pool; a fresh scope per call.

    ``send`` drops every message but counts response starts whose status is not 200, so a refusal
    (429) or an error during timing is noticed rather than timed as a fast answer.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        self._template: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "scheme": "https",
            "method": "GET",
            "root_path": "",
            "path": "/items",
            "raw_path": b"/items",
            "query_string": b"",
        }
        self._headers: list[tuple[bytes, bytes]] = [
            (b"host", b"api.example.com"),
            (b"user-agent", b"bench-ratelimit/1"),
            (b"accept", b"application/json"),
            (b"accept-encoding", b"gzip, deflate, br"),
        ]
        self._clients = itertools.cycle([(address, 40000 + index % 20000) for index, address in enumerate(addresses)])
        self.sent = 0
        self.unexpected = 0

    def scope(self) -> Scope:
        scope = self._template.copy()
        scope["headers"] = self._headers.copy()  # layers may rewrite the list in place
        scope["state"] = {}
        scope["client"] = next(self._clients)
        self.sent += 1
        return scope

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            self.unexpected += 1

    def call(self, app: ASGIApp) -> Call:
        return lambda: app(self.scope(), self.receive, self.send)


async def timed_run(
    call: Call, seconds: float, *, yield_to_loop: bool = True, batch: int = BATCH, clock: Clock = time.perf_counter_ns
) -> float:
    """Call ``call`` in batches until ``seconds`` have passed on ``clock``; return nanoseconds per call.

    With ``yield_to_loop``, each call is followed by one pass of the event loop, as a server gives
    between requests.
    """
    pause = asyncio.sleep
    count = 0
    start = clock()
    deadline = start + int(seconds * 1e9)
    while True:
        if yield_to_loop:
            for _ in range(batch):
                await call()
                await pause(0)
        else:
            for _ in range(batch):
                await call()
        count += batch
        if clock() >= deadline:
            break
    return (clock() - start) / count


@dataclass
class Cell:
    """Nanoseconds per request (or call) of each repetition."""

    runs_ns: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.runs_ns) / 1000

    @property
    def best_us(self) -> float:
        return min(self.runs_ns) / 1000

    @property
    def spread(self) -> float:
        """(max − min) / median of the repetitions."""
        return (max(self.runs_ns) - min(self.runs_ns)) / statistics.median(self.runs_ns)


class LimiterLog(logging.Handler):
    """Collects ``thallus.ratelimit`` warnings and errors: a 429, or the storage failing open."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def check(stacks: Sequence[Stack], addresses: Sequence[str]) -> None:
    """One request per stack: 200, with ``RateLimit`` headers exactly where a limiter runs."""
    problems: list[str] = []
    for stack in stacks:
        request = RotatingRequest(addresses)
        messages: list[Message] = []

        async def collect(message: Message, messages: list[Message] = messages) -> None:
            messages.append(message)

        await stack.app(request.scope(), request.receive, collect)
        start = messages[0] if messages else {}
        names = {name.lower() for name, _ in start.get("headers", ())}
        if start.get("status") != 200:
            problems.append(f"{stack.name}: status {start.get('status')}, expected 200")
        if ({b"ratelimit", b"ratelimit-policy"} <= names) != stack.limited:
            problems.append(f"{stack.name}: RateLimit headers {'missing' if stack.limited else 'unexpected'}")
    if problems:
        raise SystemExit("benchmark requests are not answered as intended:\n  " + "\n  ".join(problems))


async def measure(
    stacks: Sequence[Stack], requests: dict[str, RotatingRequest], *, seconds: float, warmup: float, repeat: int
) -> dict[str, Cell]:
    cells = {stack.name: Cell() for stack in stacks}
    for stack in stacks:
        await timed_run(requests[stack.name].call(stack.app), warmup)
    order = list(stacks)
    for repetition in range(repeat):
        progress(f"stacks: repetition {repetition + 1}/{repeat}")
        # rotate the order each repetition so no stack always runs first (or last)
        shift = repetition % len(order)
        for stack in order[shift:] + order[:shift]:
            gc.collect()
            per_call = await timed_run(requests[stack.name].call(stack.app), seconds)
            cells[stack.name].runs_ns.append(per_call)
    return cells


# -- the candidates ----------------------------------------------------------------------------


async def null_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that answers 200 at once: the candidates' table times the limiter, not an app."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


class SyncBehindAsync(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """limits' synchronous, thread-safe ``MemoryStorage`` behind its async interface: Thallus's memory
    storage before the sliding-window counter (limits 5.8's own async ``MemoryStorage`` sweeps
    expired keys with one ``asyncio.to_thread`` hop per key, ~50 µs a request under load). Its
    expiry sweep runs in limits' timer thread, every 10 ms, over every key, holding the GIL."""

    STORAGE_SCHEME = ["thallus-bench+memory"]  # noqa: RUF012 - the limits base class declares it so

    def __init__(self) -> None:
        super().__init__()
        self.store = SyncMemoryStorage()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.store.incr(key, expiry, amount)

    async def get(self, key: str) -> int:
        return self.store.get(key)

    async def get_expiry(self, key: str) -> float:
        return self.store.get_expiry(key)

    async def check(self) -> bool:
        return self.store.check()

    async def reset(self) -> int | None:
        return self.store.reset()

    async def clear(self, key: str) -> None:
        self.store.clear(key)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.store.acquire_entry(key, limit, expiry, amount)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.store.get_moving_window(key, limit, expiry)

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.store.acquire_sliding_window_entry(key, limit, expiry, amount)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self.store.get_sliding_window(key, expiry)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.store.clear_sliding_window(key, expiry)


class OneCallMovingWindow:
    """The memory path before this change: limits' ``acquire_entry`` then ``get_moving_window`` on
    its synchronous store, in one call (Thallus's ``MemoryWindow``, less its use of limits'
    undocumented per-key locks, which this single-threaded benchmark does not need)."""

    def __init__(self) -> None:
        self.store = SyncBehindAsync().store

    def counter(self, name: str, limit: RateLimitItem) -> OneCallMovingCounter:
        return OneCallMovingCounter(self.store, name, limit)


class OneCallMovingCounter:
    def __init__(self, store: SyncMemoryStorage, name: str, limit: RateLimitItem) -> None:
        self.store, self.name, self.limit = store, name, limit

    async def hit(self, key: str) -> WindowHit:
        expiry = self.limit.get_expiry()
        full_key = self.limit.key_for(self.name, key)
        taken = self.store.acquire_entry(full_key, self.limit.amount, expiry)
        start, entries = self.store.get_moving_window(full_key, self.limit.amount, expiry)
        return taken, self.limit.amount - entries, max(0, math.ceil(start + expiry - time.time()))


class StrategyStore:
    """A limits strategy on a limits storage, as the library offers it: ``hit``, then ``get_window_stats``."""

    def __init__(self, strategy: type[RateLimiter], storage: Storage) -> None:
        self.limiter = strategy(storage)

    def counter(self, name: str, limit: RateLimitItem) -> StrategyCounter:
        return StrategyCounter(self.limiter, name, limit)


class StrategyCounter:
    def __init__(self, limiter: RateLimiter, name: str, limit: RateLimitItem) -> None:
        self.limiter, self.name, self.limit = limiter, name, limit

    async def hit(self, key: str) -> WindowHit:
        taken = await self.limiter.hit(self.limit, self.name, key)
        stats = await self.limiter.get_window_stats(self.limit, self.name, key)
        return taken, stats.remaining, max(0, math.ceil(stats.reset_time - time.time()))


class ThrottledStore:
    """throttled-py's GCRA (burst = the limit's amount) through its async ``Throttled.limit``."""

    def __init__(self, store: Any, key_prefix: str) -> None:
        self.store, self.key_prefix = store, key_prefix

    def counter(self, name: str, limit: RateLimitItem) -> ThrottledCounter:
        from throttled.asyncio import RateLimiterType, Throttled, per_duration

        quota = per_duration(timedelta(seconds=limit.get_expiry()), limit.amount, burst=limit.amount)
        throttled = Throttled(
            using=RateLimiterType.GCRA.value, quota=quota, store=self.store, key_prefix=self.key_prefix
        )
        return ThrottledCounter(throttled, name)


class ThrottledCounter:
    def __init__(self, throttled: Any, name: str) -> None:
        self.throttled, self.name = throttled, name

    async def hit(self, key: str) -> WindowHit:
        result = await self.throttled.limit(f"{self.name}/{key}")
        state = result.state
        return not result.limited, int(state.remaining), math.ceil(state.reset_after)


def throttled_memory(prefix: str) -> ThrottledStore:
    from throttled.asyncio import MemoryStore

    # its memory store is an LRU of 1024 keys by default: sized so no client is evicted here
    return ThrottledStore(MemoryStore(options={"MAX_SIZE": 2 * max(KEY_COUNTS)}), prefix)


def throttled_redis(url: str, prefix: str) -> ThrottledStore:
    from throttled.asyncio import RedisStore

    return ThrottledStore(RedisStore(server=url), prefix)


def limits_redis(url: str, prefix: str) -> Storage:
    """limits' own async Redis storage (coredis), from its public ``storage_from_string``."""
    storage = storage_from_string(f"async+{url}", key_prefix=prefix, connect_timeout=2, stream_timeout=2)
    assert isinstance(storage, Storage)
    return storage


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    memory: Callable[[str], WindowStore] | None
    redis: Callable[[str, str], WindowStore] | None
    #: the algorithm under a fake clock for the burst table: a fresh limiter as ``taken(at_seconds)``
    burst: Callable[[int], Callable[[float], bool]] | None


def candidates() -> list[Candidate]:
    found = [
        Candidate(
            "moving (today)",
            "limits' moving window: one list entry per hit; one call (memory), limits' two calls (Redis)",
            lambda prefix: OneCallMovingWindow(),
            lambda url, prefix: StrategyStore(MovingWindowRateLimiter, limits_redis(url, prefix)),
            lambda amount: limits_burst(limits.strategies.MovingWindowRateLimiter, amount),
        ),
        Candidate(
            "fixed (limits)",
            "limits' FixedWindowRateLimiter: hit, then get_window_stats (a get and a get_expiry)",
            lambda prefix: StrategyStore(FixedWindowRateLimiter, SyncBehindAsync()),
            lambda url, prefix: StrategyStore(FixedWindowRateLimiter, limits_redis(url, prefix)),
            lambda amount: limits_burst(limits.strategies.FixedWindowRateLimiter, amount),
        ),
        Candidate(
            "sliding (limits)",
            "limits' SlidingWindowCounterRateLimiter: hit, then get_window_stats",
            lambda prefix: LimitsStore(SyncBehindAsync()),
            lambda url, prefix: LimitsStore(limits_redis(url, prefix)),
            lambda amount: limits_burst(limits.strategies.SlidingWindowCounterRateLimiter, amount),
        ),
    ]
    if HAVE_THROTTLED:
        found.append(
            Candidate(
                "gcra (throttled-py)",
                "throttled-py's GCRA, burst = the limit, Throttled.limit on its memory / Redis store",
                throttled_memory,
                throttled_redis,
                throttled_burst,
            )
        )
    found.append(
        Candidate(
            "sliding (thallus)",
            "Thallus: limits' sliding-window counter, one call (create_storage: MemoryStore / RedisStore)",
            lambda prefix: create_storage(None, prefix),
            create_storage,
            thallus_burst,
        ),
    )
    return found


# -- candidates in memory: µs per request at 1, 1,000 and 50,000 client keys -------------------------


async def warm(app: ASGIApp, request: RotatingRequest, keys: int, seconds: float) -> None:
    """Every client key once (so the timed runs find them all in the store), then ``seconds`` more."""
    for _ in range(keys):
        await request.call(app)()
    await timed_run(request.call(app), seconds, clock=time.process_time_ns)


async def measure_candidates(
    found: Sequence[Candidate], key_counts: Sequence[int], *, seconds: float, warmup: float, repeat: int
) -> tuple[dict[tuple[int, str], Cell], dict[str, RotatingRequest]]:
    """CPU ns per request of the null app and of the limiter over it, per candidate and key count."""
    cells: dict[tuple[int, str], Cell] = {}
    requests: dict[str, RotatingRequest] = {}
    for keys in key_counts:
        addresses = client_addresses(keys)
        apps: dict[str, ASGIApp] = {"null app": null_app}
        for candidate in found:
            if candidate.memory is not None:
                prefix = f"bench-{keys}"
                store = candidate.memory(prefix)
                apps[candidate.name] = RateLimitMiddleware(null_app, store, general=CANDIDATE_LIMIT, key_prefix=prefix)
        rotating = {name: RotatingRequest(addresses) for name in apps}
        progress(f"candidates, {keys} client keys: warming up {len(apps)} apps")
        for name, app in apps.items():
            await warm(app, rotating[name], keys, warmup)
        order = list(apps)
        for repetition in range(repeat):
            progress(f"candidates, {keys} client keys: repetition {repetition + 1}/{repeat}")
            shift = repetition % len(order)
            for name in order[shift:] + order[:shift]:
                gc.collect()
                per_call = await timed_run(rotating[name].call(apps[name]), seconds, clock=time.process_time_ns)
                cells.setdefault((keys, name), Cell()).runs_ns.append(per_call)
        requests.update({f"{name} @ {keys}": request for name, request in rotating.items()})
    return cells, requests


# -- candidates on Redis: µs per request and commands per request ------------------------------------


def resp_commands(buffer: bytes | bytearray) -> tuple[int, int]:
    """Complete commands at the start of what a client sent (RESP arrays, or inline lines), and the
    bytes they take."""
    position = count = 0
    while position < len(buffer):
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            break
        if buffer[position] != ord("*"):  # an inline command: one line
            position, count = line_end + 2, count + 1
            continue
        cursor = line_end + 2
        for _ in range(int(buffer[position + 1 : line_end])):
            header_end = buffer.find(b"\r\n", cursor)
            if header_end < 0:
                return count, position
            cursor = header_end + 2 + int(buffer[cursor + 1 : header_end]) + 2
            if cursor > len(buffer):
                return count, position
        position, count = cursor, count + 1
    return count, position


class CommandCounter:
    """A TCP proxy on a thread of its own, 127.0.0.1:<port> → Redis, counting the commands clients send."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.commands = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting proxy did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(reader, writer)
        except (asyncio.CancelledError, OSError):  # closing down, or a client gone
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)

        async def requests() -> None:
            pending = bytearray()
            while data := await reader.read(65536):
                pending += data
                count, used = resp_commands(pending)
                self.commands += count
                del pending[:used]
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        async def replies() -> None:
            while data := await upstream_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(requests(), replies())

    def url(self, url: str) -> str:
        """``url`` with this proxy as its host and port."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cancel_handlers(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _cancel_handlers(self) -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class RedisRow:
    candidate: str
    cell: Cell = field(default_factory=Cell)
    commands_per_request: float | None = None


#: Requests per candidate through the counting proxy (after as many to connect and warm up).
COUNTED_REQUESTS = 200


async def measure_redis_candidates(
    found: Sequence[Candidate], redis: RedisTarget, *, ips: int, seconds: float, warmup: float, repeat: int
) -> list[RedisRow]:
    rows = [RedisRow(candidate.name) for candidate in found if candidate.redis is not None]
    factories = {candidate.name: candidate.redis for candidate in found if candidate.redis is not None}
    addresses = client_addresses(ips)
    apps: dict[str, ASGIApp] = {}
    for index, row in enumerate(rows):
        prefix = f"{redis.prefix}/c{index}"
        store = factories[row.candidate](redis.url, prefix)
        apps[row.candidate] = RateLimitMiddleware(null_app, store, general=CANDIDATE_LIMIT, key_prefix=prefix)
    rotating = {name: RotatingRequest(addresses) for name in apps}
    for name, app in apps.items():
        await timed_run(rotating[name].call(app), warmup)
    for repetition in range(repeat):
        progress(f"Redis candidates: repetition {repetition + 1}/{repeat}")
        shift = repetition % len(rows)
        for row in rows[shift:] + rows[:shift]:
            gc.collect()
            row.cell.runs_ns.append(await timed_run(rotating[row.candidate].call(apps[row.candidate]), seconds))
    host, port = urlsplit(redis.url).hostname or "127.0.0.1", urlsplit(redis.url).port or 6379
    proxy = CommandCounter(host, port)
    try:
        for index, row in enumerate(rows):
            prefix = f"{redis.prefix}/n{index}"
            store = factories[row.candidate](proxy.url(redis.url), prefix)
            app = RateLimitMiddleware(null_app, store, general=CANDIDATE_LIMIT, key_prefix=prefix)
            request = RotatingRequest(addresses)
            for _ in range(COUNTED_REQUESTS):  # connects, loads scripts
                await request.call(app)()
            before = proxy.commands
            for _ in range(COUNTED_REQUESTS):
                await request.call(app)()
            row.commands_per_request = (proxy.commands - before) / COUNTED_REQUESTS
            if request.unexpected:
                raise SystemExit(f"{row.candidate} on Redis answered {request.unexpected} requests with a non-200")
    finally:
        proxy.close()
    for name, request in rotating.items():
        if request.unexpected:
            raise SystemExit(f"{name} on Redis answered {request.unexpected} requests with a non-200")
    return rows


# -- burst: each algorithm under a fake clock ------------------------------------------------------

#: The burst table's limit: 10/minute, the authentication endpoints' default.
BURST_AMOUNT = 10
BURST_WINDOW = 60
#: A window start of the epoch's (28,333,333 × 60 s), where every schedule begins.
BURST_START = 1_699_999_980.0
#: Each schedule tries every 1/16 s and, at each try, hits until refused.
BURST_STEP = 1 / 16
BURST_WINDOWS = 10


class FakeClock:
    """``time`` with a settable ``time()``; everything else is the real module."""

    def __init__(self) -> None:
        self.now = BURST_START

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextmanager
def fake_clocks(clock: FakeClock) -> Iterator[None]:
    """limits' (``time.time``) and throttled-py's (``utils.now_mono_f``) clocks read ``clock``."""
    patched: list[tuple[dict[str, Any], str, Any]] = [
        (vars(limits.storage.memory), "time", clock),
        (vars(limits.strategies), "time", clock),
    ]
    if HAVE_THROTTLED:
        import throttled.utils

        patched.append((vars(throttled.utils), "now_mono_f", clock.monotonic))
    originals = [(namespace, name, namespace[name]) for namespace, name, _ in patched]
    for namespace, name, value in patched:
        namespace[name] = value
    try:
        yield
    finally:
        for namespace, name, value in originals:
            namespace[name] = value


def limits_burst(strategy: type[limits.strategies.RateLimiter], amount: int) -> Callable[[float], bool]:
    limiter = strategy(SyncMemoryStorage())
    item = parse_limit(f"{amount}/minute")
    return lambda now: limiter.hit(item, "burst")


def throttled_burst(amount: int) -> Callable[[float], bool]:
    from throttled import MemoryStore, RateLimiterType, Throttled, per_min

    throttled = Throttled(using=RateLimiterType.GCRA.value, quota=per_min(amount, burst=amount), store=MemoryStore())
    return lambda now: not throttled.limit("burst").limited


def thallus_burst(amount: int) -> Callable[[float], bool]:
    counter = MemoryCounter(amount, BURST_WINDOW)
    return lambda now: counter.take("burst", now)[0]


def burst_schedules() -> dict[str, list[tuple[float, int]]]:
    """(seconds from a window start, most hits) at which a client tries, hitting until refused."""
    window, step, greedy = BURST_WINDOW, BURST_STEP, 3 * BURST_AMOUNT  # every candidate refuses sooner
    horizon = BURST_WINDOWS * window

    def tries(first: float) -> list[tuple[float, int]]:
        return [(first + index * step, greedy) for index in range(int((horizon - first) / step))]

    return {
        "from the start": tries(0.0),
        "one hit, then the window's end": [(0.0, 1), *tries(window - 0.05)],
        "one hit, then the next window's end": [(0.0, 1), *tries(2 * window - 0.05)],
        "nothing until a window's end": tries(window - 0.05),
    }


def most_within(moments: Sequence[float], span: float) -> int:
    """The most of ``moments`` (sorted) within any ``span`` seconds."""
    return max((bisect.bisect_left(moments, moment + span) - index for index, moment in enumerate(moments)), default=0)


@dataclass
class Burst:
    candidate: str
    one_second: int
    one_window: int
    per_window: float
    #: the schedule that reached ``one_window``
    worst: str


def measure_burst(candidate: Candidate) -> Burst:
    assert candidate.burst is not None
    clock = FakeClock()
    results: list[tuple[int, int, float, str]] = []
    with fake_clocks(clock):
        for name, tries in burst_schedules().items():
            taken_at = candidate.burst(BURST_AMOUNT)
            taken: list[float] = []
            for offset, most in tries:
                clock.now = BURST_START + offset
                for _ in range(most):
                    if not taken_at(clock.now):
                        break
                    taken.append(offset)
            # the long run: the windows after the first (whose burst the GCRA's bucket starts with)
            per_window = sum(offset >= BURST_WINDOW for offset in taken) / (BURST_WINDOWS - 1)
            results.append((most_within(taken, 1.0), most_within(taken, BURST_WINDOW), per_window, name))
    worst = max(results, key=lambda result: result[1])
    return Burst(
        candidate.name,
        max(result[0] for result in results),
        worst[1],
        max(result[2] for result in results),
        worst[3],
    )


# -- reporting ---------------------------------------------------------------------------------


def cell_document(cell: Cell) -> dict[str, Any]:
    return {
        "median_us": round(cell.median_us, 3),
        "best_us": round(cell.best_us, 3),
        "runs_us": [round(ns / 1000, 3) for ns in cell.runs_ns],
        "spread": round(cell.spread, 4),
    }


def added(cell: Cell, base: Cell) -> dict[str, Any]:
    """What ``cell`` adds over ``base``: medians, and per repetition (the runs were interleaved)."""
    per_run = [(ns - base_ns) / 1000 for ns, base_ns in zip(cell.runs_ns, base.runs_ns, strict=False)]
    return {
        "added_us": round(cell.median_us - base.median_us, 3),
        "added_best_us": round(cell.best_us - base.best_us, 3),
        "added_runs_us": [round(value, 3) for value in per_run],
    }


def results_document(
    *,
    stacks: Sequence[Stack],
    cells: dict[str, Cell],
    requests: dict[str, RotatingRequest],
    found: Sequence[Candidate],
    candidate_cells: dict[tuple[int, str], Cell],
    key_counts: Sequence[int],
    redis_rows: Sequence[RedisRow],
    bursts: Sequence[Burst],
    redis: RedisTarget,
    options: argparse.Namespace,
) -> dict[str, Any]:
    rows = []
    for stack in stacks:
        cell = cells[stack.name]
        row: dict[str, Any] = {
            "stack": stack.name,
            "description": stack.description,
            **cell_document(cell),
            "requests": requests[stack.name].sent,
            "baseline": stack.baseline,
        }
        if stack.baseline is not None:
            base = cells[stack.baseline]
            row.update(added(cell, base))
            row["ratio"] = round(cell.median_us / base.median_us, 3)
        rows.append(row)
    candidate_rows = []
    for candidate in found:
        entry: dict[str, Any] = {"candidate": candidate.name, "description": candidate.description, "keys": {}}
        for keys in key_counts:
            found_cell = candidate_cells.get((keys, candidate.name))
            if found_cell is not None:
                null = candidate_cells[(keys, "null app")]
                entry["keys"][str(keys)] = {**cell_document(found_cell), **added(found_cell, null)}
        candidate_rows.append(entry)
    null_app_cells = {
        str(keys): cell_document(candidate_cells[(keys, "null app")])
        for keys in key_counts
        if (keys, "null app") in candidate_cells
    }
    return {
        "benchmark": "thallus bench_ratelimit",
        "environment": {**environment(PACKAGES), "redis_server": redis.version},
        "options": {
            "seconds": options.seconds,
            "warmup": options.warmup,
            "repeat": options.repeat,
            "batch": BATCH,
            "ips": options.ips,
            "limit": options.limit,
            "candidate_limit": CANDIDATE_LIMIT,
            "key_counts": list(key_counts),
            "parts": sorted(options.parts),
        },
        "redis": {
            "url": redis.display_url,
            "server_version": redis.version,
            "skipped": redis.skipped,
            "key_prefix": redis.prefix if redis.available else None,
            "keys_deleted": redis.keys_deleted,
        },
        "results": rows,
        "null_app": null_app_cells,
        "candidates": candidate_rows,
        "redis_candidates": [
            {"candidate": row.candidate, **cell_document(row.cell), "commands_per_request": row.commands_per_request}
            for row in redis_rows
        ],
        "burst": {
            "limit": f"{BURST_AMOUNT}/minute",
            "step_s": BURST_STEP,
            "windows": BURST_WINDOWS,
            "rows": [vars(burst) for burst in bursts],
        },
    }


def spread_text(runs: Sequence[float]) -> str:
    return f"{min(runs):.2f}–{max(runs):.2f}"


def render_text(document: dict[str, Any]) -> str:
    env = document["environment"]
    options = document["options"]
    redis = document["redis"]
    server = f"Redis server {redis['server_version']} at {redis['url']}" if redis["server_version"] else "no Redis"
    lines = [*describe(env, f"; {server}")]
    lines.append(f"{options['repeat']} repetitions x {options['seconds']} s per row (warm-up {options['warmup']} s)")
    if redis["skipped"]:
        lines.append(f"Redis rows SKIPPED: {redis['skipped']}")
    if document["results"]:
        lines += [
            "",
            f"1. Stacks: wall µs per request (GET /items from {options['ips']} rotating client IPs, limit "
            f"{options['limit']}; one loop pass after each request; every timed response was 200)",
            "",
        ]
        stack_rows = []
        for row in document["results"]:
            base = row["baseline"]
            stack_rows.append(
                (
                    row["stack"],
                    f"{row['median_us']:.2f}",
                    f"{row['best_us']:.2f}",
                    f"{row['spread']:.0%}",
                    base or "",
                    f"{row['added_us']:+.2f}" if base else "",
                    spread_text(row["added_runs_us"]) if base else "",
                    f"{row['ratio']:.2f}x" if base else "",
                )
            )
        lines += text_table(
            ("stack", "µs/req", "best", "spread", "vs", "added µs", "added, each run", "ratio"), stack_rows, "lrrrlrrr"
        )
        lines += [""] + [f"{row['stack']:<13} {row['description']}" for row in document["results"]]
    if document["candidates"]:
        counts = options["key_counts"]
        nulls = ", ".join(f"{keys} keys {cell['median_us']:.2f} µs" for keys, cell in document["null_app"].items())
        lines += [
            "",
            f"2. Candidates in memory: CPU µs a request adds over the null app (RateLimitMiddleware, limit "
            f"{options['candidate_limit']}; median of the runs, then the runs' range; null app: {nulls})",
            "",
        ]
        candidate_rows = []
        for entry in document["candidates"]:
            cells = [entry["keys"].get(str(keys)) for keys in counts]
            candidate_rows.append(
                (
                    entry["candidate"],
                    *(
                        f"{cell['added_us']:.2f} ({spread_text(cell['added_runs_us'])})" if cell else "-"
                        for cell in cells
                    ),
                    *(f"{cell['spread']:.0%}" if cell else "-" for cell in cells),
                )
            )
        header = (
            "candidate",
            *(f"+µs @ {keys} keys" for keys in counts),
            *(f"spread @ {keys}" for keys in counts),
        )
        lines += text_table(header, candidate_rows, "l" + "r" * (2 * len(counts)))
        lines += [""] + [f"{entry['candidate']:<20} {entry['description']}" for entry in document["candidates"]]
    if document["redis_candidates"]:
        lines += [
            "",
            f"3. Candidates on Redis: wall µs per request through RateLimitMiddleware → null app, {options['ips']} "
            "client keys; Redis commands a request sends (counted on the wire, sequential: one round trip each)",
            "",
        ]
        redis_table = [
            (
                row["candidate"],
                f"{row['median_us']:.1f}",
                f"{row['best_us']:.1f}",
                f"{row['spread']:.0%}",
                f"{row['commands_per_request']:.2f}" if row["commands_per_request"] is not None else "-",
            )
            for row in document["redis_candidates"]
        ]
        lines += text_table(("candidate", "µs/req", "best", "spread", "commands/req"), redis_table, "lrrrr")
    if document["burst"]["rows"]:
        burst = document["burst"]
        lines += [
            "",
            f"4. Burst, {burst['limit']}: the most requests taken, over {burst['windows']} windows of schedules "
            f"trying every {burst['step_s']} s (each try hits until refused)",
            "",
        ]
        burst_table = [
            (row["candidate"], str(row["one_second"]), str(row["one_window"]), f"{row['per_window']:.1f}", row["worst"])
            for row in burst["rows"]
        ]
        lines += text_table(
            ("candidate", "within 1 s", "within 60 s", "per window, long run", "worst schedule"), burst_table, "lrrrl"
        )
    if redis["key_prefix"]:
        lines += ["", f"Redis: {redis['keys_deleted']} keys under {redis['key_prefix']}* deleted."]
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------

PARTS = ("stacks", "candidates", "redis", "burst")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timed run (default 1.0)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up per row (default 0.3)")
    parser.add_argument("--ips", type=int, default=1000, help="client addresses of tables 1 and 3 (default 1000)")
    parser.add_argument(
        "--keys", default=",".join(map(str, KEY_COUNTS)), help="client keys of table 2 (default 1,1000,50000)"
    )
    parser.add_argument(
        "--limit", default="100000/minute", help="table 1's general limit, limits notation (default 100000/minute)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"tables to run (default {','.join(PARTS)})")
    parser.add_argument("--no-redis", action="store_true", help=f"skip the Redis rows even if {REDIS_URL_VARIABLE}")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0 or options.repeat < 1 or options.ips < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --repeat >= 1 and --ips >= 1")
    try:
        parse_limit(options.limit)
        options.key_counts = [int(value) for value in options.keys.split(",") if value.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    options.parts = {part.strip() for part in options.parts.split(",") if part.strip()}
    if not options.parts <= set(PARTS) or not options.key_counts or min(options.key_counts) < 1:
        parser.error(f"--parts is a subset of {','.join(PARTS)}; --keys positive numbers")
    return options


def configure_logging() -> LimiterLog:
    access = logging.getLogger("thallus.access")
    access.propagate = False
    access.setLevel(logging.WARNING)  # as bench_core's default: only the level check is paid
    collected = LimiterLog()
    limiter = logging.getLogger("thallus.ratelimit")
    limiter.propagate = False
    limiter.addHandler(collected)
    return collected


def isolate_environment(names: Iterable[str]) -> None:
    """Drop THALLUS_* variables so the settings are exactly the benchmark's on every machine."""
    for name in list(names):
        if name.startswith("THALLUS_"):
            del os.environ[name]


async def run(options: argparse.Namespace, redis_url: str, limiter_log: LimiterLog) -> None:
    wanted = bool(options.parts & {"stacks", "redis"})
    skip = "--no-redis" if options.no_redis else None if wanted else "not among --parts"
    redis = await connect_redis(redis_url, skip=skip)
    if redis.skipped and skip is None:
        progress(f"Redis rows skipped: {redis.skipped}")
    found = candidates()
    if not HAVE_THROTTLED:
        progress("throttled-py is not installed (the bench extra): its rows are skipped")
    stacks: list[Stack] = []
    cells: dict[str, Cell] = {}
    requests: dict[str, RotatingRequest] = {}
    candidate_cells: dict[tuple[int, str], Cell] = {}
    redis_rows: list[RedisRow] = []
    try:
        if "stacks" in options.parts:
            addresses = client_addresses(options.ips)
            stacks = build_stacks(options.limit, redis)
            await check(stacks, addresses)
            requests = {stack.name: RotatingRequest(addresses) for stack in stacks}
            cells = await measure(
                stacks, requests, seconds=options.seconds, warmup=options.warmup, repeat=options.repeat
            )
        if "candidates" in options.parts:
            candidate_cells, candidate_requests = await measure_candidates(
                found, options.key_counts, seconds=options.seconds, warmup=options.warmup, repeat=options.repeat
            )
            requests.update(candidate_requests)
        if "redis" in options.parts and redis.available:
            redis_rows = await measure_redis_candidates(
                found, redis, ips=options.ips, seconds=options.seconds, warmup=options.warmup, repeat=options.repeat
            )
    finally:
        try:
            await delete_keys(redis)
        except Exception as exc:  # report, but do not hide the run's own outcome
            progress(f"could not delete the keys under {redis.prefix}*: {type(exc).__name__}: {exc}")
    bursts = [measure_burst(candidate) for candidate in found] if "burst" in options.parts else []
    problems = [f"{name}: {r.unexpected} responses were not 200" for name, r in requests.items() if r.unexpected]
    problems += [f"thallus.ratelimit logged: {message}" for message in dict.fromkeys(limiter_log.messages)]
    if problems:
        raise SystemExit(
            "the limiter refused or failed during timing; the numbers are void:\n  " + "\n  ".join(problems)
        )
    document = results_document(
        stacks=stacks,
        cells=cells,
        requests=requests,
        found=found,
        candidate_cells=candidate_cells,
        key_counts=options.key_counts,
        redis_rows=redis_rows,
        bursts=bursts,
        redis=redis,
        options=options,
    )
    print(json.dumps(document, indent=2) if options.json else render_text(document))


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    redis_url = os.environ.get(REDIS_URL_VARIABLE, DEFAULT_REDIS_URL)
    isolate_environment(os.environ)
    limiter_log = configure_logging()
    asyncio.run(run(options, redis_url, limiter_log))


if __name__ == "__main__":
    main()
