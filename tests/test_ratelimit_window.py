"""The sliding-window counter, on memory and on a real Redis: exact headers, limits' answers, bounds.

A fake clock (``time.time`` of Thallus's store and of limits' reference) makes every header value
exact. The reference is limits' own sliding-window counter (``SlidingWindowCounterRateLimiter``
over its ``MemoryStorage``, windows aligned to the epoch as ours): every hit must be taken or
refused as there, with the same ``remaining`` and ``reset``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import coredis
import limits.storage.memory
import limits.strategies
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.aio.storage import MemoryStorage as LimitsAsyncMemoryStorage
from limits.storage import MemoryStorage as LimitsMemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

import thallus.limiter_store
from tests.apps import ok_app
from tests.asgi import acall, http_scope
from tests.conftest import RedisTarget
from tests.redis_support import new_prefix
from tests.tcp_proxy import TcpProxy, tcp_proxy
from thallus._asgi import ASGIApp
from thallus.limiter_store import LimitsCounter, MemoryCounter, MemoryStore, RedisStore, WindowHit
from thallus.ratelimit import RateLimitMiddleware, create_storage, parse_limit

#: The start of a one-minute window (28,333,333 × 60 s since the epoch).
START = 1_699_999_980.0
CLIENT = "203.0.113.7"
THREE = parse_limit("3/minute")


class Clock:
    """``time`` with a settable ``time()``; everything else is the real module."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Every ``time.time()`` of Thallus's stores and of limits' reference reads this clock."""
    fake = Clock(START)
    for module in (thallus.limiter_store, limits.storage.memory, limits.strategies):
        monkeypatch.setattr(module, "time", fake)
    return fake


@contextmanager
def limits_clock(fake: Clock) -> Iterator[None]:
    """limits' reference on ``fake`` (for hypothesis tests, which cannot take ``monkeypatch``)."""
    modules = [vars(limits.storage.memory), vars(limits.strategies)]
    originals = [module["time"] for module in modules]
    for module in modules:
        module["time"] = fake
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module["time"] = original


class Reference:
    """limits' own sliding-window counter: ``hit``, then ``get_window_stats``, on its MemoryStorage."""

    def __init__(self) -> None:
        self.limiter = SlidingWindowCounterRateLimiter(LimitsMemoryStorage())

    def hit(self, limit: Any, key: str, now: float) -> WindowHit:
        taken = self.limiter.hit(limit, key)
        stats = self.limiter.get_window_stats(limit, key)
        return taken, stats.remaining, math.ceil(stats.reset_time - now)


def same_answer(ours: WindowHit, theirs: WindowHit, now: float) -> bool:
    """Equal answers. At the very instant a window starts, limits reports ``reset`` 0 for this
    window's hits (its ``current_ttl % expiry`` is 0 there); they start to lose weight when the
    window ends, as ours says."""
    return ours == theirs or (now % 60 == 0 and ours[:2] == theirs[:2] and theirs[2] == 0)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str | None
    prefix: str

    def storage(self) -> MemoryStore | RedisStore:
        """A fresh storage; create it inside the scenario's event loop (coredis binds to it)."""
        return create_storage(self.url, self.prefix)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", None, new_prefix())
    target = request.getfixturevalue("redis_target")
    return Backend("redis", target.url, target.prefix)


def limiter(storage: Any, prefix: str, limit: str = "3/minute") -> RateLimitMiddleware:
    return RateLimitMiddleware(ok_app, storage, general=limit, key_prefix=prefix)


async def request(app: ASGIApp, client: str = CLIENT) -> tuple[int, str | None, str | None]:
    """(status, ``RateLimit``, ``Retry-After``) of one ``GET /items`` from ``client``."""
    scope = http_scope("GET", "/items", [])
    scope["client"] = (client, 40000)
    response = await acall(app, scope)
    return response.status, response.header("ratelimit"), response.header("retry-after")


def ok(remaining: int, seconds: int) -> tuple[int, str, None]:
    return 200, f'"general";r={remaining};t={seconds}', None


def refused(seconds: int) -> tuple[int, str, str]:
    return 429, f'"general";r=0;t={seconds}', "60"


#: (seconds after START, the answer) for 3/minute. The first hit starts the client's window;
#: ``t`` is the seconds until ``r`` grows; on a 429, until a request is taken again. In the second
#: window the first one's 3 hits weigh 3 × (seconds left) / 60, and a hit is taken while floor(that)
#: + this window's hits < 3.
SCHEDULE = [
    (0.0, ok(2, 60)),  # r grows when this window ends and its hits start to lose weight
    (10.0, ok(1, 50)),
    (20.0, ok(0, 40)),
    (30.0, refused(30)),  # refused hits count nothing
    (59.0, refused(1)),
    (60.5, ok(0, 20)),  # 3 × 59.5/60 = 2.975 → 2 + 0 < 3; the weight falls below 2 at 80 s
    (61.0, refused(19)),  # 3 × 59/60 = 2.95 → 2 + 1
    (80.5, ok(0, 20)),  # 1.975 → 1 + 1 < 3; below 1 at 100 s
    (100.5, ok(0, 20)),  # 0.975 → 0 + 2 < 3; this window's 3 hits start to fall at 120 s
    (101.0, refused(19)),
    (121.0, ok(0, 19)),  # third window: the second's 3 hits, 3 × 59/60 → 2 + 0; below 2 at 140 s
    (250.0, ok(2, 60)),  # no hit for two windows: forgotten, this hit starts a window
]


def test_headers_are_exact(backend: Backend, clock: Clock) -> None:
    async def scenario() -> list[Any]:
        app = limiter(backend.storage(), backend.prefix)
        answers = []
        for offset, _ in SCHEDULE:
            clock.now = START + offset
            answers.append(await request(app))
        return answers

    assert asyncio.run(scenario()) == [answer for _, answer in SCHEDULE]


def test_every_hit_is_answered_as_limits_answers_it(backend: Backend, clock: Clock) -> None:
    """400 hits of two clients at random times over five windows: taken, remaining and reset as limits'.

    Both start at a window start of limits' (the epoch's) and never pause for a window, so their
    windows are limits' windows."""
    chance = random.Random(7)
    times = [0.0, 0.0, *sorted(chance.uniform(0, 300) for _ in range(400))]
    clients = ["198.51.100.1", "198.51.100.2", *(chance.choice(("198.51.100.1", "198.51.100.2")) for _ in times[2:])]
    limit = parse_limit("20/minute")
    reference = Reference()

    async def scenario() -> list[tuple[WindowHit, WindowHit]]:
        counter = backend.storage().counter("reference", limit)
        pairs = []
        for offset, client in zip(times, clients, strict=True):
            clock.now = START + offset
            pairs.append((await counter.hit(client), reference.hit(limit, client, clock.now)))
        return pairs

    pairs = asyncio.run(scenario())
    assert all(same_answer(ours, theirs, START + offset) for (ours, theirs), offset in zip(pairs, times, strict=True))
    assert {taken for (taken, _, _), _ in pairs} == {True, False}, "the schedule reaches the limit"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60 * 64 - 1), min_size=1, max_size=120), st.integers(1, 12))
def test_memory_answers_as_limits_answers(gaps: list[int], amount: int) -> None:
    """Any schedule (in 1/64 s, from a window start of limits', never pausing for a whole window),
    any limit: the memory counter answers each hit as limits does."""
    limit = parse_limit(f"{amount}/minute")
    counter, reference = MemoryCounter(amount, 60), Reference()
    fake = Clock(START)
    with limits_clock(fake):
        for tick in itertools.accumulate(gaps, initial=0):
            fake.now = START + tick / 64
            assert same_answer(counter.take("client", fake.now), reference.hit(limit, "client", fake.now), fake.now)


# -- the worst case ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5 * 60 * 64), min_size=1, max_size=200), st.integers(1, 10))
def test_no_schedule_beats_the_burst_bound(ticks: list[int], amount: int) -> None:
    """In any d ≤ W seconds at most limit + ceil(limit × d / W) hits are taken: limit + 1 in an
    instant across a window boundary, 2 × limit within a window's length."""
    counter = MemoryCounter(amount, 60)
    taken = [tick / 64 for tick in sorted(ticks) if counter.take("client", START + tick / 64)[0]]
    for first, start in enumerate(taken):
        for last in range(first, len(taken)):
            span = taken[last] - start
            if span > 60:
                break
            assert last - first + 1 <= amount + math.ceil(amount * span / 60)


def test_the_burst_bound_is_reached() -> None:
    """The worst case, built: a client's second window used only at its very end, one more hit an
    instant later, then one each time those hits' weight falls — 2 × limit within 60 s."""
    counter = MemoryCounter(10, 60)
    assert counter.take("client", START)[0]  # its windows: [0, 60), [60, 120), [120, 180) …
    end = START + 120
    assert [counter.take("client", end - 0.01)[0] for _ in range(11)] == [True] * 10 + [False]
    assert [counter.take("client", end + 0.01)[0] for _ in range(2)] == [True, False], "limit + 1 in 0.02 s"
    later = [end + tick / 4 for tick in range(1, 4 * 60)]
    taken = [moment for moment in later if counter.take("client", moment)[0]]
    assert len(taken) == 9, "the other 9 of the third window's 10"
    assert taken[-1] - (end - 0.01) < 60, "20 hits within one window's length"


def test_a_client_idle_for_two_windows_starts_afresh() -> None:
    counter = MemoryCounter(3, 60)
    assert [counter.take("client", START + second) for second in (0, 1, 2)] == [
        (True, 2, 60),
        (True, 1, 59),
        (True, 0, 58),
    ]
    assert counter.take("client", START + 119) == (True, 2, 1), "its second window: 3 × 1/60 weighs nothing"
    assert counter.take("client", START + 240) == (True, 2, 60), "two windows (from 60 s) without a hit"


# -- one call, many callers ----------------------------------------------------------------------


def test_concurrent_hits_each_see_their_own_count(backend: Backend) -> None:
    """Hit and read are one atomic step: every hit taken reports a different ``remaining``."""
    limit = parse_limit("20/minute")

    async def scenario() -> list[WindowHit]:
        # three storages: three instances (memory: one shared store)
        storages = [backend.storage()] * 3 if backend.name == "memory" else [backend.storage() for _ in range(3)]
        counters = [storage.counter(backend.prefix, limit) for storage in storages]
        return list(await asyncio.gather(*(counters[i % 3].hit(CLIENT) for i in range(30))))

    hits = asyncio.run(scenario())
    assert sorted(remaining for taken, remaining, _ in hits if taken) == list(range(20))
    assert [remaining for taken, remaining, _ in hits if not taken] == [0] * 10


def test_memory_counter_is_thread_safe() -> None:
    counter = MemoryCounter(50, 60)
    results: list[WindowHit] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(25):
            result = counter.take("key", START + 1)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(remaining for taken, remaining, _ in results if taken) == list(range(50))
    assert all(remaining == 0 for taken, remaining, _ in results if not taken)


def test_limiters_on_one_prefix_share_the_count(backend: Backend, clock: Clock) -> None:
    """Two instances (two storages on one Redis; one memory store): one budget, exact headers throughout."""

    async def scenario() -> list[Any]:
        if backend.name == "memory":
            storage = backend.storage()
            first, second = limiter(storage, backend.prefix), limiter(storage, backend.prefix)
        else:
            first, second = limiter(backend.storage(), backend.prefix), limiter(backend.storage(), backend.prefix)
        answers = []
        for (offset, _), app in zip(SCHEDULE, [first, second] * len(SCHEDULE), strict=False):
            clock.now = START + offset
            answers.append(await request(app))
        return answers

    assert asyncio.run(scenario()) == [answer for _, answer in SCHEDULE]


def test_a_clock_that_went_back_counts_in_the_newest_window(backend: Backend, clock: Clock) -> None:
    """An instance whose clock lags one that started the next window counts in that window."""

    async def scenario() -> list[WindowHit]:
        counter = backend.storage().counter(backend.prefix, THREE)
        clock.now = START + 60.5
        hits = [await counter.hit(CLIENT)]
        clock.now = START + 59.5  # behind: still the first window by this clock
        return [*hits, await counter.hit(CLIENT), await counter.hit(CLIENT), await counter.hit(CLIENT)]

    assert asyncio.run(scenario()) == [(True, 2, 60), (True, 1, 60), (True, 0, 60), (False, 0, 60)]


# -- cost: memory, threads, round trips ------------------------------------------------------------


def test_memory_per_client_is_constant_and_no_thread_starts() -> None:
    """50,000 clients: one entry each whatever their hits; no thread, no timer."""
    threads = threading.active_count()
    counter = MemoryCounter(1_000_000, 60)
    clients = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(50_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for client in clients:
            counter.take(client, START + 1)
        one_hit = tracemalloc.get_traced_memory()[0] - before
        for _ in range(20):
            for client in clients[:1000]:
                counter.take(client, START + 2)
        twenty_more = tracemalloc.get_traced_memory()[0] - before - one_hit
    finally:
        tracemalloc.stop()
    assert len(counter) == 50_000
    assert one_hit / 50_000 < 160, (
        f"{one_hit / 50_000:.0f} bytes per client (94 measured: a slots object and its dict entry)"
    )
    assert twenty_more < 1000, "more hits by the same clients take no memory"
    assert counter.take(clients[0], START + 3)[1] == 1_000_000 - 22
    assert threading.active_count() == threads


def test_stale_clients_are_swept_by_later_hits_without_a_thread() -> None:
    threads = threading.active_count()
    counter = MemoryCounter(100, 60)
    for i in range(1000):
        counter.take(f"198.51.100.{i}", START + 1)
    for seconds in (61, 121):  # while their windows may still count, the 1000 are kept
        counter.take("203.0.113.1", START + seconds)
        assert len(counter) == 1001
    counter.take("203.0.113.1", START + 181)  # three periods on: forgotten, and each hit deletes two
    assert len(counter) == 999
    for tenth in range(499):
        counter.take("203.0.113.1", START + 182 + tenth / 10)
    assert len(counter) == 1, "only the active client is left"
    assert threading.active_count() == threads


def test_one_redis_command_per_request(redis_target: RedisTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request is one EVALSHA and waits for one round trip: alone, a pipeline of one; the
    requests of one event-loop turn share one pipeline. Nothing else is sent."""
    commands: list[bytes] = []
    batches: list[list[bytes]] = []
    execute = coredis.Redis.execute_command
    flush = thallus.limiter_store.RedisBatch._flush

    async def counting(self: coredis.Redis[Any], command: Any, *args: Any, **options: Any) -> Any:
        commands.append(bytes(command.name))
        return await execute(self, command, *args, **options)

    async def recording(self: thallus.limiter_store.RedisBatch, batch: list[Any]) -> None:
        batches.append([b"EVALSHA" for _ in batch])  # each entry is one script call
        await flush(self, batch)

    async def scenario() -> tuple[list[Any], list[Any]]:
        app = limiter(create_storage(redis_target.url, redis_target.prefix), redis_target.prefix, "100/minute")
        await request(app)  # connects (the handshake is not a request's)
        monkeypatch.setattr(coredis.Redis, "execute_command", counting)
        monkeypatch.setattr(thallus.limiter_store.RedisBatch, "_flush", recording)
        one_by_one = [await request(app) for _ in range(10)]
        together = list(await asyncio.gather(*(request(app) for _ in range(10))))
        return one_by_one, together

    one_by_one, together = asyncio.run(scenario())
    assert [status for status, _, _ in one_by_one + together] == [200] * 20
    assert commands == [], "nothing outside the pipelines"
    assert batches == [[b"EVALSHA"]] * 10 + [[b"EVALSHA"] * 10], "one call a request; one turn, one round trip"
    remaining = sorted(int((header or "").split("r=")[1].split(";")[0]) for _, header, _ in together)
    assert remaining == list(range(79, 89)), "each of the ten concurrent hits counted once, exactly"


# -- Redis: reloading, outages ----------------------------------------------------------------------


def test_redis_script_is_loaded_again_after_a_flush(redis_target: RedisTarget) -> None:
    async def scenario() -> list[Any]:
        app = limiter(create_storage(redis_target.url, redis_target.prefix), redis_target.prefix)
        first = await request(app)
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_target.url, connect_timeout=2, stream_timeout=2)
        await client.script_flush()  # as a restarted server: NOSCRIPT on the next EVALSHA
        return [first, await request(app)]

    answers = asyncio.run(scenario())
    assert [header.split(";")[1] for _, header, _ in answers if header] == ["r=2", "r=1"]


@pytest.fixture
def proxied_redis(redis_target: RedisTarget) -> Iterator[tuple[str, TcpProxy]]:
    parts = urlsplit(redis_target.url)
    with tcp_proxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        netloc = f"127.0.0.1:{proxy.port}"
        if parts.username or parts.password:
            netloc = f"{parts.username or ''}:{parts.password or ''}@{netloc}"
        yield urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), proxy


def test_redis_outage_fails_open_and_the_count_resumes(
    redis_target: RedisTarget, proxied_redis: tuple[str, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="thallus.ratelimit")
    url, proxy = proxied_redis

    async def scenario() -> list[Any]:
        app = limiter(create_storage(url, redis_target.prefix), redis_target.prefix)
        answers = [await request(app)]
        proxy.cut()
        answers += [await request(app), await request(app)]
        proxy.restore()
        answers += [await request(app) for _ in range(3)]
        return answers

    answers = asyncio.run(scenario())
    statuses = [status for status, _, _ in answers]
    remaining = [header.split(";")[1] if header else None for _, header, _ in answers]
    assert statuses == [200, 200, 200, 200, 200, 429]
    assert remaining == ["r=2", None, None, "r=1", "r=0", "r=0"], "unlimited while cut; hits then count on"
    errors = [r for r in caplog.records if r.name == "thallus.ratelimit"]
    assert len(errors) == 1
    assert "not enforced" in errors[0].getMessage()


# -- the stores, and any limits storage -----------------------------------------------------------


def test_create_storage_gives_memory_or_redis() -> None:
    assert isinstance(create_storage(None, "t"), MemoryStore)
    assert isinstance(create_storage("redis://127.0.0.1:6379/0", "t"), RedisStore)


def test_any_limits_storage_goes_through_limits_own_strategy() -> None:
    async def scenario() -> list[Any]:
        storage = LimitsAsyncMemoryStorage()
        app = limiter(storage, "other")
        assert isinstance(app.general.counter, LimitsCounter)
        return [await request(app) for _ in range(4)]

    answers = asyncio.run(scenario())
    assert [(status, (header or "").split(";")[1]) for status, header, _ in answers] == [
        (200, "r=2"),
        (200, "r=1"),
        (200, "r=0"),
        (429, "r=0"),
    ]
