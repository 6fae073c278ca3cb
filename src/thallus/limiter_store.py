"""The counts behind the rate limiter: ``limits``' sliding-window counter, in memory or in Redis.

**The algorithm** is ``limits``' sliding-window counter (its ``SlidingWindowCounterRateLimiter``,
https://limits.readthedocs.io/en/stable/strategies.html), with windows as its Redis storage keeps
them: a client's first hit starts a window of ``W`` seconds, the next starts when it ends, and one
with no hit for two windows is forgotten (its next hit starts afresh). A client has a count for its
current window and the one before; a hit is taken while

    floor(previous × left / W) + current < limit        (left: seconds until the current window ends)

that is, the previous window's count weighs as much of it as still overlaps the last ``W``
seconds. Refused hits count nothing. Each client key holds one record (when its window started, two
counts), whatever the limit, and a hit is a handful of arithmetic: no list of timestamps (the moving
window's, one per hit up to the limit), nothing proportional to the limit or to the number of clients.

**What a hit answers** (:data:`WindowHit`, exact for this algorithm, the numbers limits'
``get_window_stats`` gives for the same counts): whether it was taken, how many more hits would be
taken right now, and the whole seconds until that number next grows — on a refused hit, until a hit
would be taken again; a client's first hit says ``W``. All three come from the step that takes the
hit, so each request makes one call: in memory a few dictionary operations, in Redis one ``EVALSHA``.

**Worst case.** At most ``limit`` hits in one of a client's windows; across a window boundary
``limit + 1`` within an instant (the fixed window's ``2 × limit``), and in any ``d ≤ W`` seconds at
most ``limit + ceil(limit × d / W)``, so ``2 × limit`` within one window's length (a full count at
the end of one window, then one more each time its weight falls through the next); over time at
most ``limit`` per ``W``. ``tests/test_ratelimit_window.py`` checks the bound and builds the case.

* :class:`MemoryStore` — this process. Per limit, client records in three dicts by when they were
  last hit (this ``W``-long period of the clock, the one before, the one before that); a record moves
  to the newest dict at its first hit in a period. When a period ends, the dict three periods old
  can only hold forgotten clients: it is retired, and every later hit deletes two of its entries
  (``dict.popitem``) — swept without a thread or a timer, amortised O(1) per hit.
* :class:`RedisStore` — every instance sharing one Redis: one hash per client (``s``, ``p``, ``c``:
  window start, previous and current count) expiring when the client is forgotten, one Lua script
  per hit through Thallus's own ``coredis`` client, the hits of one event-loop turn sent as one
  pipeline (:class:`RedisBatch`). The clock is the calling instance's (as limits'
  own scripts take it); an instance whose clock lags the one that started a window counts from its start.
* :class:`LimitsStore` — any other ``limits`` async storage with sliding-window-counter support,
  through limits' own strategy: a hit and a window read, two storage calls.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from math import ceil, floor
from typing import TYPE_CHECKING, Protocol

from limits import RateLimitItem
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

if TYPE_CHECKING:
    import coredis
    from coredis.commands import Script

#: ``(taken, remaining, reset)``: whether the hit was taken, how many more would be taken now, and
#: whole seconds until ``remaining`` next grows (on a refused hit: until a hit is taken again).
#: A plain tuple: the limiter builds one per request.
WindowHit = tuple[bool, int, int]


class Record:
    """A client's counts in memory: one object (slots inline), so a hit touches little memory."""

    __slots__ = ("current", "previous", "start")

    def __init__(self, start: float) -> None:
        self.start = start  # when the client's current window started (epoch seconds)
        self.previous = 0  # hits taken in the window before
        self.current = 0  # hits taken in this one


#: Entries of retired periods each memory hit deletes: more than the one a hit can add, so the
#: retired periods empty while traffic lasts.
SWEEP_PER_HIT = 2


class Counter(Protocol):
    """One limit's counts: a hit by a client key, answered as :data:`WindowHit`."""

    async def hit(self, key: str) -> WindowHit: ...


class WindowStore(Protocol):
    """Where the counts live: one :class:`Counter` per named limit."""

    def counter(self, name: str, limit: RateLimitItem) -> Counter: ...


def window_hit(
    taken: bool, previous: int, current: int, decayed: int, left: float, *, window: int, limit: int
) -> WindowHit:
    """The answer for a hit, from the counts right after it.

    ``decayed`` is ``floor(previous × left / window)``. The hits in use are ``decayed + current``;
    that number next falls just after the previous count's weight drops below ``decayed`` (in
    ``left − decayed × window / previous`` seconds) or, with nothing left of it, when the current
    window ends and its own count starts to lose weight (``left``). limits' ``get_window_stats``
    takes the minimum of the same two moments.
    """
    used = decayed + current
    until = left - decayed * window / previous if decayed else left
    return taken, limit - used if used < limit else 0, math.ceil(until)


class MemoryCounter:
    """One limit's counts in this process; thread-safe (one lock, held for a few operations)."""

    def __init__(self, limit: int, window: int) -> None:
        if limit < 1 or window < 1:
            raise ValueError("a limit needs at least one hit per window of at least one second")
        self.limit = limit
        self.window = window
        self._period = -1  # floor(epoch seconds / window) of the clock, the newest seen …
        self._period_end = -1.0  # … and when it ends (epoch seconds)
        # client key -> its record, by the period of its last hit:
        self._recent: dict[str, Record] = {}  # this period
        self._older: tuple[dict[str, Record], dict[str, Record]] = ({}, {})  # the two before
        self._retired: list[dict[str, Record]] = []  # forgotten clients, deleted a few a hit
        self._lock = threading.Lock()

    async def hit(self, key: str) -> WindowHit:
        return self.take(key)

    def take(self, key: str, now: float | None = None) -> WindowHit:
        """A hit by ``key`` now (or at ``now``, seconds since the epoch): :meth:`hit` without the
        coroutine, which the limiter calls for memory; :func:`window_hit`'s answer, inlined."""
        if now is None:
            now = time.time()
        window = self.window
        lock = self._lock
        lock.acquire()
        try:
            if now >= self._period_end:
                self._next_period(now)
            record = self._recent.get(key) or self._record(key, now)
            if self._retired:
                self._sweep()
            elapsed = now - record.start
            if elapsed >= window:  # the client's window has ended: the next one, or afresh after two
                if elapsed < 2 * window:
                    record.start += window
                    record.previous, record.current = record.current, 0
                else:
                    record.start, record.previous, record.current = now, 0, 0
                elapsed = now - record.start
            previous, current = record.previous, record.current
            left = window - elapsed if elapsed > 0 else window  # a clock behind the window's start: at it
            decayed = floor(previous * left / window)
            used = decayed + current
            limit = self.limit
            taken = used < limit
            if taken:
                record.current = current + 1
                used += 1
        finally:
            lock.release()
        until = left - decayed * window / previous if decayed else left
        return taken, limit - used if used < limit else 0, ceil(until)

    def _record(self, key: str, now: float) -> Record:
        """``key``'s record, moved to this period's dict (a new one for a client not seen lately)."""
        for older in self._older:
            record = older.pop(key, None)
            if record is not None:
                break
        else:
            record = Record(now)
        self._recent[key] = record
        return record

    def _next_period(self, now: float) -> None:
        """The clock entered a later period: shift the dicts; the one three periods old retires.

        A record last hit three periods ago belongs to a window that started before then, which
        ended, with the one after it, before this period began: that client is forgotten.
        """
        period = floor(now / self.window)
        newer, older = self._older
        if period == self._period + 1:
            retiring, self._older = [older], (self._recent, newer)
        elif period == self._period + 2:
            retiring, self._older = [older, newer], ({}, self._recent)
        else:
            retiring, self._older = [older, newer, self._recent], ({}, {})
        self._retired += [records for records in retiring if records]
        self._recent = {}
        self._period = period
        self._period_end = float((period + 1) * self.window)

    def _sweep(self) -> None:
        """Delete a few forgotten clients: O(1) per hit, no thread, no timer."""
        retired = self._retired[-1]
        for _ in range(SWEEP_PER_HIT):
            retired.popitem()
            if not retired:
                self._retired.pop()
                return

    def __len__(self) -> int:
        """Records held: clients hit in the last three periods, and forgotten ones not yet deleted."""
        with self._lock:
            held = [self._recent, *self._older, *self._retired]
            return sum(map(len, held))


class MemoryStore:
    """Counts in this process (the default): one :class:`MemoryCounter` per named limit."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int, int], MemoryCounter] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, limit: RateLimitItem) -> MemoryCounter:
        """The counts of ``name`` at ``limit``: the same object for every limiter that asks."""
        key = (name, limit.amount, limit.get_expiry())
        with self._lock:
            found = self._counters.get(key)
            if found is None:
                found = self._counters[key] = MemoryCounter(limit.amount, limit.get_expiry())
        return found

    def __len__(self) -> int:
        """Entries held by every counter (the memory's measure: it grows with clients, never with hits)."""
        with self._lock:
            counters = list(self._counters.values())
        return sum(map(len, counters))


#: One hit on KEYS[1] (a hash: ``s`` window start, ``p`` previous count, ``c`` current count) at
#: ARGV[1] seconds since the epoch, limit ARGV[2], window ARGV[3] seconds: the same steps and
#: arithmetic as :meth:`MemoryCounter.take`. Returns ``{taken, previous, current, decayed, left}``
#: (``left`` as a string: Lua numbers reach the client as integers). A refused hit writes only a
#: window that moved on; the hash expires when its client is forgotten (two windows after its start).
SLIDING_WINDOW_LUA = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 's', 'p', 'c')
local start, previous, current = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
local moved = false
if not start or now - start >= 2 * window then
    start, previous, current, moved = now, 0, 0, true
elseif now - start >= window then
    start, previous, current, moved = start + window, current, 0, true
end
local elapsed = now - start
local left = window
if elapsed > 0 then
    left = window - elapsed
end
local decayed = math.floor(previous * left / window)
local taken = 0
if decayed + current < limit then
    taken = 1
    current = current + 1
end
if taken == 1 or moved then
    redis.call('HSET', KEYS[1], 's', string.format('%.17g', start), 'p', previous, 'c', current)
    redis.call('PEXPIRE', KEYS[1], math.ceil((start + 2 * window - now) * 1000))
end
return {taken, previous, current, decayed, string.format('%.17g', left)}
"""


class RedisBatch:
    """The hits that arrive in one turn of the event loop, sent to Redis as one pipeline.

    Each hit is still one ``EVALSHA`` and waits for exactly one round trip; but under load the
    requests in flight share it — one write, one read, one wake-up of the loop for all of them
    instead of one each. With 16 concurrent clients that cuts the client-side CPU of a hit from
    ~80 to ~33 µs (coredis on loopback). A hit arriving while a pipeline is out goes in the next.
    """

    def __init__(self, client: coredis.Redis[bytes], script: Script[bytes]) -> None:
        self.client = client
        self.script = script
        self.pending: list[tuple[list[str | bytes], list[str | bytes | int | float], asyncio.Future[object]]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def execute(self, keys: list[str | bytes], arguments: list[str | bytes | int | float]) -> object:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first use, or a new loop (tests): nothing pending belongs to it
            self.loop, self.pending = loop, []
        future: asyncio.Future[object] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._start_flush)
        self.pending.append((keys, arguments, future))
        return await future

    def _start_flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._flush(batch))
        _FLUSHES.add(task)
        task.add_done_callback(_FLUSHES.discard)

    async def _flush(
        self, batch: list[tuple[list[str | bytes], list[str | bytes | int | float], asyncio.Future[object]]]
    ) -> None:
        try:
            pipeline = await self.client.pipeline(transaction=False)
            for keys, arguments, _ in batch:
                self.script(keys, list(arguments), client=pipeline)
            replies = await pipeline.execute()
        except Exception as exc:  # every hit of the batch fails as its own call would have
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if not future.done():  # a request cancelled meanwhile no longer waits
                future.set_result(reply)


#: Flushes in flight (the event loop keeps only weak references to tasks).
_FLUSHES: set[asyncio.Future[None]] = set()


class RedisCounter:
    """One limit's counts in Redis: each hit one ``EVALSHA`` of :data:`SLIDING_WINDOW_LUA`, in the
    store's :class:`RedisBatch`."""

    def __init__(self, batch: RedisBatch, key_prefix: str, limit: int, window: int) -> None:
        self.batch = batch
        self.key_prefix = key_prefix
        self.limit = limit
        self.window = window

    async def hit(self, key: str) -> WindowHit:
        reply = await self.batch.execute([self.key_prefix + key], [repr(time.time()), self.limit, self.window])
        if not isinstance(reply, list) or len(reply) != 5:
            raise ValueError(f"unexpected reply from Redis: {reply!r}")
        taken, previous, current, decayed, left = reply
        return window_hit(
            bool(taken), int(previous), int(current), int(decayed), float(left), window=self.window, limit=self.limit
        )


class RedisStore:
    """Counts in Redis, shared by every instance; keys ``<key_prefix>:swc/<name>/<limit>/<window>/<client>``
    (``swc`` keeps them apart from the moving window's lists of earlier versions).

    Thallus's own ``coredis`` client (the public API: ``Redis.from_url``, ``register_script``),
    created lazily by coredis on the event loop of the first hit. The script is registered once;
    coredis loads it again on ``NOSCRIPT`` (a restarted or flushed server).
    """

    def __init__(self, url: str, key_prefix: str, *, timeout: float = 2.0) -> None:
        import coredis

        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=timeout, stream_timeout=timeout)
        self.key_prefix = key_prefix
        self.script: Script[bytes] = self.client.register_script(SLIDING_WINDOW_LUA)
        self.batch = RedisBatch(self.client, self.script)

    def counter(self, name: str, limit: RateLimitItem) -> RedisCounter:
        prefix = f"{self.key_prefix}:swc/{name}/{limit.amount}/{limit.get_expiry()}/"
        return RedisCounter(self.batch, prefix, limit.amount, limit.get_expiry())


class LimitsCounter:
    """A limit on a ``limits`` storage: limits' ``hit``, then its ``get_window_stats`` (two calls)."""

    def __init__(self, limiter: SlidingWindowCounterRateLimiter, name: str, limit: RateLimitItem) -> None:
        self.limiter = limiter
        self.name = name
        self.limit = limit

    async def hit(self, key: str) -> WindowHit:
        taken = await self.limiter.hit(self.limit, self.name, key)
        stats = await self.limiter.get_window_stats(self.limit, self.name, key)
        return taken, stats.remaining, max(0, math.ceil(stats.reset_time - time.time()))


class LimitsStore:
    """Any ``limits`` async storage that supports the sliding-window counter, through limits' strategy."""

    def __init__(self, storage: Storage) -> None:
        self.limiter = SlidingWindowCounterRateLimiter(storage)

    def counter(self, name: str, limit: RateLimitItem) -> LimitsCounter:
        return LimitsCounter(self.limiter, name, limit)


#: What the limiter accepts: a store of this module, or any ``limits`` async storage.
RateLimitStorage = WindowStore | Storage


def window_store(storage: RateLimitStorage) -> WindowStore:
    """``storage`` as a :class:`WindowStore` (a ``limits`` storage goes through :class:`LimitsStore`)."""
    return LimitsStore(storage) if isinstance(storage, Storage) else storage


def create_storage(redis_url: str | None, key_prefix: str) -> MemoryStore | RedisStore:
    """Memory, or Redis (``redis://``, ``rediss://``, ``unix://``) with ``key_prefix`` on every key."""
    return RedisStore(redis_url, key_prefix) if redis_url else MemoryStore()
