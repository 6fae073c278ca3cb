"""Per-request cost of Thallus's rate limiter, with memory and with Redis storage.

Same harness as ``bench_core.py``: ASGI applications called directly, in process, on one asyncio
event loop, with a hand-built ``scope`` — no sockets, server or test client. Every request is
``GET /items`` (a small JSON answer), and the client address (``scope["client"]``) rotates over a
pool of ``--ips`` addresses, so the limiter works on many keys, none of them near its limit.

Stacks, each on its own but identical Starlette application:

* ``bare``         — Starlette with ``GET /items``;
* ``memory``       — ``RateLimitMiddleware`` with ``create_storage(None, prefix)`` → the bare app;
* ``redis``        — ``RateLimitMiddleware`` with ``create_storage(url, prefix)`` → the bare app;
* ``stack``        — ``protect(app, production settings, rate_limit_enabled=False)``;
* ``stack+memory`` — the same with the limiter on, memory storage;
* ``stack+redis``  — the same with the limiter on, ``redis_url`` set.

The Redis URL is ``THALLUS_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); the run uses
a key prefix of its own and deletes its keys at the end. Without a reachable Redis, the Redis
rows are skipped and the reason is printed.

After each request the harness yields to the event loop once (``asyncio.sleep(0)``), as a server
does between requests, so background work a storage schedules (the memory storage's expiry sweep,
coredis's socket reads) runs and is counted. A second table times, on their own, limits' two storage
calls the middleware used to make per request (``hit`` and ``get_window_stats``) and the one call
that replaced them (``moving_window(storage).hit``).
Run ``.venv/bin/python benchmarks/bench_ratelimit.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import itertools
import json
import logging
import math
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import coredis
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Scope

from common import describe, environment, progress, redacted_url, text_table
from thallus import Settings, protect
from thallus.ratelimit import RateLimitMiddleware, create_storage, moving_window, parse_limit

SECRET = "x" * 40
APP_ORIGIN = "https://app.example.com"
PUBLIC_ORIGIN = "https://api.example.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_VARIABLE = "THALLUS_TEST_REDIS_URL"
#: Requests timed between two clock reads; the same for every stack.
BATCH = 100
PACKAGES = ("thallus", "starlette", "limits", "coredis")
#: The policy every request falls under (``GET /items`` is neither an auth path nor exempt).
POLICY = "general"


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
    #: a memory storage whose background expiry sweep is awaited (and counted) after each run
    storage: Storage | None = None


def thallus_settings(*, limit: str, enabled: bool = True, redis_url: str | None = None, prefix: str) -> Settings:
    return Settings(
        env="production",
        secret_key=SECRET,
        allowed_origins=(APP_ORIGIN,),
        public_origin=PUBLIC_ORIGIN,
        rate_limit_enabled=enabled,
        rate_limit=limit,
        redis_url=redis_url,
        redis_key_prefix=prefix,
    )


def limiter_alone(storage: Storage, *, limit: str, prefix: str) -> RateLimitMiddleware:
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
            storage=memory_storage,
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
            # the storage protect() would create itself without redis_url, passed in to await its sweep
            protect(
                make_app(),
                thallus_settings(limit=limit, prefix="bench-stack"),
                rate_limit_storage=stack_storage,
            ),
            "stack",
            limited=True,
            storage=stack_storage,
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


async def connect_redis(url: str, *, skip: bool) -> RedisTarget:
    target = RedisTarget(url, f"thallus-bench-{os.getpid()}-{secrets.token_hex(4)}")
    if skip:
        target.skipped = "--no-redis"
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


async def settle(storage: Storage | None) -> None:
    """Wait for the expiry sweep a memory storage runs in the background (a task on this loop)."""
    if isinstance(storage, MemoryStorage) and storage.timer is not None and not storage.timer.done():
        await asyncio.wait({storage.timer})


async def timed_run(
    call: Call, seconds: float, *, storage: Storage | None = None, yield_to_loop: bool = True, batch: int = BATCH
) -> float:
    """Call ``call`` in batches until ``seconds`` have passed; return nanoseconds per call.

    With ``yield_to_loop``, each call is followed by one pass of the event loop, as a server gives
    between requests. Background work left at the end (a memory storage's sweep) is awaited and
    counted.
    """
    clock = time.perf_counter_ns
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
    await settle(storage)
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
        await timed_run(requests[stack.name].call(stack.app), warmup, storage=stack.storage)
    order = list(stacks)
    for repetition in range(repeat):
        progress(f"stacks: repetition {repetition + 1}/{repeat}")
        # rotate the order each repetition so no stack always runs first (or last)
        shift = repetition % len(order)
        for stack in order[shift:] + order[:shift]:
            gc.collect()
            per_call = await timed_run(requests[stack.name].call(stack.app), seconds, storage=stack.storage)
            cells[stack.name].runs_ns.append(per_call)
    return cells


# -- where the limiter's time goes --------------------------------------------------------------


@dataclass
class Operation:
    storage: str
    name: str
    description: str
    call: Call
    settle_storage: Storage | None = None
    yield_to_loop: bool = True
    #: calls between two clock reads
    batch: int = BATCH


class StorageCalls:
    """limits' two storage calls and Thallus's single one on one storage, one address after another."""

    def __init__(self, storage: Storage, limit: RateLimitItem, prefix: str, addresses: Sequence[str]) -> None:
        self.limiter = MovingWindowRateLimiter(storage)
        self.window = moving_window(storage)
        self.limit = limit
        self.prefix = prefix
        self._addresses = itertools.cycle(addresses)
        self.refused = 0

    async def hit(self) -> None:
        if not await self.limiter.hit(self.limit, self.prefix, POLICY, next(self._addresses)):
            self.refused += 1

    async def stats(self) -> None:
        await self.limiter.get_window_stats(self.limit, self.prefix, POLICY, next(self._addresses))

    async def both(self) -> None:
        """What ``RateLimitMiddleware`` did before the single call: hit, then read the window."""
        address = next(self._addresses)
        if not await self.limiter.hit(self.limit, self.prefix, POLICY, address):
            self.refused += 1
        await self.limiter.get_window_stats(self.limit, self.prefix, POLICY, address)

    async def single(self) -> None:
        """What ``RateLimitMiddleware`` does: hit and window read in one storage call."""
        if not (await self.window.hit(self.limit, self.prefix, POLICY, next(self._addresses))).allowed:
            self.refused += 1

    async def hit_and_sweep(self) -> None:
        """A hit, then the whole expiry sweep of a memory storage it starts (when none is running)."""
        await self.hit()
        await settle(self.limiter.storage)

    async def overlapped(self) -> None:
        """Both calls in flight at once (``asyncio.gather``): the second round trip overlapped."""
        address = next(self._addresses)
        allowed, _ = await asyncio.gather(
            self.limiter.hit(self.limit, self.prefix, POLICY, address),
            self.limiter.get_window_stats(self.limit, self.prefix, POLICY, address),
        )
        if not allowed:
            self.refused += 1


def build_operations(
    limit: RateLimitItem, addresses: Sequence[str], redis: RedisTarget
) -> tuple[list[Operation], list[StorageCalls]]:
    """Fresh storages (not the stacks'), so these calls add no hits to the stacks' keys."""
    memory_storage = create_storage(None, "bench-ops")
    memory = StorageCalls(memory_storage, limit, "bench-ops", addresses)
    operations = [
        Operation("memory", "hit", "limiter.hit → acquire_entry", memory.hit, memory_storage),
        Operation("memory", "stats", "limiter.get_window_stats → get_moving_window", memory.stats, memory_storage),
        Operation("memory", "hit+stats", "both, in sequence (the middleware before)", memory.both, memory_storage),
        Operation(
            "memory",
            "hit+window",
            "one call: MemoryBackend.hit_and_window (the middleware now)",
            memory.single,
            memory_storage,
        ),
        Operation(
            "memory",
            "hit+stats, no yield",
            "both, never yielding to the loop: the expiry sweep never runs",
            memory.both,
            memory_storage,
            yield_to_loop=False,
        ),
        # last: the calls above have put every address of the pool in the storage
        Operation(
            "memory",
            "hit, full sweep",
            f"a hit, then the expiry sweep it starts over all {len(addresses)} keys (an idle server's request)",
            memory.hit_and_sweep,
            memory_storage,
            yield_to_loop=False,
            batch=1,
        ),
    ]
    calls = [memory]
    if redis.client is not None:
        client = redis.client
        prefix = f"{redis.prefix}/ops"
        remote = StorageCalls(create_storage(redis.url, prefix), limit, prefix, addresses)
        calls.append(remote)
        operations += [
            Operation("redis", "PING", "one round trip, nothing else (coredis, own client)", client.ping),
            Operation("redis", "hit", "limiter.hit → EVALSHA acquire_moving_window", remote.hit),
            Operation("redis", "stats", "limiter.get_window_stats → EVALSHA moving_window", remote.stats),
            Operation("redis", "hit+stats", "both, in sequence (the middleware before)", remote.both),
            Operation(
                "redis",
                "hit+window",
                "one EVALSHA: Thallus's hit-and-window script (the middleware now)",
                remote.single,
            ),
            Operation("redis", "hit‖stats", "both at once, asyncio.gather", remote.overlapped),
        ]
    return operations, calls


async def measure_operations(
    operations: Sequence[Operation], *, seconds: float, warmup: float, repeat: int
) -> dict[tuple[str, str], Cell]:
    cells = {(op.storage, op.name): Cell() for op in operations}
    for op in operations:
        await timed_run(op.call, warmup, storage=op.settle_storage, yield_to_loop=op.yield_to_loop, batch=op.batch)
    for repetition in range(repeat):
        progress(f"storage calls: repetition {repetition + 1}/{repeat}")
        for op in operations:
            gc.collect()
            per_call = await timed_run(
                op.call, seconds, storage=op.settle_storage, yield_to_loop=op.yield_to_loop, batch=op.batch
            )
            cells[(op.storage, op.name)].runs_ns.append(per_call)
    return cells


# -- reporting ---------------------------------------------------------------------------------


def results_document(
    *,
    stacks: Sequence[Stack],
    cells: dict[str, Cell],
    requests: dict[str, RotatingRequest],
    operations: Sequence[Operation],
    op_cells: dict[tuple[str, str], Cell],
    redis: RedisTarget,
    options: argparse.Namespace,
) -> dict[str, Any]:
    rows = []
    for stack in stacks:
        cell = cells[stack.name]
        row: dict[str, Any] = {
            "stack": stack.name,
            "description": stack.description,
            "median_us": round(cell.median_us, 3),
            "best_us": round(cell.best_us, 3),
            "runs_us": [round(ns / 1000, 3) for ns in cell.runs_ns],
            "spread": round(cell.spread, 4),
            "requests": requests[stack.name].sent,
            "baseline": stack.baseline,
        }
        if stack.baseline is not None:
            base = cells[stack.baseline].median_us
            row["added_us"] = round(cell.median_us - base, 3)
            row["ratio"] = round(cell.median_us / base, 3)
            row["share"] = round((cell.median_us - base) / cell.median_us, 4)
        rows.append(row)
    by_name = {row["stack"]: row for row in rows}
    limiter_added = {
        label: by_name[name]["added_us"]
        for label, name in (
            ("memory", "memory"),
            ("redis", "redis"),
            ("memory_in_stack", "stack+memory"),
            ("redis_in_stack", "stack+redis"),
        )
        if name in by_name
    }
    breakdown = [
        {
            "storage": op.storage,
            "operation": op.name,
            "description": op.description,
            "median_us": round(op_cells[(op.storage, op.name)].median_us, 3),
            "best_us": round(op_cells[(op.storage, op.name)].best_us, 3),
            "runs_us": [round(ns / 1000, 3) for ns in op_cells[(op.storage, op.name)].runs_ns],
            "spread": round(op_cells[(op.storage, op.name)].spread, 4),
            "yield_to_loop": op.yield_to_loop,
        }
        for op in operations
    ]
    limited = [stack.name for stack in stacks if stack.limited]
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
            "yield_per_request": True,
        },
        "redis": {
            "url": redis.display_url,
            "server_version": redis.version,
            "skipped": redis.skipped,
            "key_prefix": redis.prefix if redis.available else None,
            "keys_deleted": redis.keys_deleted,
        },
        # each request of a limiter stack hits the key of its address; with the one check request,
        # no key can hold more hits than this
        "max_hits_per_key": max(math.ceil(requests[name].sent / options.ips) for name in limited) + 1,
        "limit_amount": parse_limit(options.limit).amount,
        "results": rows,
        "limiter_added_us": limiter_added,
        "breakdown": breakdown,
    }


def rendertext_table(document: dict[str, Any]) -> str:
    env = document["environment"]
    options = document["options"]
    redis = document["redis"]
    server = f"Redis server {redis['server_version']} at {redis['url']}" if redis["server_version"] else "no Redis"
    lines = [
        *describe(env, f"; {server}"),
        f"{options['repeat']} repetitions x {options['seconds']} s per stack (warm-up {options['warmup']} s); "
        f"median µs per request; in-process ASGI calls, one event loop, one loop pass after each request",
        f"GET /items from {options['ips']} rotating client IPs, limit {options['limit']} "
        f"(at most {document['max_hits_per_key']} hits on any one key; every timed response was 200)",
    ]
    if redis["skipped"]:
        lines.append(f"Redis rows SKIPPED: {redis['skipped']}")
    lines.append("")
    rows = []
    for row in document["results"]:
        base = row["baseline"]
        rows.append(
            (
                row["stack"],
                f"{row['median_us']:.2f}",
                f"{row['best_us']:.2f}",
                f"{row['spread']:.1%}",
                base or "",
                f"{row['added_us']:+.2f}" if base else "",
                f"{row['ratio']:.2f}x" if base else "",
                f"{row['share']:.0%}" if base else "",
            )
        )
    lines += text_table(("stack", "µs/req", "best", "spread", "vs", "added µs", "ratio", "share"), rows, "lrrrlrrr")
    lines.append("")
    lines += [f"{row['stack']:<13} {row['description']}" for row in document["results"]]
    lines += [
        "",
        "µs/req: median of the repetitions; best: the fastest repetition, the least disturbed by other load.",
        "added µs / ratio: medians against the `vs` stack; share: the added µs as a part of the row's own time.",
        "spread: (max-min)/median of the repetitions; above ~5 % the machine was busy.",
        "",
        "Where the limiter's time goes: each storage call alone, same address rotation, one loop pass per call"
        " unless noted",
        "",
    ]
    lines += text_table(
        ("storage", "call", "µs/call", "best", "spread", "what"),
        (
            (
                op["storage"],
                op["operation"],
                f"{op['median_us']:.2f}",
                f"{op['best_us']:.2f}",
                f"{op['spread']:.1%}",
                op["description"],
            )
            for op in document["breakdown"]
        ),
        "llrrrl",
    )
    if redis["key_prefix"]:
        lines += [
            "",
            f"Redis: {redis['keys_deleted']} keys under {redis['key_prefix']}* deleted "
            "(keys idle for a whole window had expired already).",
        ]
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timed run (default 1.0)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per stack (default 5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up per stack (default 0.3)")
    parser.add_argument("--ips", type=int, default=1000, help="client addresses rotated over (default 1000)")
    parser.add_argument(
        "--limit", default="100000/minute", help="the general limit, limits notation (default 100000/minute)"
    )
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip the table of single storage calls (half the run time)"
    )
    parser.add_argument("--no-redis", action="store_true", help=f"skip the Redis rows even if {REDIS_URL_VARIABLE}")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0 or options.repeat < 1 or options.ips < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --repeat >= 1 and --ips >= 1")
    try:
        parse_limit(options.limit)
    except ValueError as exc:
        parser.error(str(exc))
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
    redis = await connect_redis(redis_url, skip=options.no_redis)
    if redis.skipped:
        progress(f"Redis rows skipped: {redis.skipped}")
    try:
        addresses = client_addresses(options.ips)
        stacks = build_stacks(options.limit, redis)
        await check(stacks, addresses)
        requests = {stack.name: RotatingRequest(addresses) for stack in stacks}
        operations: list[Operation] = []
        calls: list[StorageCalls] = []
        if not options.no_breakdown:
            operations, calls = build_operations(parse_limit(options.limit), addresses, redis)
        op_seconds = options.seconds / 2
        total = len(stacks) * (options.warmup + options.repeat * options.seconds) + len(operations) * (
            options.warmup / 2 + options.repeat * op_seconds
        )
        progress(f"measuring {len(stacks)} stacks and {len(operations)} storage calls, about {total:.0f} s")
        cells = await measure(stacks, requests, seconds=options.seconds, warmup=options.warmup, repeat=options.repeat)
        op_cells = await measure_operations(
            operations, seconds=op_seconds, warmup=options.warmup / 2, repeat=options.repeat
        )
    finally:
        try:
            await delete_keys(redis)
        except Exception as exc:  # report, but do not hide the run's own outcome
            progress(f"could not delete the keys under {redis.prefix}*: {type(exc).__name__}: {exc}")
    problems = [f"{name}: {r.unexpected} responses were not 200" for name, r in requests.items() if r.unexpected]
    problems += [f"storage calls: {c.refused} hits refused" for c in calls if c.refused]
    problems += [f"thallus.ratelimit logged: {message}" for message in dict.fromkeys(limiter_log.messages)]
    if problems:
        raise SystemExit(
            "the limiter refused or failed during timing; the numbers are void:\n  " + "\n  ".join(problems)
        )
    document = results_document(
        stacks=stacks,
        cells=cells,
        requests=requests,
        operations=operations,
        op_cells=op_cells,
        redis=redis,
        options=options,
    )
    print(json.dumps(document, indent=2) if options.json else rendertext_table(document))


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    redis_url = os.environ.get(REDIS_URL_VARIABLE, DEFAULT_REDIS_URL)
    isolate_environment(os.environ)
    limiter_log = configure_logging()
    asyncio.run(run(options, redis_url, limiter_log))


if __name__ == "__main__":
    main()
