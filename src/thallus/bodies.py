"""Request-body limit (docs/design.md §8): ``413 PayloadTooLargeError`` before or while reading.

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
  an exception of the application's;
* any response sent while the request's body is still unread (a refusal, or a route that ignores
  its body) carries ``Connection: close``: the rest of the body would otherwise be read as the next
  request, or hold the connection while it trickles in.

The limit (``max_body_bytes``, ``THALLUS_MAX_BODY_BYTES``, 1 MiB by default) can be set per route:
``route_limits`` maps a path, or a prefix ending in ``*``, to its own limit (longest match wins).

A body that stops arriving is bounded too: when the application waits more than ``body_timeout``
seconds (``THALLUS_BODY_TIMEOUT``, 30) for the next chunk, or a body still arriving after that long
has averaged less than ``body_min_rate`` bytes a second (``THALLUS_BODY_MIN_RATE``, 500 — Apache
``mod_reqtimeout``'s ``MinRate``: a trickle of a byte every few seconds never pauses long enough
for the first rule), the request ends with a §8 ``408 RequestTimeoutError``, answered the same
way, and the server closes the connection, whose request never completed.

``count_refusal``, when given, is called with the reason of every refusal as it is decided
(``too_large``, ``timeout``, ``too_slow``): the metrics' hook (:mod:`thallus.metrics`), so refusals
count however they end up answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send
from thallus.errors import PayloadTooLargeError, ThallusError, send_thallus_error

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_BODY_MIN_RATE = 500
CONTENT_LENGTH = b"content-length"
CLOSE = (b"connection", b"close")
#: The reasons of a refusal, as ``count_refusal`` receives them.
TOO_LARGE, TIMEOUT, TOO_SLOW = "too_large", "timeout", "too_slow"
RefusalCounter = Callable[[str], None]


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
    return PayloadTooLargeError(
        f"The request body is larger than {limit} bytes.", details={"max_body_bytes": limit}, headers=[CLOSE]
    )


class RequestTimeoutError(ThallusError):
    status_code = 408


def timed_out(seconds: float) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request body stopped arriving for {seconds:g} seconds.", headers=[CLOSE])


def too_slow(rate: int) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request body arrived slower than {rate} bytes a second.", headers=[CLOSE])


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request announces a body (``Transfer-Encoding``, or a ``Content-Length`` above 0)."""
    for name, value in headers:
        key = name.lower()
        if key == b"transfer-encoding" or (key == CONTENT_LENGTH and value.strip() not in (b"", b"0")):
            return True
    return False


class LimitedBody:
    """One request's ``receive`` and ``send``: the body counted against ``limit``, each wait for a
    chunk bounded by ``timeout``; after a refusal, the application's own answer is replaced by it."""

    __slots__ = (
        "_receive",
        "_send",
        "began",
        "complete",
        "count_refusal",
        "limit",
        "min_rate",
        "received",
        "refusal",
        "replacing",
        "started",
        "timeout",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        limit: int,
        timeout: float = DEFAULT_BODY_TIMEOUT,
        min_rate: int = DEFAULT_BODY_MIN_RATE,
        *,
        expected: bool = True,
        count_refusal: RefusalCounter | None = None,
    ) -> None:
        self._receive = receive
        self._send = send
        self.complete = not expected  # the whole body has been handed on (or there is none)
        self.limit = limit
        self.timeout = timeout
        self.min_rate = min_rate
        self.began = -1.0  # when the application first asked for the body
        self.received = 0
        self.refusal: ThallusError | None = None
        self.started = False
        self.replacing = False
        self.count_refusal = count_refusal

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise self.refusal
        loop = asyncio.get_running_loop()
        if self.began < 0:
            self.began = loop.time()
        try:
            async with asyncio.timeout(self.timeout):
                message = await self._receive()
        except TimeoutError:
            raise self._refuse(timed_out(self.timeout), TIMEOUT) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
            if self.received > self.limit:
                raise self._refuse(too_large(self.limit), TOO_LARGE)
            if self.min_rate and message.get("more_body", False):
                elapsed = loop.time() - self.began
                if elapsed > self.timeout and self.received < self.min_rate * elapsed:
                    raise self._refuse(too_slow(self.min_rate), TOO_SLOW)
        return message

    def _refuse(self, refusal: ThallusError, reason: str) -> ThallusError:
        self.refusal = refusal
        if self.count_refusal is not None:
            self.count_refusal(reason)
        return refusal

    async def send(self, message: Message) -> None:
        if self.replacing:
            return  # the rest of the application's answer to the refusal
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            if self.refusal is not None:  # the application answered the refusal itself: ours instead
                self.replacing = True
                await send_thallus_error(self._send, self.refusal)
                return
            if not self.complete:  # answered with the body unread: the connection must end with it
                message["headers"] = [*message.get("headers", ()), CLOSE]
        await self._send(message)

    async def answer(self, exc: ThallusError) -> bool:
        """Answer the refusal that escaped the application; ``False`` when it is not ours to answer
        (the application raised another error, or had started its response)."""
        if exc is not self.refusal or self.started:
            return False
        self.started = True
        await send_thallus_error(self._send, exc)
        return True


class BodyLimitMiddleware:
    """Pure-ASGI request-body limit and body timeout; see the module docstring for the rules."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        route_limits: Mapping[str, int] | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        body_min_rate: int = DEFAULT_BODY_MIN_RATE,
        count_refusal: RefusalCounter | None = None,
    ) -> None:
        if body_timeout <= 0:
            raise ValueError("body_timeout must be positive")
        if body_min_rate < 0:
            raise ValueError("body_min_rate must be 0 or more")
        self.app = app
        self.limits = BodyLimit(max_body_bytes, route_limits or {})
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.count_refusal = count_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit_for(scope["path"])
        declared = declared_lengths(scope)
        if declared is not None and over_limit(declared, limit):
            if self.count_refusal is not None:
                self.count_refusal(TOO_LARGE)
            await send_thallus_error(send, too_large(limit))
            return
        body = LimitedBody(
            receive,
            send,
            limit,
            self.body_timeout,
            self.body_min_rate,
            expected=has_body(scope["headers"]),
            count_refusal=self.count_refusal,
        )
        try:
            await self.app(scope, body.receive, body.send)
        except ThallusError as exc:
            if not await body.answer(exc):
                raise


def declared_lengths(scope: Scope) -> list[bytes] | None:
    """The ``Content-Length`` values the client sent, or ``None``."""
    values = [value for name, value in scope["headers"] if name.lower() == CONTENT_LENGTH]
    return values or None


def over_limit(declared: list[bytes], limit: int) -> bool:
    """Whether a declared ``Content-Length`` (any of them, if several) is over ``limit``."""
    return any(value.strip().isdigit() and int(value) > limit for value in declared)
