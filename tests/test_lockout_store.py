"""The lockout's atomic steps (docs/design.md §10) on memory and a real Redis, and the Argon2 slots.

At most ``threshold`` passwords may be verified between two locks, however concurrent the
attempts: an attempt is reserved before its password is checked, so these tests race many
reservations at once — in one process, and through two Redis clients standing for two instances.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisTarget
from thallus.server.identity.lockout import (
    Attempt,
    LockoutStore,
    LockoutUnavailableError,
    LoginLockout,
    MemoryLockoutStore,
    RedisLockoutStore,
    Reservation,
)
from thallus.server.identity.passwords import HASHING_NICENESS, HashingSlots, HashingUnavailableError

THRESHOLD = 5


@pytest.fixture(params=["memory", "redis"])
def new_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], LockoutStore]]:
    """A factory: memory gives one shared store; Redis a new client each call (another instance)."""
    if request.param == "memory":
        store = MemoryLockoutStore()
        yield lambda: store
        return
    target: RedisTarget = request.getfixturevalue("redis_target")
    yield lambda: RedisLockoutStore(target.url)


def lockout(store: LockoutStore, prefix: str = "thallus-test", **options: object) -> LoginLockout:
    return LoginLockout(store, threshold=THRESHOLD, steps=(60, 120), key_prefix=prefix, **options)  # type: ignore[arg-type]


def prefix_of(request: pytest.FixtureRequest) -> str:
    target = request.getfixturevalue("redis_target") if "redis" in request.node.name else None
    return target.prefix if target else "thallus-test"


async def race(lockouts: list[LoginLockout], attempts: int, subject: str) -> list[Attempt | Reservation]:
    return list(await asyncio.gather(*(lockouts[i % len(lockouts)].reserve(subject) for i in range(attempts))))


def test_concurrent_reservations_never_exceed_the_threshold(
    new_store: Callable[[], LockoutStore], request: pytest.FixtureRequest
) -> None:
    prefix = prefix_of(request)

    async def scenario() -> None:
        lockouts = [lockout(new_store(), prefix) for _ in range(2)]
        outcomes = await race(lockouts, 30, "hank@example.com")
        reserved = [o for o in outcomes if isinstance(o, Attempt)]
        assert len(reserved) == THRESHOLD
        assert all(isinstance(o, Reservation) and o.verdict == "busy" for o in outcomes if o not in reserved)
        failed = await asyncio.gather(*(attempt.failed() for attempt in reserved))
        assert sorted(f.failed_attempts for f in failed) == [1, 2, 3, 4, 5]
        assert [f.locked_for for f in failed if f.locked_for] == [60], "exactly one lock, at the threshold"
        again = await race(lockouts, 10, "hank@example.com")
        assert all(isinstance(o, Reservation) and o.verdict == "locked" and 0 < o.seconds <= 60 for o in again)

    asyncio.run(scenario())


def test_a_success_resets_and_a_release_gives_the_slot_back(
    new_store: Callable[[], LockoutStore], request: pytest.FixtureRequest
) -> None:
    prefix = prefix_of(request)

    async def scenario() -> None:
        guard = lockout(new_store(), prefix)
        for _ in range(THRESHOLD - 1):
            attempt = await guard.reserve("ada@example.com")
            assert isinstance(attempt, Attempt)
            await attempt.failed()
        last = await guard.reserve("ada@example.com")
        assert isinstance(last, Attempt)
        busy = await guard.reserve("ada@example.com")
        assert isinstance(busy, Reservation) and busy.verdict == "busy", "the fifth is under way"
        await last.release()  # e.g. the hashing queue was full: nothing was verified
        retried = await guard.reserve("ada@example.com")
        assert isinstance(retried, Attempt)
        await retried.succeeded()
        await retried.release()  # a no-op once settled
        fresh = [await guard.reserve("ada@example.com") for _ in range(THRESHOLD)]
        assert all(isinstance(attempt, Attempt) for attempt in fresh), "the count started again"

    asyncio.run(scenario())


def test_locks_grow_and_unlock_resets(new_store: Callable[[], LockoutStore], request: pytest.FixtureRequest) -> None:
    prefix = prefix_of(request)

    async def fail_until_locked(guard: LoginLockout) -> int | None:
        locked_for = None
        for _ in range(THRESHOLD):
            attempt = await guard.reserve("ada@example.com")
            assert isinstance(attempt, Attempt)
            locked_for = (await attempt.failed()).locked_for
        return locked_for

    async def scenario() -> None:
        guard = lockout(new_store(), prefix)
        assert await fail_until_locked(guard) == 60
        assert 0 < await guard.seconds_locked("ada@example.com") <= 60
        assert await guard.unlock("ada@example.com") is True
        assert await guard.seconds_locked("ada@example.com") == 0
        assert await fail_until_locked(guard) == 60, "unlock reset the step level too"
        assert await guard.unlock("ada@example.com") is True
        assert await guard.unlock("ada@example.com") is False

    asyncio.run(scenario())


def test_a_lost_inflight_slot_expires() -> None:
    """A process that died mid-verification cannot hold a slot for ever."""
    now = [1000.0]
    store = MemoryLockoutStore(clock=lambda: now[0])

    async def scenario() -> None:
        guard = lockout(store, inflight_ttl=30)
        held = [await guard.reserve("ada@example.com") for _ in range(THRESHOLD)]
        assert all(isinstance(attempt, Attempt) for attempt in held)
        blocked = await guard.reserve("ada@example.com")
        assert isinstance(blocked, Reservation) and blocked.verdict == "busy"
        now[0] += 31
        assert isinstance(await guard.reserve("ada@example.com"), Attempt)

    asyncio.run(scenario())


def test_the_memory_store_sweeps_idle_subjects() -> None:
    now = [0.0]
    store = MemoryLockoutStore(clock=lambda: now[0])

    async def scenario() -> None:
        guard = lockout(store, inflight_ttl=30)
        for i in range(3000):
            attempt = await guard.reserve(f"user{i}@example.com")
            assert isinstance(attempt, Attempt)
            await attempt.release()
            now[0] += 0.01
        now[0] += 31  # every record idle (no failures, no lock, no slot)
        attempt = await guard.reserve("last@example.com")
        assert isinstance(attempt, Attempt)
        for i in range(3000):
            await (await guard.reserve(f"next{i}@example.com")).release()  # type: ignore[union-attr]
        assert len(store) < 4500, "idle records were swept as the dict grew"

    asyncio.run(scenario())


def test_unreachable_redis_is_lockout_unavailable() -> None:
    guard = lockout(RedisLockoutStore("redis://127.0.0.1:1/0", timeout=0.5))
    with pytest.raises(LockoutUnavailableError):
        asyncio.run(guard.reserve("ada@example.com"))


def test_keys_carry_the_prefix_and_no_address(redis_target: RedisTarget) -> None:
    guard = lockout(RedisLockoutStore(redis_target.url), redis_target.prefix)
    key = guard.key("ada@example.com")
    assert key.startswith(redis_target.prefix + "/lockout/{") and "ada" not in key


# -- the Argon2 slots ---------------------------------------------------------------------------


def test_hashing_slots_cap_concurrency_and_bound_the_wait() -> None:
    slots = HashingSlots(concurrency=2, max_wait=0.3)
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1
        return "done"

    async def scenario() -> None:
        tasks = [asyncio.create_task(slots.run(work)) for _ in range(5)]
        await asyncio.sleep(0.6)  # the three beyond the cap have waited past max_wait
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results.count("done") == 2
        assert sum(isinstance(r, HashingUnavailableError) for r in results) == 3
        assert peak == 2
        assert slots.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_request_keeps_its_slot_until_the_hash_ends() -> None:
    """The thread cannot be stopped, so its memory is held until it ends: so is the slot."""
    slots = HashingSlots(concurrency=1, max_wait=0.2)
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.4)
        finished.set()

    async def scenario() -> None:
        first = asyncio.create_task(slots.run(slow))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(HashingUnavailableError):  # the slot is still taken by the running hash
            await slots.run(lambda: None)
        await asyncio.sleep(0.5)
        assert finished.is_set()
        assert await slots.run(lambda: "free") == "free"

    asyncio.run(scenario())


def test_hashing_slots_work_from_several_event_loops() -> None:
    """The CLI runs one loop per command, tests several: the semaphore is per loop."""
    slots = HashingSlots(concurrency=1, max_wait=1)
    assert asyncio.run(slots.run(lambda: 1)) == 1
    assert asyncio.run(slots.run(lambda: 2)) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_hashing_threads_yield_the_cpu_to_requests() -> None:
    """A burst of sign-ins must take only the CPU the request loop leaves (API-key p99 under a burst:
    benchmarks/bench_login.py)."""
    slots = HashingSlots(concurrency=1, max_wait=1)
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread_nice = asyncio.run(slots.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    assert thread_nice == min(19, loop_nice + HASHING_NICENESS)


def test_the_service_keys_its_lockout_keys_with_its_secret(redis_target: RedisTarget, tmp_path: Path) -> None:
    """What Redis holds names no address, and no list of addresses reverses it without the secret."""
    from thallus.server.api import login_lockout
    from thallus.server.identity.keys import KeyRing
    from thallus.server.settings import ServiceSettings

    settings = ServiceSettings(
        secret_key="k" * 48, redis_url=redis_target.url, redis_key_prefix=redis_target.prefix, data_dir=tmp_path
    )
    other = ServiceSettings(
        secret_key="o" * 48, redis_url=redis_target.url, redis_key_prefix=redis_target.prefix, data_dir=tmp_path
    )
    key = login_lockout(settings).key("ada@example.com")
    unkeyed = hashlib.sha256(b"ada@example.com").hexdigest()[:32]
    assert (
        key
        == f"{redis_target.prefix}/lockout/{{{KeyRing.from_settings(settings).hash('lockout', 'ada@example.com')[:32]}}}"
    )
    assert unkeyed not in key and "ada" not in key
    assert login_lockout(other).key("ada@example.com") != key, "another secret, another key"
    assert login_lockout(settings).key("ada@example.com") == key, "every instance with the secret agrees"
