"""Uniform JSON errors and the error boundary (docs/design.md §8).

Every error, from any layer, is ``{"error", "message", "details", "correlation_id"}`` with
``Content-Type: application/json``. Layers raise nothing across ASGI boundaries: they answer with
:func:`send_error`. The :class:`ErrorBoundaryMiddleware` makes the rule hold for the application too:

* an unhandled exception becomes the JSON 500 (with the exception named in ``details`` only when
  details are exposed — development), logged once with its traceback and correlation ID;
* a :class:`ThallusError` raised by the application becomes its own status and shape;
* a framework's *plain-text* 500 that is followed by the exception (Starlette's
  ``ServerErrorMiddleware`` sends one, then re-raises) is held back and replaced, so the server's
  or framework's text page is never what the client sees;
* any other error response that is not JSON (a router's ``404 Not Found`` text, say) is rewritten
  to the shape, keeping its status and headers (``Allow``, ``Retry-After``, …);
* an application that returns without answering gets the JSON 500 too.

An exception after the response has started cannot be answered; it is logged and re-raised so the
server aborts the connection rather than pretend a truncated body is complete.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from thallus._asgi import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from thallus.correlation import correlation_id_var

logger = logging.getLogger("thallus.errors")

JSON_CONTENT_TYPE = (b"content-type", b"application/json")
_HELD_BODY_LIMIT = 64 * 1024
_DETAIL_TEXT_LIMIT = 1000

#: The §8 type names; other statuses get their reason phrase in CamelCase + ``Error``.
ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "PayloadTooLargeError",
    422: "ValidationError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    401: "Authentication is required.",
    403: "You do not have permission to do this.",
    404: "The requested resource was not found.",
    405: "This method is not allowed on this resource.",
    413: "The request body is too large.",
    429: "Too many requests.",
    500: "An internal error occurred.",
    503: "The service is temporarily unavailable; try again shortly.",
}


def error_type_for(status: int) -> str:
    """The ``error`` field for a status: §8's table, else e.g. 415 → ``UnsupportedMediaTypeError``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "ClientError" if status < 500 else "ServerError"
    name = "".join(re.sub(r"[^A-Za-z0-9]", "", word).capitalize() for word in phrase.replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


def default_message(status: int) -> str:
    if status in _MESSAGES:
        return _MESSAGES[status]
    try:
        return HTTPStatus(status).phrase + "."
    except ValueError:
        return "The request failed."


class ThallusError(Exception):
    """An error with a status and the §8 shape. Raise it from an application, or catch and send."""

    status_code = 500

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        status_code: int | None = None,
        error: str | None = None,
    ) -> None:
        if status_code is not None:
            self.status_code = status_code
        self.message = message or default_message(self.status_code)
        self.details = details
        self.headers = list(headers)
        # A subclass's name is its §8 type (CSRFError, CORSError, …); the base class goes by status.
        named = type(self) is not ThallusError and type(self).__module__ == __name__
        self.error = error or (type(self).__name__ if named else error_type_for(self.status_code))
        super().__init__(self.message)


class BadRequestError(ThallusError):
    status_code = 400


class AuthenticationError(ThallusError):
    status_code = 401


class PermissionDeniedError(ThallusError):
    status_code = 403


class CSRFError(ThallusError):
    status_code = 403


class CORSError(ThallusError):
    status_code = 403


class NotFoundError(ThallusError):
    status_code = 404


class MethodNotAllowedError(ThallusError):
    status_code = 405


class ConflictError(ThallusError):
    status_code = 409


class PayloadTooLargeError(ThallusError):
    status_code = 413


class ValidationError(ThallusError):
    status_code = 422


def invalid_field(loc: Sequence[str | int], msg: str, value: Any) -> ValidationError:
    """A 422 about one input, in the shape FastAPI's own validation errors take here."""
    return ValidationError(
        "The request is invalid.", details=[{"type": "value_error", "loc": list(loc), "msg": msg, "input": value}]
    )


class RateLimitError(ThallusError):
    status_code = 429


class InternalServerError(ThallusError):
    status_code = 500


class ServiceUnavailableError(ThallusError):
    status_code = 503


def error_body(error: str, message: str, details: Any = None, correlation_id: str | None = None) -> bytes:
    """The §8 JSON body; the correlation ID defaults to the current request's.

    Always valid UTF-8 JSON: a lone surrogate echoed from hostile input (JSON allows ``"\\ud800"``)
    becomes U+FFFD rather than an encoding error, and a structure too deep to encode is replaced —
    an error response must never itself fail.
    """
    document = {
        "error": error,
        "message": message,
        "details": details,
        "correlation_id": correlation_id if correlation_id is not None else correlation_id_var.get(),
    }
    try:
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # nested past the encoder's limit, or circular
        document["details"] = None
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return without_surrogates(text).encode("utf-8")


def without_surrogates(text: str) -> str:
    """``text`` with every lone surrogate (not encodable as UTF-8) replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


async def send_error(
    send: Send,
    status: int,
    *,
    error: str | None = None,
    message: str | None = None,
    details: Any = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a complete JSON error response (start and body)."""
    body = error_body(error or error_type_for(status), message or default_message(status), details)
    response_headers: RawHeaders = [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode("ascii")), *headers]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def send_thallus_error(send: Send, exc: ThallusError) -> None:
    await send_error(
        send, exc.status_code, error=exc.error, message=exc.message, details=exc.details, headers=exc.headers
    )


def _is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            return media_type == b"application/json" or media_type.endswith(b"+json")
    return False


_KEPT_ON_REWRITE_EXCLUDED = frozenset({b"content-type", b"content-length", b"transfer-encoding", b"content-encoding"})


class ErrorBoundaryMiddleware:
    """Pure-ASGI layer that guarantees a JSON error for every failure below it (see module doc)."""

    def __init__(self, app: ASGIApp, *, expose_details: bool = False, rewrite_non_json_errors: bool = True) -> None:
        self.app = app
        self.expose_details = expose_details
        self.rewrite_non_json_errors = rewrite_non_json_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = ResponseGuard(self, send)
        try:
            await self.app(scope, receive, guard.send)
        except Exception as exc:
            if guard.forwarded:
                log_exception_after_start()
                raise
            await self.answer_exception(send, exc)
            return
        await guard.finish()

    def needs_rewrite(self, start: Message) -> bool:
        return self.rewrite_non_json_errors and not _is_json(start.get("headers", ()))

    async def answer_exception(self, send: Send, exc: Exception) -> None:
        """Answer an exception raised before anything was sent: its own error or the JSON 500."""
        if isinstance(exc, ThallusError):
            if exc.status_code >= 500:
                logger.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
            await send_thallus_error(send, exc)
            return
        logger.error("unhandled exception: %s", type(exc).__name__, exc_info=exc)
        details = _exception_details(type(exc).__name__, str(exc)) if self.expose_details else None
        await send_error(send, 500, details=details)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        responded = False

        async def tracking_send(message: Message) -> None:
            nonlocal responded
            if message["type"] in ("websocket.accept", "websocket.close", "websocket.http.response.start"):
                responded = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.error("unhandled exception in websocket handler: %s", type(exc).__name__, exc_info=exc)
            if responded:
                raise
            if "websocket.http.response" in scope.get("extensions", {}):
                body = error_body("InternalServerError", default_message(500))
                await send({"type": "websocket.http.response.start", "status": 500, "headers": [JSON_CONTENT_TYPE]})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1011})


class ResponseGuard:
    """One HTTP response as the error boundary sees it: a 5xx is held until the application
    returns or raises, a non-JSON error is replaced by the §8 shape, everything else is forwarded.
    ``forwarded`` says whether anything has reached ``send`` (after which an exception can only
    abort the connection).
    """

    __slots__ = ("_boundary", "_held", "_held_bytes", "_rewrite", "_send", "forwarded")

    def __init__(self, boundary: ErrorBoundaryMiddleware, send: Send) -> None:
        self._boundary = boundary
        self._send = send
        self.forwarded = False
        self._held: list[Message] = []  # a 5xx response, held until the application returns or raises
        self._held_bytes = 0
        self._rewrite: Message | None = None  # start of a non-JSON error whose body is being discarded

    async def send(self, message: Message) -> None:
        held = self._held
        if message["type"] == "http.response.start":
            if message["status"] >= 500:
                held.append(message)
                return
            if message["status"] >= 400 and self._boundary.needs_rewrite(message):
                self._rewrite = message
                return
        elif held:
            held.append(message)
            self._held_bytes += len(message.get("body", b""))
            if self._held_bytes <= _HELD_BODY_LIMIT:
                return
            start = held[0]
            if self._boundary.needs_rewrite(start):  # too large to hold: its body is dropped anyway
                held.clear()
                self._rewrite = start
            else:
                messages = list(held)
                held.clear()
                self.forwarded = True
                for item in messages:
                    await self._send(item)
                return
        if self._rewrite is not None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                start, self._rewrite = self._rewrite, None
                self.forwarded = True
                await _send_rewritten(self._send, start)
            return
        self.forwarded = True
        await self._send(message)

    async def finish(self) -> None:
        """The application returned: send what is held, or the JSON 500 if it never answered."""
        held = self._held
        if held:  # a 5xx the application chose to send, complete and not followed by an exception
            if self._boundary.needs_rewrite(held[0]):
                await _send_rewritten(self._send, held[0])
            else:
                for item in held:
                    await self._send(item)
        elif self._rewrite is not None:
            await _send_rewritten(self._send, self._rewrite)
        elif not self.forwarded:
            logger.error("application returned without sending a response")
            details = _exception_details("no response") if self._boundary.expose_details else None
            await send_error(self._send, 500, details=details)


def log_exception_after_start() -> None:
    """Call in an ``except`` block: the response has started, so the exception can only abort it."""
    logger.exception("unhandled exception after the response started; connection aborted")


def _exception_details(exception: str, message: str = "") -> dict[str, str]:
    if len(message) > _DETAIL_TEXT_LIMIT:
        message = message[:_DETAIL_TEXT_LIMIT] + "…"
    return {"exception": exception, "message": message}


async def _send_rewritten(send: Send, start: Message) -> None:
    """The §8 JSON for a non-JSON error response, keeping its status and headers (``Allow`` …)."""
    status = start["status"]
    headers = start.get("headers", ())
    kept = [(name, value) for name, value in headers if name.lower() not in _KEPT_ON_REWRITE_EXCLUDED]
    details = None
    if status == 405:
        allow = next((value for name, value in kept if name.lower() == b"allow"), None)
        if allow is not None:
            details = {"allowed_methods": [m.strip() for m in allow.decode("latin-1").split(",") if m.strip()]}
    await send_error(send, status, details=details, headers=kept)


# -- Starlette / FastAPI integration ------------------------------------------------------------

_SENSITIVE_FIELD = re.compile(r"pass(word|phrase)?|secret|token|api[_-]?key|authorization|cookie|credential", re.I)
REDACTED = "[redacted]"


def redact(value: Any, *, field: str = "") -> Any:
    """``value`` with every sensitive-looking field (password, token, secret, key, …) replaced."""
    if field and _SENSITIVE_FIELD.search(field):
        return REDACTED
    if isinstance(value, dict):
        return {key: redact(item, field=str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


#: How much of a rejected input a 422 echoes: nesting levels, items per level, characters.
ECHO_DEPTH = 4
ECHO_ITEMS = 20
ECHO_CHARS = 200
TRUNCATED = "…"


def echo_input(value: Any, *, field: str = "", depth: int = ECHO_DEPTH) -> Any:
    """A rejected input as a 422 may show it: sensitive-looking fields redacted as by :func:`redact`,
    at most ``depth`` levels and :data:`ECHO_ITEMS` items a level, strings cut at :data:`ECHO_CHARS`
    characters — a megabyte or a thousand levels of hostile input is neither sent back nor recursed
    into."""
    if field and _SENSITIVE_FIELD.search(field):
        return REDACTED
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + TRUNCATED
    if not isinstance(value, dict | list):
        return value
    if depth <= 0:
        return TRUNCATED
    if isinstance(value, dict):
        items = list(value.items())
        shown: dict[str, Any] = {
            str(key)[:ECHO_CHARS]: echo_input(item, field=str(key), depth=depth - 1) for key, item in items[:ECHO_ITEMS]
        }
        if len(items) > ECHO_ITEMS:
            shown[TRUNCATED] = f"{len(items) - ECHO_ITEMS} more"
        return shown
    listed = [echo_input(item, depth=depth - 1) for item in value[:ECHO_ITEMS]]
    if len(value) > ECHO_ITEMS:
        listed.append(f"{TRUNCATED} {len(value) - ECHO_ITEMS} more")
    return listed


def validation_details(errors: Iterable[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI validation errors as §8 details: ``{type, loc, msg, input}``, secrets redacted."""
    details = []
    for error in errors:
        loc = [part if isinstance(part, (str, int)) else str(part) for part in error.get("loc", ())]
        sensitive = any(isinstance(part, str) and _SENSITIVE_FIELD.search(part) for part in loc)
        value = error.get("input")
        details.append(
            {
                "type": error.get("type"),
                "loc": loc,
                "msg": error.get("msg"),
                "input": REDACTED if sensitive else echo_input(value),
            }
        )
    return details


def install_error_handlers(app: Any) -> None:
    """Give a Starlette or FastAPI application §8 errors for its own exceptions.

    ``HTTPException`` (routing 404/405 included) keeps its status and headers; FastAPI's request
    validation becomes a 422 ``ValidationError`` whose ``input`` never echoes a secret; a
    :class:`ThallusError` keeps its status. A handler the application installed itself is kept;
    FastAPI's ``{"detail": …}`` defaults are replaced.
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response

    def respond(status: int, error: str, message: str, details: Any, headers: Mapping[str, str] | None) -> Response:
        body = error_body(error, message, details)
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != HTTPStatus(status).phrase else None
        details = None
        if status == 405 and exc.headers and "Allow" in exc.headers:
            details = {"allowed_methods": [m.strip() for m in exc.headers["Allow"].split(",")]}
        elif exc.detail is not None and not isinstance(exc.detail, str):
            details = exc.detail
        return respond(status, error_type_for(status), message or default_message(status), details, exc.headers)

    async def thallus_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ThallusError)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in exc.headers}
        return respond(exc.status_code, exc.error, exc.message, exc.details, headers)

    handlers: dict[Any, Any] = {HTTPException: http_exception, ThallusError: thallus_error}
    replaceable: set[Any] = set()  # framework defaults, as opposed to handlers the application chose
    try:
        from fastapi import exception_handlers as fastapi_defaults
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # plain Starlette
        pass
    else:
        replaceable = {fastapi_defaults.http_exception_handler, fastapi_defaults.request_validation_exception_handler}

        async def request_validation(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, RequestValidationError)
            details = validation_details(exc.errors())
            if any(item["type"] == "json_invalid" for item in details):
                malformed = [{**item, "input": None} for item in details if item["type"] == "json_invalid"]
                return respond(400, "BadRequestError", "The request body is not valid JSON.", malformed, None)
            return respond(422, "ValidationError", "The request is invalid.", details, None)

        handlers[RequestValidationError] = request_validation
    for exception_class, handler in handlers.items():
        current = app.exception_handlers.get(exception_class)
        if current is None or current in replaceable:
            app.add_exception_handler(exception_class, handler)
