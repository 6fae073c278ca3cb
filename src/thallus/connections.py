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
* **a connection cap** — beyond ``THALLUS_MAX_CONNECTIONS`` open connections per worker, a new
  connection is answered with a §8 ``503 ServiceUnavailableError`` (``Retry-After``) and closed.

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
import functools
import logging
from dataclasses import dataclass
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from thallus.correlation import uuid7
from thallus.errors import error_body
from thallus.headers import HeaderPolicy
from thallus.settings import Settings

logger = logging.getLogger("thallus.connections")

PROTOCOL = "thallus.connections:GuardedH11Protocol"


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one worker enforces, with the security headers its direct answers carry."""

    header_timeout: float
    max_connections: int
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Bounds:
        policy = HeaderPolicy.from_settings(settings)
        return cls(settings.header_timeout, settings.max_connections, policy.no_store_headers)

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
    return Bounds.from_settings(Settings.load())


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and a connection cap (module docstring)."""

    _header_deadline: asyncio.TimerHandle | None = None
    _socket: asyncio.BaseTransport | None = None
    #: This worker's open connections (one event loop per worker, so a plain counter).
    open_connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._socket = transport
        GuardedH11Protocol.open_connections += 1
        limits = bounds()
        if GuardedH11Protocol.open_connections > limits.max_connections:
            logger.warning("connection refused: %s connections open (the cap)", limits.max_connections)
            self._answer_and_close(
                limits.response(
                    503,
                    "ServiceUnavailableError",
                    "The server has too many open connections; try again shortly.",
                    ((b"retry-after", b"1"),),
                )
            )
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
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
