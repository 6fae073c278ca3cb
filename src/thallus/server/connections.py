"""The connection bounds ``thallus serve`` adds to uvicorn's HTTP/1.1 protocol (slow clients).

uvicorn bounds a keep-alive connection's idle time (``timeout_keep_alive``, from
``THALLUS_KEEP_ALIVE_TIMEOUT``) but nothing before a request's headers are complete: a client that
connects and sends nothing, or trickles a header a byte at a time (slowloris), holds its socket
for ever. And its own over-capacity answer (``limit_concurrency``) is a plain-text 503 without the
security headers. :class:`GuardedH11Protocol` is uvicorn's h11 protocol with two additions:

* **a header deadline** — from a connection's first moment, and from the first byte of each later
  request on it, the request line and headers must be complete within ``THALLUS_HEADER_TIMEOUT``
  seconds (10); otherwise the client gets a §8 ``408 RequestTimeoutError`` and the connection is
  closed (nginx's ``client_header_timeout``, Apache's ``mod_reqtimeout``);
* **connection caps** — beyond ``THALLUS_MAX_CONNECTIONS`` open connections per worker, or
  ``THALLUS_MAX_CONNECTIONS_PER_CLIENT`` from one client (its network, as the rate limiter counts
  it; not applied to a trusted proxy, which carries everyone's connections), a new connection is
  answered with a §8 ``503 ServiceUnavailableError`` (``Retry-After``) and closed — so one client
  cannot take every slot;
* **a lingering close** — a response sent before its request's body was read carries
  ``Connection: close`` (the body-limit layer adds it, :mod:`thallus.bodies`), so the connection
  ends with it. Closed at once, a socket with unread input answers the client's next bytes with a
  reset, which can destroy the response before the client reads it; so when uvicorn closes while
  the request body is still arriving, the write side is shut instead, what the client still sends
  is read and dropped for at most ``LINGER_SECONDS``, and then it is closed (RFC 9112 §9.6).
  Without this, uvicorn read such a body for ever, each byte postponing its keep-alive timeout.

Both answers are written straight to the socket, with the security headers and a fresh
correlation ID, because no request exists yet to run through the layers. A body that stops
arriving is bounded in the layers instead (``THALLUS_BODY_TIMEOUT``, :mod:`thallus.bodies`), so
it holds for any server. It overrides only asyncio's protocol methods and reads one attribute of
uvicorn's protocol, its ``h11.Connection`` (``conn``), through h11's public state; uvicorn takes
the class by name (its ``http=`` option). tests/test_slow_clients.py runs every bound against a
real ``thallus serve``, so a uvicorn release that changes this fails there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from thallus.correlation import uuid7
from thallus.errors import error_body
from thallus.headers import HeaderPolicy
from thallus.ratelimit import IPNetwork, client_network, parse_networks
from thallus.server.settings import ServiceSettings

logger = logging.getLogger("thallus.server.connections")

PROTOCOL = "thallus.server.connections:GuardedH11Protocol"


#: How long a connection whose request body was not read stays open after its response, dropping
#: what arrives (Apache's lingering close waits up to 2 s; nginx's lingering_time is 30 s).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one worker enforces, with the security headers its direct answers carry."""

    header_timeout: float
    max_connections: int
    max_per_client: int  # 0: no per-client cap
    trusted_proxies: tuple[IPNetwork, ...]
    ipv4_prefix: int
    ipv6_prefix: int
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Bounds:
        policy = HeaderPolicy.from_settings(settings)
        return cls(
            settings.header_timeout,
            settings.max_connections,
            settings.max_connections_per_client,
            parse_networks(settings.trusted_proxies),
            settings.rate_limit_ipv4_prefix,
            settings.rate_limit_ipv6_prefix,
            policy.no_store_headers,
        )

    def client_key(self, peer: str) -> str | None:
        """What the per-client cap counts a peer as; ``None`` for a trusted proxy (not capped)."""
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(peer)
            if any(address in network for network in self.trusted_proxies):
                return None
        return client_network(peer, self.ipv4_prefix, self.ipv6_prefix)

    def response(self, status: int, error: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """A complete HTTP/1.1 error response in the §8 shape that closes the connection."""
        correlation_id = uuid7()
        body = error_body(error, message, None, correlation_id)
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
        headers = (
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-correlation-id", correlation_id.encode()),
            *extra,
            *self.headers,
        )
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


@functools.cache
def bounds() -> Bounds:
    """This worker's bounds, read once from the same ``THALLUS_*`` settings the service uses."""
    return Bounds.from_settings(ServiceSettings.load())


class _LingeringTransport(asyncio.Transport):
    """The connection's transport as uvicorn sees it: every call passed on, except that ``close()``
    lingers while the request body is still arriving (see the module docstring)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        super().__init__()
        self._real = transport
        self._protocol = protocol
        self._closing = False

    def close(self) -> None:
        if self._closing or self._real.is_closing():
            return
        self._closing = True
        if self._protocol.conn.their_state is not h11.SEND_BODY:
            self._real.close()
            return
        self._protocol.linger()
        if self._real.can_write_eof():
            self._real.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._real.close)

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def abort(self) -> None:
        self._closing = True
        self._real.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._real.writelines(list_of_data)

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline, connection caps and a lingering close
    (module docstring)."""

    _header_deadline: asyncio.TimerHandle | None = None
    _socket: asyncio.BaseTransport | None = None
    _client_key: str | None = None
    _lingering = -1  # bytes dropped while lingering; -1: not lingering
    #: This worker's open connections, in all and per client (one event loop per worker: plain counts).
    open_connections = 0
    per_client: ClassVar[dict[str, int]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        super().connection_made(_LingeringTransport(transport, self))
        self._socket = transport
        # Under `--workers N` uvicorn hands asyncio a socket it bound itself, and the accepted
        # connections come without TCP_NODELAY: each small response then waits for the client's
        # delayed ACK (~40 ms a request on a kept-alive connection, benchmarks/bench_service.py).
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lingering = -1
        GuardedH11Protocol.open_connections += 1
        limits = bounds()
        peer = transport.get_extra_info("peername")
        key = limits.client_key(str(peer[0])) if isinstance(peer, tuple) and peer else None
        if key is not None:
            self._client_key = key
            GuardedH11Protocol.per_client[key] = GuardedH11Protocol.per_client.get(key, 0) + 1
        if GuardedH11Protocol.open_connections > limits.max_connections:
            logger.warning("connection refused: %s connections open (the cap)", limits.max_connections)
            self._refuse("The server has too many open connections; try again shortly.")
            return
        if limits.max_per_client and key is not None and GuardedH11Protocol.per_client[key] > limits.max_per_client:
            logger.warning("connection refused: a client has %s connections open (its cap)", limits.max_per_client)
            self._refuse("This client has too many open connections; close some and try again.")
            return
        self._arm_header_deadline()

    def _refuse(self, message: str) -> None:
        self._answer_and_close(bounds().response(503, "ServiceUnavailableError", message, ((b"retry-after", b"1"),)))

    def linger(self) -> None:
        """From now on, what arrives is dropped (the transport closes after :data:`LINGER_SECONDS`)."""
        self._lingering = 0
        self._disarm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES and self._socket is not None:
                self._socket.close()
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head is (still) on its way
            if self._header_deadline is None and self._socket is not None and not self._socket.is_closing():
                self._arm_header_deadline()
        else:
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._socket is not None:
            self._socket = None
            GuardedH11Protocol.open_connections -= 1
            key = self._client_key
            if key is not None:
                left = GuardedH11Protocol.per_client.get(key, 1) - 1
                if left > 0:
                    GuardedH11Protocol.per_client[key] = left
                else:
                    GuardedH11Protocol.per_client.pop(key, None)
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_deadline = loop.call_later(bounds().header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self._socket is None or self._socket.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        limits = bounds()
        self._answer_and_close(
            limits.response(
                408,
                "RequestTimeoutError",
                f"The request headers did not arrive within {limits.header_timeout:g} seconds.",
            )
        )

    def _answer_and_close(self, response: bytes) -> None:
        self._disarm_header_deadline()
        if isinstance(self._socket, asyncio.WriteTransport):
            self._socket.write(response)
        if self._socket is not None:
            self._socket.close()
