"""One storage call per request: the hit and the window it leaves, on memory and on a real Redis.

The single call must answer exactly what limits' two calls (``hit``, then ``get_window_stats``)
answer: same refusals, same ``remaining``, same ``reset``, refused hits not consuming, on the same
keys. A fake clock (limits' and Thallus's ``time.time``) makes every header value exact.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import coredis
import limits.aio.storage.redis.coredis
import limits.storage.memory
import pytest
from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

import thallus.ratelimit
from tests.apps import ok_app
from tests.asgi import acall, http_scope
from tests.conftest import RedisTarget
from tests.redis_support import new_prefix
from tests.tcp_proxy import TcpProxy, tcp_proxy
from thallus._asgi import ASGIApp
from thallus.ratelimit import (
    MemoryBackend,
    MemoryWindow,
    RateLimitMiddleware,
    RedisWindow,
    TwoCallWindow,
    WindowHit,
    create_storage,
    moving_window,
    parse_limit,
)

START = 1_700_000_000.0
CLIENT = "203.0.113.7"


class Clock:
    """``time`` with a settable ``time()``; everything else is the real module."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


#: Four requests against a limit of 3: status and remaining count of each.
FOUR_HITS_AT_THREE = [(200, "r=2"), (200, "r=1"), (200, "r=0"), (429, "r=0")]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Every ``time.time()`` of the moving window (limits' stores, Thallus's limiter) reads this clock."""
    fake = Clock(START)
    for module in (limits.storage.memory, limits.aio.storage.redis.coredis, thallus.ratelimit):
        monkeypatch.setattr(module, "time", fake)
    return fake


@dataclass(frozen=True)
class Backend:
    name: str
    url: str | None
    prefix: str

    def storage(self) -> Storage:
        """A fresh storage; create it inside the scenario's event loop (coredis binds to it)."""
        return create_storage(self.url, self.prefix)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory", None, new_prefix())
    target = request.getfixturevalue("redis_target")
    return Backend("redis", target.url, target.prefix)


def limiter(storage: Storage, prefix: str, *, two_calls: bool = False) -> RateLimitMiddleware:
    """A 3/minute limiter; with ``two_calls``, on limits' ``hit`` + ``get_window_stats`` (the old path)."""
    app = RateLimitMiddleware(ok_app, storage, general="3/minute", key_prefix=prefix)
    if two_calls:
        app.window = TwoCallWindow(storage)
    return app


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


#: (seconds after START, the answer) for a 3/minute limit. The hits refused at 3 s and 4 s take
#: nothing: at 60.5 s the hit of 0 s has left the window and one place is free again.
SCHEDULE = [
    (0.0, ok(2, 60)),
    (1.0, ok(1, 59)),
    (2.0, ok(0, 58)),
    (3.0, refused(57)),
    (4.0, refused(56)),
    (60.5, ok(0, 1)),  # window: 1, 2, 60.5 — resets when the hit of 1 s leaves, at 61 s
    (61.5, ok(0, 1)),  # window: 2, 60.5, 61.5
    (62.5, ok(0, 58)),  # window: 60.5, 61.5, 62.5
    (63.0, refused(58)),
    (125.0, ok(2, 60)),  # all gone
]


def test_the_middleware_makes_one_call_on_thallus_storages(backend: Backend) -> None:
    async def scenario() -> None:
        storage = backend.storage()
        app = limiter(storage, backend.prefix)
        assert isinstance(app.window, MemoryWindow if backend.name == "memory" else RedisWindow)

    asyncio.run(scenario())


def test_single_call_answers_as_the_two_calls_did(backend: Backend, clock: Clock) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        storage = backend.storage()
        single = limiter(storage, f"{backend.prefix}/one")
        double = limiter(storage, f"{backend.prefix}/two", two_calls=True)
        answers: tuple[list[Any], list[Any]] = ([], [])
        for offset, _ in SCHEDULE:
            clock.now = START + offset
            answers[0].append(await request(single))
            answers[1].append(await request(double))
        return answers

    single, double = asyncio.run(scenario())
    assert single == [answer for _, answer in SCHEDULE]
    assert double == single


def test_single_call_never_calls_limits_two_operations(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    storage_type = MemoryBackend if backend.name == "memory" else RedisStorage
    for name in ("acquire_entry", "get_moving_window"):
        original = getattr(storage_type, name)

        async def spy(self: Storage, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return await _original(self, *args)

        monkeypatch.setattr(storage_type, name, spy)

    async def scenario() -> list[Any]:
        app = limiter(backend.storage(), backend.prefix)
        return [await request(app) for _ in range(4)]

    answers = asyncio.run(scenario())
    assert [(status, (header or "").split(";")[1]) for status, header, _ in answers] == FOUR_HITS_AT_THREE
    assert calls == []


def test_concurrent_hits_each_see_their_own_window(backend: Backend) -> None:
    """Hit and window read are one atomic step: every hit taken reports a different ``remaining``."""
    limit = parse_limit("20/minute")

    async def scenario() -> list[WindowHit]:
        # three storages: three clients, as three instances would have (memory: one shared store)
        storages = [backend.storage()] * 3 if backend.name == "memory" else [backend.storage() for _ in range(3)]
        windows = [moving_window(storage) for storage in storages]
        return list(
            await asyncio.gather(*(windows[i % 3].hit(limit, backend.prefix, "general", CLIENT) for i in range(30)))
        )

    hits = asyncio.run(scenario())
    taken = [hit.remaining for hit in hits if hit.allowed]
    assert sorted(taken) == list(range(20))
    assert [hit.remaining for hit in hits if not hit.allowed] == [0] * 10


def test_memory_hit_and_window_is_thread_safe() -> None:
    storage = MemoryBackend()
    results: list[tuple[bool, float, int]] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(25):
            result = storage.hit_and_window("key", 50, 60)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(entries for allowed, _, entries in results if allowed) == list(range(1, 51))
    assert all(entries == 50 for allowed, _, entries in results if not allowed)


def test_memory_hit_and_window_without_limits_key_locks_uses_its_own() -> None:
    storage = MemoryBackend()
    storage._locks = None  # a limits whose store no longer has per-key locks
    assert [storage.hit_and_window("key", 2, 60)[::2] for _ in range(3)] == [(True, 1), (True, 2), (False, 2)]


# -- Redis: the same keys as limits, reloading, outages ------------------------------------------


def test_single_and_two_call_instances_share_the_count_on_redis(redis_target: RedisTarget, clock: Clock) -> None:
    """A rolling upgrade: an instance on the single call and one on limits' two calls count the same keys."""

    async def scenario() -> tuple[list[Any], int]:
        prefix = redis_target.prefix
        new = limiter(create_storage(redis_target.url, prefix), prefix)
        old = limiter(create_storage(redis_target.url, prefix), prefix, two_calls=True)
        answers = []
        for offset, app in ((0.0, new), (1.0, old), (2.0, new), (3.0, old), (4.0, new)):
            clock.now = START + offset
            answers.append(await request(app))
        stats = await MovingWindowRateLimiter(create_storage(redis_target.url, prefix)).get_window_stats(
            parse_limit("3/minute"), prefix, "general", CLIENT
        )
        return answers, stats.remaining

    answers, remaining = asyncio.run(scenario())
    assert answers == [answer for _, answer in SCHEDULE[:5]]
    assert remaining == 0, "limits' own window read sees the single call's hits"


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


# -- any other storage -------------------------------------------------------------------------


def test_other_storages_keep_the_two_calls() -> None:
    async def scenario() -> list[Any]:
        storage = AsyncMemoryStorage()
        app = limiter(storage, "other")
        assert isinstance(app.window, TwoCallWindow)
        return [await request(app) for _ in range(4)]

    answers = asyncio.run(scenario())
    assert [(status, (header or "").split(";")[1]) for status, header, _ in answers] == FOUR_HITS_AT_THREE
