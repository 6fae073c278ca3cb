"""Rate limiting per client network (SYSTEM.md §10, layer 5 of §2).

A moving-window limiter from the ``limits`` library, in process memory by default, in Redis when
``THALLUS_REDIS_URL`` is set, so limits hold across every instance:

* **Requests.** A general limit (``THALLUS_RATE_LIMIT``, default ``120/minute``) and a stricter one
  on the authentication endpoints (``THALLUS_RATE_LIMIT_AUTH``, ``10/minute``), per client;
  ``/health`` and ``/metrics`` are exempt. Exceeding one answers ``429 RateLimitError`` at once,
  with ``Retry-After`` (the limit's window, 60 s for a per-minute limit) and the IETF draft
  ``RateLimit-Policy`` / ``RateLimit`` headers, which every response of a limited route carries.
  If the storage is unreachable, limits fail open (one error log line a minute). Each request
  makes one storage call that takes the hit and reads the window (:func:`moving_window`).
* **Client address.** The peer address. The forwarding header named by ``THALLUS_PROXY_HEADER``
  (``X-Forwarded-For``, the default, or RFC 7239 ``Forwarded``; never both) counts only when the
  peer is a trusted proxy (``THALLUS_TRUSTED_PROXIES``); then the right-most hop that is not a
  trusted proxy is the client. A malformed forwarding header is ignored, never an error.
* **Client key.** Clients are counted per network: IPv4 per address (``THALLUS_RATE_LIMIT_IPV4_PREFIX``,
  32), IPv6 per /64 (``THALLUS_RATE_LIMIT_IPV6_PREFIX``, 64) — :func:`client_network`. Audit
  records keep the full address.

The login lockout, which counts per account rather than per client, is
:mod:`thallus.identity.lockout`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from limits import RateLimitItem, parse
from limits.aio.storage import MovingWindowSupport, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import MemoryStorage as SyncMemoryStorage
from limits.storage import storage_from_string

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send, collect_headers, scope_state
from thallus.audit import AuditEvent, AuditSink, request_fields
from thallus.errors import send_error

if TYPE_CHECKING:
    from limits.aio.storage.redis.coredis import CoredisBridge

logger = logging.getLogger("thallus.ratelimit")

CLIENT_IP_STATE_KEY = "client_ip"
FAIL_OPEN_LOG_INTERVAL = 60.0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_limit(value: str) -> RateLimitItem:
    """``"120/minute"`` → a limit, or ``ValueError`` naming the notation."""
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate limit such as 120/minute or 10/second") from None


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IP addresses or CIDR blocks; ``ValueError`` names the bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    return tuple(networks)


# -- client IP ----------------------------------------------------------------------------------


def _parse_hop(text: str) -> str | None:
    """An address from one forwarding hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``)."""
    hop = text.strip().strip('"')
    if hop.startswith("["):
        end = hop.find("]")
        hop = hop[1:end] if end > 0 else ""
    elif hop.count(":") == 1:
        hop = hop.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _forwarded_for(value: str) -> list[str] | None:
    """The ``for=`` hops of an RFC 7239 ``Forwarded`` value, or ``None`` when malformed."""
    hops = []
    for element in value.split(","):
        found = None
        for pair in element.split(";"):
            name, _, hop = pair.strip().partition("=")
            if name.strip().lower() == "for":
                found = hop
        if found is None:
            return None
        hops.append(found)
    return hops


ProxyHeader = Literal["x-forwarded-for", "forwarded"]
PROXY_HEADERS: tuple[ProxyHeader, ...] = ("x-forwarded-for", "forwarded")


def _is_trusted(address: str, proxies: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in proxies)


def client_ip(
    scope: Scope, trusted_proxies: Sequence[IPNetwork] = (), proxy_header: ProxyHeader = "x-forwarded-for"
) -> str:
    """The client's address: the peer, or — behind trusted proxies — the right-most untrusted hop.

    Only ``proxy_header`` is read, and only from a trusted peer: the proxy overwrites or appends to
    the header it is configured to write, but passes any other one through as the client sent it,
    so believing both would let a client choose its own address.
    """
    client = scope.get("client")
    peer: str | None = str(client[0]) if client else None
    if not peer or not trusted_proxies:
        return peer or "unknown"
    try:
        if not _is_trusted(peer, trusted_proxies):
            return peer
    except ValueError:  # a unix socket path or similar: no forwarding to trust
        return peer
    name = proxy_header.encode()
    values = collect_headers(scope, frozenset({name})).get(name)
    if not values:
        return peer
    hops = ", ".join(values).split(",") if proxy_header == "x-forwarded-for" else _forwarded_for(", ".join(values))
    if not hops:
        return peer
    addresses = [_parse_hop(hop) for hop in hops]
    if any(address is None for address in addresses):
        return peer  # malformed: ignore the header rather than guess
    for address in reversed(addresses):
        assert address is not None
        if not _is_trusted(address, trusted_proxies):
            return address
    return addresses[0] or peer


def client_network(address: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The key a client is counted by: its address's network (SYSTEM.md §10).

    One IPv6 customer holds a whole /64 (RFC 6177) and can pick any of its 2^64 addresses per
    request, so per-address IPv6 limits do not exist; an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``, a dual-stack socket's view of an IPv4 client) is that IPv4 client.
    Text that is not an address (``unknown``, a unix socket path) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip) if ipv4_prefix == 32 else str(ipaddress.IPv4Network((ip, ipv4_prefix), strict=False))
    return str(ip) if ipv6_prefix == 128 else str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


# -- the shared backend -----------------------------------------------------------------------


class MemoryBackend(Storage, MovingWindowSupport):
    """``limits``' thread-safe in-process store behind the async storage interface.

    limits 5.8's own async ``MemoryStorage`` sweeps expired keys with one ``asyncio.to_thread`` hop
    per key, restarted by every hit: ~50 µs a request under load, and a whole sweep (tens of ms with a
    thousand client keys) for the first request after a pause (measured: benchmarks/bench_ratelimit.py).
    The synchronous store answers from memory in microseconds, never waits, and sweeps in its own
    timer thread, so calling it from the event loop is safe.
    """

    STORAGE_SCHEME = ["thallus+memory"]  # noqa: RUF012 - the limits base class declares it so

    def __init__(self) -> None:
        super().__init__()
        self._store = SyncMemoryStorage()
        # limits' per-key re-entrant locks (an internal of its store); without them, one lock of our own
        self._locks: Mapping[str, AbstractContextManager[object]] | None = getattr(self._store, "locks", None)
        self._own_lock = threading.RLock()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._store.incr(key, expiry, amount)

    async def get(self, key: str) -> int:
        return self._store.get(key)

    async def get_expiry(self, key: str) -> float:
        return self._store.get_expiry(key)

    async def check(self) -> bool:
        return self._store.check()

    async def reset(self) -> int | None:
        return self._store.reset()

    async def clear(self, key: str) -> None:
        self._store.clear(key)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self._store.acquire_entry(key, limit, expiry, amount)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self._store.get_moving_window(key, limit, expiry)

    def hit_and_window(self, key: str, limit: int, expiry: int) -> tuple[bool, float, int]:
        """Acquire one entry, then read the window (start, entries), both under the key's lock.

        The same two calls limits makes, but in one step, so no other thread's hit or expiry sweep
        falls between them (the lock is re-entrant, so the calls' own locking still works).
        """
        with self._lock(key):
            allowed = self._store.acquire_entry(key, limit, expiry)
            start, entries = self._store.get_moving_window(key, limit, expiry)
        return allowed, start, entries

    def _lock(self, key: str) -> AbstractContextManager[object]:
        return self._locks[key] if self._locks is not None else self._own_lock


def create_storage(redis_url: str | None, key_prefix: str) -> Storage:
    """``limits`` storage: memory, or Redis (``redis://`` / ``rediss://``) with a key prefix."""
    if not redis_url:
        return MemoryBackend()
    scheme, _, rest = redis_url.partition("://")
    uri = f"async+{scheme}://{rest}" if not scheme.startswith("async+") else redis_url
    storage = storage_from_string(uri, key_prefix=key_prefix, connect_timeout=2, stream_timeout=2)
    assert isinstance(storage, Storage)
    return storage


# -- one hit with the window it leaves ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowHit:
    """One hit on a moving window: taken or refused, and the window right after it."""

    allowed: bool
    remaining: int
    reset_time: float  # seconds since the epoch when the window's oldest entry leaves it


class MovingWindow(Protocol):
    """Takes one hit on a moving-window limit and reports the window (``RateLimitMiddleware``'s need)."""

    async def hit(self, item: RateLimitItem, *identifiers: str) -> WindowHit: ...


class TwoCallWindow:
    """Any ``limits`` moving-window storage: ``hit``, then ``get_window_stats`` — two storage calls."""

    def __init__(self, storage: Storage) -> None:
        self.limiter = MovingWindowRateLimiter(storage)

    async def hit(self, item: RateLimitItem, *identifiers: str) -> WindowHit:
        allowed = await self.limiter.hit(item, *identifiers)
        stats = await self.limiter.get_window_stats(item, *identifiers)
        return WindowHit(allowed, stats.remaining, stats.reset_time)


class MemoryWindow:
    """:class:`MemoryBackend`: hit and window read in one call under the key's lock."""

    def __init__(self, storage: MemoryBackend) -> None:
        self.storage = storage

    async def hit(self, item: RateLimitItem, *identifiers: str) -> WindowHit:
        expiry = item.get_expiry()
        allowed, start, entries = self.storage.hit_and_window(item.key_for(*identifiers), item.amount, expiry)
        return WindowHit(allowed, item.amount - entries, start + expiry)


#: limits' ``acquire_moving_window.lua`` followed by its ``moving_window.lua``, run as one script on
#: the same list (newest timestamp first, at most ``limit`` entries, expiring after the window) with
#: the same timestamp. Returns ``{acquired, entries}`` or, with entries, ``{acquired, entries, oldest}``
#: (``oldest`` as a string: Lua numbers reach the client as integers).
HIT_AND_WINDOW_LUA = """
local timestamp = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local target = timestamp - expiry

local acquired = 0
local entry = redis.call('lindex', KEYS[1], limit - 1)
if limit >= 1 and not (entry and tonumber(entry) >= target) then
    redis.call('lpush', KEYS[1], timestamp)
    redis.call('ltrim', KEYS[1], 0, limit - 1)
    redis.call('expire', KEYS[1], expiry)
    acquired = 1
end

local low, high, index = 0, limit - 1, nil
while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', KEYS[1], mid))
    if value and value >= target then
        index = mid
        low = mid + 1
    else
        high = mid - 1
    end
end

if index then
    return {acquired, index + 1, tostring(tonumber(redis.call('lindex', KEYS[1], index)))}
end
return {acquired, 0}
"""


class RedisWindow:
    """limits' coredis Redis storage: hit and window read in one Lua script, one ``EVALSHA``.

    It uses limits' own client, key prefix and key layout (``bridge.get_connection()``,
    ``bridge.prefixed_key``), so instances on this path and on the two-call path count the same
    keys. Those are limits internals (not its documented API): :func:`moving_window` checks for
    them and otherwise falls back to :class:`TwoCallWindow`. The script is registered once with
    coredis, which loads it again on ``NOSCRIPT`` (a restarted or flushed server).
    """

    def __init__(self, bridge: CoredisBridge) -> None:
        self.bridge = bridge
        self.script = bridge.get_connection().register_script(HIT_AND_WINDOW_LUA)

    async def hit(self, item: RateLimitItem, *identifiers: str) -> WindowHit:
        expiry = item.get_expiry()
        timestamp = time.time()
        key = self.bridge.prefixed_key(item.key_for(*identifiers))
        reply = await self.script.execute([key], [timestamp, item.amount, expiry])
        assert isinstance(reply, list)
        entries = int(reply[1])
        start = float(reply[2]) if entries else timestamp
        return WindowHit(bool(reply[0]), item.amount - entries, start + expiry)


def moving_window(storage: Storage) -> MovingWindow:
    """The one-call hit-and-window for ``storage`` when it has one, else limits' two calls."""
    if isinstance(storage, MemoryBackend):
        return MemoryWindow(storage)
    bridge = _coredis_bridge(storage)
    return RedisWindow(bridge) if bridge is not None else TwoCallWindow(storage)


def _coredis_bridge(storage: Storage) -> CoredisBridge | None:
    """limits' coredis bridge of a Redis storage, if it still looks as :class:`RedisWindow` needs."""
    try:
        from limits.aio.storage.redis.coredis import CoredisBridge
    except ImportError:  # a limits that moved it: the two calls
        return None
    bridge = getattr(storage, "bridge", None)
    if (
        isinstance(storage, RedisStorage)
        and isinstance(bridge, CoredisBridge)
        and callable(getattr(bridge, "get_connection", None))
        and callable(getattr(bridge, "prefixed_key", None))
    ):
        return bridge
    return None


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    limit: RateLimitItem
    policy_header: bytes

    @classmethod
    def of(cls, name: str, limit: RateLimitItem) -> Policy:
        window = limit.get_expiry()
        return cls(name, limit, f'"{name}";q={limit.amount};w={window}'.encode())


class RateLimitMiddleware:
    """Pure-ASGI per-IP limiter (layer 5 of SYSTEM.md §2)."""

    def __init__(
        self,
        app: ASGIApp,
        storage: Storage,
        *,
        general: str = "120/minute",
        auth: str = "10/minute",
        auth_paths: Sequence[str] = ("/api/v1/auth",),
        exempt_paths: Sequence[str] = ("/health", "/metrics"),
        trusted_proxies: Sequence[str] = (),
        proxy_header: ProxyHeader = "x-forwarded-for",
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        key_prefix: str = "thallus",
        audit: AuditSink | None = None,
    ) -> None:
        if proxy_header not in PROXY_HEADERS:
            raise ValueError(f"proxy_header must be one of {', '.join(PROXY_HEADERS)}")
        if not (1 <= ipv4_prefix <= 32 and 1 <= ipv6_prefix <= 128):
            raise ValueError("ipv4_prefix must be 1–32 and ipv6_prefix 1–128")
        self.app = app
        self.window = moving_window(storage)
        self.general = Policy.of("general", parse_limit(general))
        self.auth = Policy.of("auth", parse_limit(auth))
        self.auth_paths = tuple(auth_paths)
        self.exempt_paths = frozenset(exempt_paths)
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.proxy_header = proxy_header
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.key_prefix = key_prefix
        self.audit = audit
        self._last_failure_log = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = client_ip(scope, self.trusted_proxies, self.proxy_header)
        scope_state(scope)[CLIENT_IP_STATE_KEY] = address  # the full address, for audit records
        path: str = scope.get("path", "")
        if path in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        policy = self.auth if path.startswith(self.auth_paths) else self.general
        try:
            network = client_network(address, self.ipv4_prefix, self.ipv6_prefix)
            hit = await self.window.hit(policy.limit, self.key_prefix, policy.name, network)
        except Exception as exc:  # storage unreachable: fail open, say so (rarely)
            self._log_failure(exc)
            await self.app(scope, receive, send)
            return
        reset = max(0, math.ceil(hit.reset_time - time.time()))
        headers = (
            (b"ratelimit-policy", policy.policy_header),
            (b"ratelimit", f'"{policy.name}";r={hit.remaining};t={reset}'.encode()),
        )
        if not hit.allowed:
            await self._refuse(scope, send, policy, address, headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(
        self, scope: Scope, send: Send, policy: Policy, address: str, headers: tuple[tuple[bytes, bytes], ...]
    ) -> None:
        window = policy.limit.get_expiry()
        described = f"{policy.limit.amount} per {policy.limit.multiples} {policy.limit.GRANULARITY.name}"
        details = {"policy": policy.name, "limit": described, "retry_after": window}
        logger.warning("rate limit exceeded", extra={"rate_limit": {**details, "client_ip": address}})
        if self.audit is not None:
            self.audit.record(
                AuditEvent(
                    action="rate_limited", outcome="denied", status_code=429, details=details, **request_fields(scope)
                )
            )
        await send_error(
            send,
            429,
            error="RateLimitError",
            message=f"Too many requests; retry in {window} seconds.",
            details=details,
            headers=((b"retry-after", str(window).encode()), *headers),
        )

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAIL_OPEN_LOG_INTERVAL:
            self._last_failure_log = now
            logger.error("rate-limit storage unreachable; limits are not enforced: %s", type(exc).__name__)
