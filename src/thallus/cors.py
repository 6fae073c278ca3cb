"""CORS: an explicit allowlist with credentials, never a wildcard (docs/design.md §4).

* A **preflight** is ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``; it is
  answered here, before routing (a 404 or 405 preflight breaks browsers). Allowed: 204 with the
  origin echoed, credentials, the explicit method list (credentials forbid ``*``), the header list
  and ``Max-Age``. Refused (origin not listed, a method or header outside the lists): a JSON 403
  ``CORSError`` carrying no ``Access-Control-*`` header at all.
* An **actual request** from an allowed origin gets ``Access-Control-Allow-Origin: <origin>``,
  ``-Allow-Credentials: true`` and ``-Expose-Headers`` (correlation ID, ``Retry-After``, rate-limit
  headers) — whatever produced the response, errors included. A request from any other origin runs
  unchanged and gets no CORS header: CORS is enforced by the browser; CSRF stops state changes.
* ``Vary: Origin`` is on every response (a cached origin-less response must not be served to an
  allowed origin, Starlette PR #3516); preflights also vary on the two request headers.

Origins compare exactly after lower-casing: ``https://app.example.com.evil.com`` and
``https://evilapp.example.com`` never match ``https://app.example.com``; ``null`` never matches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from thallus._asgi import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from thallus.audit import AuditEvent, AuditSink, request_fields
from thallus.errors import send_error
from thallus.origins import parse_origins

logger = logging.getLogger("thallus.cors")

#: Every standard method, listed explicitly ("Allowed methods: All"; ``*`` is void with credentials).
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: The page's allowed request headers, in its order.
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-API-Key", "X-Correlation-ID")
#: Response headers a page may read: the correlation ID, and what it needs to back off politely.
EXPOSED_HEADERS = ("X-Correlation-ID", "Retry-After", "RateLimit", "RateLimit-Policy")
#: CORS-safelisted request headers (Fetch §4.4) may be requested without being listed.
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
DEFAULT_MAX_AGE = 600

_VARY = b"vary"
_VARY_ORIGIN = (_VARY, b"Origin")
_VARY_PREFLIGHT = (_VARY, b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
_MAX_REPORTED = 200


def _truncate(value: str) -> str:
    return value if len(value) <= _MAX_REPORTED else value[:_MAX_REPORTED] + "…"


class CORSMiddleware:
    """Pure-ASGI CORS layer; all header lists are rendered to bytes at construction."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_origins: Sequence[str],
        *,
        extra_allowed_headers: Iterable[str] = (),
        max_age: int = DEFAULT_MAX_AGE,
        audit: AuditSink | None = None,
    ) -> None:
        self.app = app
        self.audit = audit
        origins = parse_origins(list(allowed_origins))
        self.allowed_origins = origins
        self._origins: dict[bytes, bytes] = {origin.encode(): origin.encode() for origin in origins}
        header_names = tuple(dict.fromkeys((*ALLOWED_HEADERS, *extra_allowed_headers)))
        self.allowed_headers = header_names
        self._allowed_header_keys = frozenset(name.lower() for name in header_names) | SAFELISTED_HEADERS
        self._allowed_methods = frozenset(ALLOWED_METHODS)
        self._actual_headers: tuple[tuple[bytes, bytes], ...] = (
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()),
        )
        preflight: list[tuple[bytes, bytes]] = [
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(header_names).encode()),
        ]
        if max_age > 0:
            preflight.append((b"access-control-max-age", str(max_age).encode()))
        self._preflight_headers = tuple(preflight)

    def allowed_origin_values(self) -> tuple[bytes, ...]:
        """Every allowlisted origin, as the bytes :meth:`allowed_origin` returns."""
        return tuple(self._origins.values())

    def allowed_origin(self, origin: bytes) -> bytes | None:
        """The canonical allowlisted origin equal to a request's ``Origin`` value, if any."""
        return self._origins.get(origin.lower())

    def actual_headers(self, allowed: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
        """The headers of an actual (non-preflight) response to a request from ``allowed``."""
        return ((b"access-control-allow-origin", allowed), *self._actual_headers) if allowed else ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin, request_method, request_headers = preflight_inputs(scope)
        if scope["method"] == "OPTIONS" and origin is not None and request_method is not None:
            await self.preflight(scope, send, origin, request_method, request_headers)
            return
        extra = self.actual_headers(self.allowed_origin(origin) if origin else None)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = decorate(message.get("headers", ()), extra)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def preflight(self, scope: Scope, send: Send, origin: bytes, method: bytes, requested: bytes | None) -> None:
        """Answer a preflight (module doc): 204 with the lists, or the JSON 403 ``CORSError``."""
        allowed = self.allowed_origin(origin)
        origin_text = _truncate(origin.decode("latin-1"))
        if allowed is None:
            await self._refuse(
                scope, send, "This origin is not allowed to make cross-origin requests.", {"origin": origin_text}
            )
            return
        method_text = method.decode("latin-1").strip()
        if method_text.upper() not in self._allowed_methods:
            await self._refuse(
                scope,
                send,
                "This method is not allowed in cross-origin requests.",
                {"origin": origin_text, "method": _truncate(method_text)},
            )
            return
        names = [part.strip().lower() for part in (requested or b"").decode("latin-1").split(",")]
        refused = [name for name in names if name and name not in self._allowed_header_keys]
        if refused:
            await self._refuse(
                scope,
                send,
                "These request headers are not allowed in cross-origin requests.",
                {"origin": origin_text, "headers": [_truncate(name) for name in refused[:10]]},
            )
            return
        headers: RawHeaders = [(b"access-control-allow-origin", allowed), *self._preflight_headers, _VARY_PREFLIGHT]
        if method_text not in self._allowed_methods:
            # Browsers upper-case only the six CORS-normalised methods; "patch" stays as written
            # and is compared case-sensitively, so the answer must name it as sent.
            headers[2] = (b"access-control-allow-methods", headers[2][1] + b", " + method_text.encode("latin-1"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, send: Send, message: str, details: dict[str, object]) -> None:
        logger.warning("CORS preflight refused: %s", message, extra={"cors": details})
        if self.audit is not None:
            self.audit.record(
                AuditEvent(
                    action="cors_rejected", outcome="denied", status_code=403, details=details, **request_fields(scope)
                )
            )
        await send_error(send, 403, error="CORSError", message=message, details=details, headers=(_VARY_PREFLIGHT,))


def preflight_inputs(scope: Scope) -> tuple[bytes | None, bytes | None, bytes | None]:
    """``Origin`` (``b""`` when sent more than once: no browser does, so it is never allowed),
    ``Access-Control-Request-Method`` and the ``Access-Control-Request-Headers`` values joined."""
    origin: bytes | None = None
    request_method: bytes | None = None
    request_headers: bytes | None = None
    origin_count = 0
    for name, value in scope["headers"]:
        key = name.lower()
        if key == b"origin":
            origin = value
            origin_count += 1
        elif key == b"access-control-request-method":
            request_method = value
        elif key == b"access-control-request-headers":
            request_headers = value if request_headers is None else request_headers + b"," + value
    return (b"" if origin_count > 1 else origin), request_method, request_headers


def decorate(
    headers: Iterable[tuple[bytes, bytes]],
    extra: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes] = frozenset(),
) -> RawHeaders:
    """Response headers with the CORS headers of ``extra`` set (app-set ``Access-Control-*``
    dropped) and ``Origin`` merged into ``Vary``. Headers named in ``drop`` are removed too, so an
    outer layer's replacements can be set in the same pass (``extra`` then carries them)."""
    result: RawHeaders = []
    vary_index = -1
    for header in headers:
        key = header[0].lower()
        if key in drop or key.startswith(b"access-control-"):
            continue
        if key == _VARY:
            if vary_index >= 0:  # fold repeated Vary headers into one
                result[vary_index] = (_VARY, result[vary_index][1] + b", " + header[1])
                continue
            vary_index = len(result)
        result.append(header)
    if vary_index < 0:
        result.append(_VARY_ORIGIN)
    else:
        current = result[vary_index][1]
        tokens = {token.strip().lower() for token in current.split(b",")}
        if b"origin" not in tokens and b"*" not in tokens:
            result[vary_index] = (_VARY, current + b", Origin")
    result.extend(extra)
    return result
