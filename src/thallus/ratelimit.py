"""Rate limiting per client network (docs/design.md §10, layer 5 of §2).

``limits``' sliding-window counter (:mod:`thallus.limiter_store`), in process memory by default, in
Redis when ``THALLUS_REDIS_URL`` is set, so limits hold across every instance:

* **Requests.** A general limit (``THALLUS_RATE_LIMIT``, default ``120/minute``) and a stricter one
  on the authentication endpoints (``THALLUS_RATE_LIMIT_AUTH``, ``10/minute``), per client;
  ``/health`` and ``/metrics`` are exempt. Exceeding one answers ``429 RateLimitError`` at once,
  with ``Retry-After`` (the limit's window, 60 s for a per-minute limit) and the IETF draft
  ``RateLimit-Policy`` / ``RateLimit`` headers, which every response of a limited route carries:
  ``r`` the requests still allowed now, ``t`` the seconds until that number grows (on a 429, until
  a request is allowed again), both exact. If the storage is unreachable, limits fail open (one
  error log line a minute). Each request makes one storage call: a few dictionary operations in
  memory, one round trip to Redis.
* **Client address.** The peer address. The forwarding header named by ``THALLUS_PROXY_HEADER``
  (``X-Forwarded-For``, the default, or RFC 7239 ``Forwarded``; never both) counts only when the
  peer is a trusted proxy (``THALLUS_TRUSTED_PROXIES``); then the right-most hop that is not a
  trusted proxy is the client. A malformed forwarding header is ignored, never an error. A
  request carrying ``X-Forwarded-For`` or ``Forwarded`` from a peer that is *not* trusted is
  logged once per process (a warning naming the peer): behind an unlisted proxy every client has
  the proxy's address, so they all share one limit — the usual cause of a 429 storm after deploying
  behind a load balancer. Once that is said, a request pays nothing for it; before, one pass
  over the header names as the server gives them (lower case, as ASGI servers send them; no
  allocation).
* **Client key.** Clients are counted per network: IPv4 per address (``THALLUS_RATE_LIMIT_IPV4_PREFIX``,
  32), IPv6 per /64 (``THALLUS_RATE_LIMIT_IPV6_PREFIX``, 64) — :func:`client_network`. Audit
  records keep the full address.

``Retry-After`` stays the window although the counter knows the real wait (the ``t`` of the same
429): docs/design.md §10 asks for ``Retry-After: 60`` here and for "the real seconds left" only for the
login lockout, and a client that honours it comes back after the policy's window instead of polling
at the refill rate. The login lockout, which counts per account rather than per client, is
:mod:`thallus.server.identity.lockout`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from limits import RateLimitItem, parse

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send, collect_headers, scope_state
from thallus.audit import AuditEvent, AuditSink, request_fields
from thallus.errors import send_error
from thallus.limiter_store import (
    Counter,
    MemoryCounter,
    MemoryStore,
    RateLimitStorage,
    RedisStore,
    WindowHit,
    create_storage,
    window_store,
)

__all__ = [
    "CLIENT_IP_STATE_KEY",
    "MemoryStore",
    "RateLimitMiddleware",
    "RateLimitStorage",
    "RedisStore",
    "WindowHit",
    "client_ip",
    "client_network",
    "create_storage",
    "parse_limit",
    "parse_networks",
]

logger = logging.getLogger("thallus.ratelimit")

CLIENT_IP_STATE_KEY = "client_ip"
FAIL_OPEN_LOG_INTERVAL = 60.0
#: The forwarding headers whose arrival from an untrusted peer is worth one warning.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded"})
#: Whether this process has warned about forwarding headers from an untrusted peer (once at most).
_warned_untrusted_forwarding = False
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
    """The key a client is counted by: its address's network (docs/design.md §10).

    One IPv6 customer holds a whole /64 (RFC 6177) and can pick any of its 2^64 addresses per
    request, so per-address IPv6 limits do not exist; an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``, a dual-stack socket's view of an IPv4 client) is that IPv4 client.
    Text that is not an address (``unknown``, a unix socket path) is its own key.

    Per address (the IPv4 default), text without a colon is its own key as it stands: it is either
    no address or an IPv4 address, whose only accepted spelling is the one ``str()`` gives back
    (``ipaddress`` refuses leading zeros and anything but four decimal octets). Everything else is
    parsed once and remembered (:func:`_network`).
    """
    if ipv4_prefix == 32 and ":" not in address:
        return address
    return _network(address, ipv4_prefix, ipv6_prefix)


#: Addresses whose network :func:`_network` remembers (least recently used forgotten first).
NETWORK_CACHE_SIZE = 65_536


@functools.lru_cache(maxsize=NETWORK_CACHE_SIZE)
def _network(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip) if ipv4_prefix == 32 else str(ipaddress.IPv4Network((ip, ipv4_prefix), strict=False))
    return str(ip) if ipv6_prefix == 128 else str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


# -- the limiter ------------------------------------------------------------------------------


#: ``RateLimit`` values a policy keeps once built (a look-up instead of formatting per request).
#: 120/minute has at most 121 × 61 of them; a larger policy formats those past the first 8,192.
STATE_CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class Policy:
    """One limit: its name, its counts and its header values."""

    name: str
    limit: RateLimitItem
    counter: Counter
    #: the counter's synchronous hit where it has one (memory: no coroutine per request)
    take: Callable[[str], WindowHit] | None
    #: ``RateLimit-Policy: "<name>";q=<limit>;w=<window seconds>``
    policy_header: tuple[bytes, bytes] = field(repr=False)
    #: ``RateLimit`` values built so far, by ``(remaining, reset)``
    states: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, name: str, limit: RateLimitItem, storage: RateLimitStorage, key_prefix: str) -> Policy:
        counter = window_store(storage).counter(f"{key_prefix}/{name}", limit)
        take = counter.take if isinstance(counter, MemoryCounter) else None
        value = f'"{name}";q={limit.amount};w={limit.get_expiry()}'.encode()
        return cls(name, limit, counter, take, (b"ratelimit-policy", value))

    def state(self, remaining: int, reset: int) -> bytes:
        """The ``RateLimit`` value: ``"<name>";r=<remaining>;t=<reset>`` (kept in :attr:`states`)."""
        value = f'"{self.name}";r={remaining};t={reset}'.encode()
        if len(self.states) < STATE_CACHE_SIZE:
            self.states[remaining, reset] = value
        return value


class RateLimitMiddleware:
    """Pure-ASGI per-IP limiter (layer 5 of docs/design.md §2).

    ``storage`` is :func:`create_storage`'s (memory or Redis), or any ``limits`` async storage that
    supports the sliding-window counter (then two storage calls a request, through limits' own
    strategy). Limiters on one storage with the same ``key_prefix`` share their counts.
    """

    def __init__(
        self,
        app: ASGIApp,
        storage: RateLimitStorage,
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
        self.general = Policy.of("general", parse_limit(general), storage, key_prefix)
        self.auth = Policy.of("auth", parse_limit(auth), storage, key_prefix)
        self.auth_paths = tuple(auth_paths)
        self.exempt_paths = frozenset(exempt_paths)
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.proxy_header = proxy_header
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self._per_ipv4_address = ipv4_prefix == 32
        self.key_prefix = key_prefix
        self.audit = audit
        self._last_failure_log = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.trusted_proxies:
            address = client_ip(scope, self.trusted_proxies, self.proxy_header)
        else:  # client_ip's answer when no proxy is trusted: the peer
            client = scope.get("client")
            address = str(client[0]) if client and client[0] else "unknown"
        if not _warned_untrusted_forwarding:
            for name, _ in scope["headers"]:
                if name in FORWARDING_HEADERS:
                    self._check_forwarding(scope, address, name)
                    break
        scope_state(scope)[CLIENT_IP_STATE_KEY] = address  # the full address, for audit records
        path: str = scope.get("path", "")
        if path in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        policy = self.auth if path.startswith(self.auth_paths) else self.general
        # client_network's own shortcut (an IPv4 client counted per address is its own key), inlined
        if self._per_ipv4_address and ":" not in address:
            network = address
        else:
            network = client_network(address, self.ipv4_prefix, self.ipv6_prefix)
        try:
            take = policy.take
            taken, remaining, reset = take(network) if take is not None else await policy.counter.hit(network)
        except Exception as exc:  # storage unreachable: fail open, say so (rarely)
            self._log_failure(exc)
            await self.app(scope, receive, send)
            return
        headers = (
            policy.policy_header,
            (b"ratelimit", policy.states.get((remaining, reset)) or policy.state(remaining, reset)),
        )
        if not taken:
            await self._refuse(scope, send, policy, address, headers)
            return

        def send_with_headers(message: Message) -> Awaitable[None]:  # no coroutine of its own per message
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            return send(message)

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

    def _check_forwarding(self, scope: Scope, address: str, header: bytes) -> None:
        """Warn once per process that ``header`` came from a peer that is not a trusted proxy
        (module doc). ``address`` is the client the limiter counts: when it is not the peer, a
        trusted proxy's header was believed, and there is nothing to say."""
        global _warned_untrusted_forwarding
        client = scope.get("client")
        peer = str(client[0]) if client and client[0] else None
        if peer is None or address != peer:
            return
        found = header.decode("latin-1")
        if self.trusted_proxies:
            try:
                if _is_trusted(peer, self.trusted_proxies):
                    return  # a trusted proxy whose header was malformed or named only trusted hops
            except ValueError:
                pass  # not an IP address: never a trusted proxy
        _warned_untrusted_forwarding = True
        logger.warning(
            "requests from %s carry %s, but %s is not a trusted proxy: the header is ignored and every "
            "client behind it shares one rate limit; set THALLUS_TRUSTED_PROXIES to the proxy's address "
            "(this is logged once)",
            peer,
            found,
            peer,
            extra={"rate_limit": {"peer": peer, "header": found}},
        )

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAIL_OPEN_LOG_INTERVAL:
            self._last_failure_log = now
            logger.error("rate-limit storage unreachable; limits are not enforced: %s", type(exc).__name__)
