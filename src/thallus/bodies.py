"""Request-body limit (SYSTEM.md §8): ``413 PayloadTooLargeError`` before or while reading.

A server hands an ASGI application the body in chunks, as fast as the application asks for them;
an application that reads a body whole (every JSON endpoint does) holds all of it. So the limit is
applied where the chunks pass, for every route, not in each handler:

* a declared ``Content-Length`` over the limit is refused before a byte is read (no
  ``100 Continue`` is ever sent for it);
* a chunked or undeclared body is counted as it streams, and refused the moment the count passes
  the limit — nothing past the limit plus the one chunk that crossed it is ever handed on;
* either way the answer is the §8 ``413 PayloadTooLargeError``. When the application turns the
  refusal raised from ``receive`` into a response of its own (FastAPI makes any body error a 400),
  that response is replaced by the 413; when it had already started a response, the refusal stays
  an exception of the application's.

The limit (``max_body_bytes``, ``THALLUS_MAX_BODY_BYTES``, 1 MiB by default) can be set per route:
``route_limits`` maps a path, or a prefix ending in ``*``, to its own limit (longest match wins).
"""

from __future__ import annotations

from collections.abc import Mapping

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send
from thallus.errors import PayloadTooLargeError, send_thallus_error

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
CONTENT_LENGTH = b"content-length"


class BodyLimit:
    """The limits, resolved once per path; the decision functions the layer and the fast path share."""

    def __init__(
        self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, route_limits: Mapping[str, int] | None = None
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be 0 or more")
        self.max_body_bytes = max_body_bytes
        self.exact: dict[str, int] = {}
        prefixes: list[tuple[str, int]] = []
        for pattern, limit in (route_limits or {}).items():
            if not pattern.startswith("/") or limit < 0:
                raise ValueError(f"{pattern!r}: a route limit needs a path starting with '/' and a size of 0 or more")
            if pattern.endswith("*"):
                prefixes.append((pattern[:-1], limit))
            else:
                self.exact[pattern] = limit
        self.prefixes = tuple(sorted(prefixes, key=lambda item: len(item[0]), reverse=True))

    def limit_for(self, path: str) -> int:
        limit = self.exact.get(path)
        if limit is not None:
            return limit
        for prefix, prefix_limit in self.prefixes:
            if path.startswith(prefix):
                return prefix_limit
        return self.max_body_bytes


def too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {limit} bytes.", details={"max_body_bytes": limit})


class LimitedBody:
    """One request's ``receive`` and ``send`` with the body counted against ``limit``."""

    __slots__ = ("_receive", "_send", "exceeded", "limit", "received", "replacing", "started")

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        self.received = 0
        self.exceeded = False
        self.started = False
        self.replacing = False

    async def receive(self) -> Message:
        if self.exceeded:
            raise too_large(self.limit)
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.exceeded = True
                raise too_large(self.limit)
        return message

    async def send(self, message: Message) -> None:
        if self.replacing:
            return  # the rest of the application's answer to the refusal
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            if self.exceeded:  # the application answered the refusal itself: the 413 instead
                self.replacing = True
                await send_thallus_error(self._send, too_large(self.limit))
                return
        await self._send(message)

    async def answer(self, exc: PayloadTooLargeError) -> bool:
        """Answer the refusal that escaped the application; ``False`` when it is not ours to answer
        (the application raised it itself, or had started its response)."""
        if not self.exceeded or self.started:
            return False
        self.started = True
        await send_thallus_error(self._send, too_large(self.limit))
        return True


class BodyLimitMiddleware:
    """Pure-ASGI request-body limit; see the module docstring for the rules."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        route_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.limits = BodyLimit(max_body_bytes, route_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit_for(scope["path"])
        declared = declared_lengths(scope)
        if declared is not None and over_limit(declared, limit):
            await send_thallus_error(send, too_large(limit))
            return
        body = LimitedBody(receive, send, limit)
        try:
            await self.app(scope, body.receive, body.send)
        except PayloadTooLargeError as exc:
            if not await body.answer(exc):
                raise


def declared_lengths(scope: Scope) -> list[bytes] | None:
    """The ``Content-Length`` values the client sent, or ``None``."""
    values = [value for name, value in scope["headers"] if name.lower() == CONTENT_LENGTH]
    return values or None


def over_limit(declared: list[bytes], limit: int) -> bool:
    """Whether a declared ``Content-Length`` (any of them, if several) is over ``limit``."""
    return any(value.strip().isdigit() and int(value) > limit for value in declared)
