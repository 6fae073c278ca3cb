"""Progressive login lockout that counts an attempt *before* its password is verified (docs/design.md §10).

Per sign-in subject (the canonical address, :mod:`thallus.server.identity.emails`) the store keeps:

* ``failures`` — confirmed failed attempts since the last success, lock or decay;
* ``inflight`` — attempts whose password is being verified right now;
* ``lock`` — present while the subject is locked, expiring with the lock;
* ``level`` — how many locks this series has had (the next step of ``THALLUS_LOCKOUT_STEPS``).

:meth:`LoginLockout.reserve` is one atomic step: refused when locked; refused when ``failures +
inflight`` already reaches the threshold (the attempts that could lock the subject are under way);
otherwise one ``inflight`` slot is taken. Only then is a password verified, and the attempt ends
as exactly one of :meth:`Attempt.failed` (the threshold-th confirmed failure sets the lock),
:meth:`Attempt.succeeded` (the failure count resets) or :meth:`Attempt.release` (nothing was
decided — an error, a full hashing queue). So however concurrent the attempts, and across every
instance sharing one Redis, at most ``threshold`` passwords are verified between two locks.

An ``inflight`` slot of a process that died mid-verification expires after ``inflight_ttl``
seconds. Attempts during a lock do not extend it; the step level starts again a day after the
first lock of a series; an admin unlock resets lock, count and level. The memory store holds for
one process (``thallus serve --workers 1``); Redis holds for all. Storage errors raise
:class:`LockoutUnavailableError`: sign-in fails closed.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

LEVEL_DECAY_SECONDS = 86400
#: Longer than the longest a verification can take: the hashing queue's wait plus the hash itself.
DEFAULT_INFLIGHT_TTL = 120
Verdict = Literal["reserved", "locked", "busy"]
_VERDICTS: tuple[Verdict, ...] = ("reserved", "locked", "busy")
T = TypeVar("T")


class LockoutUnavailableError(Exception):
    """The lockout state cannot be read or written; logins must be refused (fail closed)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of :meth:`LockoutStore.reserve`: ``seconds`` left when locked."""

    verdict: Verdict
    seconds: int = 0


@dataclass(frozen=True, slots=True)
class FailedLogin:
    failed_attempts: int
    locked_for: int | None  # seconds, when this failure locked the subject


class LockoutStore(Protocol):
    """The atomic operations the lockout needs, keyed by an opaque subject key."""

    async def reserve(self, key: str, threshold: int, inflight_ttl: int) -> Reservation: ...

    async def fail(self, key: str, threshold: int, steps: Sequence[int]) -> FailedLogin: ...

    async def succeed(self, key: str) -> None: ...

    async def release(self, key: str) -> None: ...

    async def seconds_locked(self, key: str) -> int: ...

    async def unlock(self, key: str) -> bool: ...


def _unkeyed_hash(subject: str) -> str:
    """SHA-256 of the subject: for a lockout built without the service's keyed hash (tests, tools)."""
    return hashlib.sha256(subject.encode()).hexdigest()


class LoginLockout:
    """The lockout policy over a store; subjects are hashed into keys (no address in Redis)."""

    def __init__(
        self,
        store: LockoutStore,
        *,
        threshold: int,
        steps: Sequence[int],
        key_prefix: str = "thallus",
        inflight_ttl: int = DEFAULT_INFLIGHT_TTL,
        subject_hash: Callable[[str], str] | None = None,
    ) -> None:
        if threshold < 1 or not steps or any(step <= 0 for step in steps):
            raise ValueError("the threshold and every step must be positive")
        self.store = store
        self.threshold = threshold
        self.steps = tuple(steps)
        self.key_prefix = key_prefix
        self.inflight_ttl = inflight_ttl
        self.subject_hash = subject_hash or _unkeyed_hash

    def key(self, subject: str) -> str:
        """``prefix/lockout/{digest}``: the braces are a Redis Cluster hash tag, which keeps one
        subject's keys on one slot (a script may only touch keys of one slot). The service passes
        a hash keyed by its secret (``subject_hash``): an unkeyed digest of an address is reversed
        by hashing a list of addresses, so whoever reads Redis would learn who is being attacked."""
        return f"{self.key_prefix}/lockout/{{{self.subject_hash(subject)[:32]}}}"

    async def reserve(self, subject: str) -> Attempt | Reservation:
        """An :class:`Attempt` that may verify one password, or the refusal (locked or busy)."""
        key = self.key(subject)
        reservation = await _guarded(self.store.reserve(key, self.threshold, self.inflight_ttl))
        if reservation.verdict != "reserved":
            return reservation
        return Attempt(self, key)

    async def seconds_locked(self, subject: str) -> int:
        """Seconds until the subject unlocks; 0 when it is not locked."""
        return await _guarded(self.store.seconds_locked(self.key(subject)))

    async def unlock(self, subject: str) -> bool:
        """Clear the lock, the failure count and the step level; whether a lock was in place."""
        return await _guarded(self.store.unlock(self.key(subject)))


class Attempt:
    """One reserved attempt; end it with exactly one of :meth:`failed`, :meth:`succeeded`, :meth:`release`."""

    def __init__(self, lockout: LoginLockout, key: str) -> None:
        self._lockout = lockout
        self._key = key
        self.settled = False

    async def failed(self) -> FailedLogin:
        self.settled = True
        lockout = self._lockout
        return await _guarded(lockout.store.fail(self._key, lockout.threshold, lockout.steps))

    async def succeeded(self) -> None:
        self.settled = True
        await _guarded(self._lockout.store.succeed(self._key))

    async def release(self) -> None:
        """Give the slot back without counting the attempt (nothing was verified or decided)."""
        if not self.settled:
            self.settled = True
            await _guarded(self._lockout.store.release(self._key))


async def _guarded(operation: Awaitable[T]) -> T:
    try:
        return await operation
    except LockoutUnavailableError:
        raise
    except Exception as exc:
        raise LockoutUnavailableError(f"{type(exc).__name__}: {exc}") from exc


# -- in process memory ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Subject:
    failures: int = 0
    failures_until: float = 0.0
    inflight: int = 0
    inflight_until: float = 0.0
    locked_until: float = 0.0
    level: int = 0
    level_until: float = 0.0

    def expire(self, now: float) -> None:
        if self.failures_until <= now:
            self.failures = 0
        if self.inflight_until <= now:
            self.inflight = 0
        if self.level_until <= now:
            self.level = 0

    def is_idle(self, now: float) -> bool:
        return max(self.failures_until, self.inflight_until, self.locked_until, self.level_until) <= now


class MemoryLockoutStore:
    """One process's lockout state: a dict of small records, swept of idle ones as it grows.

    Each operation runs under one lock without awaiting, so it is atomic for every task and thread
    of the process. Memory is bounded by the subjects seen within a day (the longest any part of a
    record lives); a sweep runs whenever the dict has doubled since the last one, so its cost is
    amortised O(1) per operation.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._subjects: dict[str, _Subject] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._sweep_at = 1024

    def _subject(self, key: str, now: float) -> _Subject:
        subject = self._subjects.get(key)
        if subject is None:
            if len(self._subjects) >= self._sweep_at:
                self._sweep(now)
            subject = self._subjects[key] = _Subject()
        subject.expire(now)
        return subject

    def _sweep(self, now: float) -> None:
        for key in [key for key, subject in self._subjects.items() if subject.is_idle(now)]:
            del self._subjects[key]
        self._sweep_at = max(1024, 2 * len(self._subjects))

    async def reserve(self, key: str, threshold: int, inflight_ttl: int) -> Reservation:
        with self._lock:
            now = self._clock()
            subject = self._subject(key, now)
            if subject.locked_until > now:
                return Reservation("locked", max(1, math.ceil(subject.locked_until - now)))
            if subject.failures + subject.inflight >= threshold:
                return Reservation("busy")
            subject.inflight += 1
            subject.inflight_until = now + inflight_ttl
            return Reservation("reserved")

    async def fail(self, key: str, threshold: int, steps: Sequence[int]) -> FailedLogin:
        with self._lock:
            now = self._clock()
            subject = self._subject(key, now)
            subject.inflight = max(0, subject.inflight - 1)
            if subject.failures == 0:
                subject.failures_until = now + LEVEL_DECAY_SECONDS
            subject.failures += 1
            failures = subject.failures
            if failures < threshold:
                return FailedLogin(failures, None)
            subject.failures = 0
            if subject.locked_until > now:  # already locked: never extend a lock
                return FailedLogin(failures, None)
            if subject.level == 0:
                subject.level_until = now + LEVEL_DECAY_SECONDS
            subject.level += 1
            duration = steps[min(subject.level, len(steps)) - 1]
            subject.locked_until = now + duration
            return FailedLogin(failures, duration)

    async def succeed(self, key: str) -> None:
        with self._lock:
            subject = self._subject(key, self._clock())
            subject.inflight = max(0, subject.inflight - 1)
            subject.failures = 0

    async def release(self, key: str) -> None:
        with self._lock:
            subject = self._subject(key, self._clock())
            subject.inflight = max(0, subject.inflight - 1)

    async def seconds_locked(self, key: str) -> int:
        with self._lock:
            now = self._clock()
            subject = self._subjects.get(key)
            if subject is None or subject.locked_until <= now:
                return 0
            return max(1, math.ceil(subject.locked_until - now))

    async def unlock(self, key: str) -> bool:
        with self._lock:
            subject = self._subjects.pop(key, None)
            return subject is not None and subject.locked_until > self._clock()

    def __len__(self) -> int:
        return len(self._subjects)


# -- Redis ----------------------------------------------------------------------------------------

#: KEYS: lock, failures, inflight. ARGV: threshold, inflight TTL (s). → {verdict, seconds}:
#: 0 reserved, 1 locked (seconds left, rounded up), 2 busy.
RESERVE_LUA = """
local ttl = redis.call('pttl', KEYS[1])
if ttl > 0 or ttl == -1 then
    return {1, ttl > 0 and math.ceil(ttl / 1000) or 1}
end
local failures = tonumber(redis.call('get', KEYS[2]) or '0')
local inflight = tonumber(redis.call('get', KEYS[3]) or '0')
if failures + inflight >= tonumber(ARGV[1]) then
    return {2, 0}
end
redis.call('incr', KEYS[3])
redis.call('expire', KEYS[3], tonumber(ARGV[2]))
return {0, 0}
"""

#: KEYS: lock, failures, inflight, level. ARGV: threshold, decay (s), steps… → {failures, locked_for}.
FAIL_LUA = """
if tonumber(redis.call('get', KEYS[3]) or '0') > 0 then
    redis.call('decr', KEYS[3])
end
local failures = redis.call('incr', KEYS[2])
if failures == 1 then
    redis.call('expire', KEYS[2], tonumber(ARGV[2]))
end
if failures < tonumber(ARGV[1]) then
    return {failures, 0}
end
redis.call('del', KEYS[2])
if redis.call('exists', KEYS[1]) == 1 then
    return {failures, 0}
end
local level = redis.call('incr', KEYS[4])
if level == 1 then
    redis.call('expire', KEYS[4], tonumber(ARGV[2]))
end
local steps = #ARGV - 2
local duration = tonumber(ARGV[2 + math.min(level, steps)])
redis.call('set', KEYS[1], '1', 'EX', duration)
return {failures, duration}
"""

#: KEYS: failures, inflight. ARGV: 1 to reset the failure count (success), 0 to only release.
SETTLE_LUA = """
if tonumber(redis.call('get', KEYS[2]) or '0') > 0 then
    redis.call('decr', KEYS[2])
end
if ARGV[1] == '1' then
    redis.call('del', KEYS[1])
end
return 0
"""


class RedisLockoutStore:
    """The lockout state in Redis: each operation one Lua script, atomic across every instance."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        import coredis

        self.client: coredis.Redis[str] = coredis.Redis.from_url(
            url, decode_responses=True, connect_timeout=timeout, stream_timeout=timeout
        )
        self._reserve = self.client.register_script(RESERVE_LUA)
        self._fail = self.client.register_script(FAIL_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)

    @staticmethod
    def _keys(key: str) -> tuple[str, str, str, str]:
        return f"{key}/lock", f"{key}/failures", f"{key}/inflight", f"{key}/level"

    async def reserve(self, key: str, threshold: int, inflight_ttl: int) -> Reservation:
        lock, failures, inflight, _ = self._keys(key)
        reply = await self._reserve.execute([lock, failures, inflight], [threshold, inflight_ttl])
        verdict, seconds = _pair(reply)
        return Reservation(_VERDICTS[verdict], seconds)

    async def fail(self, key: str, threshold: int, steps: Sequence[int]) -> FailedLogin:
        reply = await self._fail.execute(list(self._keys(key)), [threshold, LEVEL_DECAY_SECONDS, *steps])
        failures, locked_for = _pair(reply)
        return FailedLogin(failures, locked_for or None)

    async def succeed(self, key: str) -> None:
        _, failures, inflight, _ = self._keys(key)
        await self._settle.execute([failures, inflight], [1])

    async def release(self, key: str) -> None:
        _, failures, inflight, _ = self._keys(key)
        await self._settle.execute([failures, inflight], [0])

    async def seconds_locked(self, key: str) -> int:
        milliseconds = await self.client.pttl(self._keys(key)[0])
        return max(1, math.ceil(milliseconds / 1000)) if milliseconds > 0 else 0

    async def unlock(self, key: str) -> bool:
        lock, failures, _, level = self._keys(key)
        was_locked = await self.client.exists([lock]) > 0
        await self.client.delete([lock, failures, level])
        return was_locked


def _pair(reply: object) -> tuple[int, int]:
    """A script's ``{a, b}`` reply as two integers."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise LockoutUnavailableError(f"unexpected reply from Redis: {reply!r}")
    return int(reply[0]), int(reply[1])


def lockout_store(redis_url: str | None) -> LockoutStore:
    """Memory, or Redis when ``THALLUS_REDIS_URL`` is set."""
    return RedisLockoutStore(redis_url) if redis_url else MemoryLockoutStore()
