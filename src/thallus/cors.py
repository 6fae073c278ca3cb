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
A pattern ``https://*.example.com`` allows one more label in place of ``*``
(:class:`~thallus.origins.OriginMatcher`, the same rule CSRF trusts by); an origin it allows is
echoed as sent, never ``*``.

The method and exposed-header lists are options (``allow_methods``, ``expose_headers``), checked at
construction: RFC 9110 tokens, no ``*`` (with credentials it is a literal name, Fetch §3.2.3), no
method a browser never sends (Fetch's forbidden methods) and no ``Set-Cookie`` (never exposed).
The correlation header allowed and exposed by default is the configured one (``correlation_header``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from thallus._asgi import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from thallus.audit import AuditEvent, AuditSink, request_fields
from thallus.correlation import HEADER as CORRELATION_HEADER
from thallus.errors import send_error
from thallus.origins import OriginMatcher, parse_origins

if TYPE_CHECKING:
    from thallus.settings import Settings

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
#: Methods a browser never sends (Fetch §2.2.1 "forbidden method"): listing one is a mistake.
FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
#: Response headers a browser never exposes to a page (Fetch "forbidden response-header name").
FORBIDDEN_EXPOSED = frozenset({"set-cookie", "set-cookie2"})
#: Pattern-allowed origins whose response headers :class:`HeadersByOrigin` keeps rendered, at most.
PATTERN_ORIGIN_CACHE_SIZE = 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2

_VARY = b"vary"
_VARY_ORIGIN = (_VARY, b"Origin")
_VARY_PREFLIGHT = (_VARY, b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
_MAX_REPORTED = 200


def _truncate(value: str) -> str:
    return value if len(value) <= _MAX_REPORTED else value[:_MAX_REPORTED] + "…"


def _header_names(values: Iterable[str], what: str) -> tuple[str, ...]:
    """Header names as given (order kept, case-insensitive duplicates dropped), each a token."""
    names: dict[str, str] = {}
    for value in values:
        name = value.strip()
        if name == "*":
            raise ValueError(f"{what}: '*' is a literal name with credentials (Fetch); list the headers")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{what}: {name!r} is not a header name (RFC 9110 §5.6.2: a token)")
        names.setdefault(name.lower(), name)
    return tuple(names.values())


def allowed_methods(values: Iterable[str]) -> tuple[str, ...]:
    """``allow_methods`` checked: upper-cased tokens, duplicates dropped, at least one, never
    ``*`` (void with credentials) nor a forbidden method."""
    methods = tuple(dict.fromkeys(value.strip().upper() for value in values))
    if not methods:
        raise ValueError("allow_methods: list at least one method")
    for method in methods:
        if method == "*":
            raise ValueError("allow_methods: '*' is not allowed with credentials (Fetch); list the methods")
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"allow_methods: {method!r} is not a method (RFC 9110 §9.1: a token)")
        if method in FORBIDDEN_METHODS:
            raise ValueError(f"allow_methods: browsers never send {method} (a Fetch forbidden method)")
    return methods


def exposed_headers(values: Iterable[str], correlation_header: str = CORRELATION_HEADER) -> tuple[str, ...]:
    """``expose_headers`` checked; the default list names ``correlation_header`` for
    ``X-Correlation-ID``. An explicit list is used as given."""
    values = tuple(values)
    if values == EXPOSED_HEADERS:
        values = tuple(correlation_header if name == CORRELATION_HEADER else name for name in values)
    names = _header_names(values, "expose_headers")
    for name in names:
        if name.lower() in FORBIDDEN_EXPOSED:
            raise ValueError(f"expose_headers: browsers never expose {name} to a page (Fetch)")
    return names


class HeadersByOrigin(dict[bytes | None, tuple[tuple[bytes, bytes], ...]]):
    """The CORS headers of an actual response followed by ``tail``, by allowed origin: rendered at
    construction for the exact origins and ``None`` (not allowed), and on first use for an origin
    a pattern allowed (at most :data:`PATTERN_ORIGIN_CACHE_SIZE` kept: the label is the client's)."""

    def __init__(self, cors: CORSMiddleware, tail: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(
            (origin, (*cors.actual_headers(origin), *tail)) for origin in (None, *cors.allowed_origin_values())
        )
        self._cors = cors
        self._tail = tail
        self._limit = len(self) + PATTERN_ORIGIN_CACHE_SIZE

    def __missing__(self, origin: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
        headers = (*self._cors.actual_headers(origin), *self._tail)
        if len(self) < self._limit:
            self[origin] = headers
        return headers


class CORSMiddleware:
    """Pure-ASGI CORS layer; all header lists are rendered to bytes at construction."""

    @classmethod
    def from_settings(cls, app: ASGIApp, settings: Settings, audit: AuditSink | None = None) -> CORSMiddleware:
        """The layer :func:`~thallus.protect` builds from ``settings`` (also what ``config show`` prints)."""
        return cls(
            app,
            settings.origins,
            allow_methods=settings.cors_allow_methods,
            expose_headers=settings.cors_expose_headers,
            extra_allowed_headers=settings.cors_extra_headers,
            correlation_header=settings.correlation_header,
            max_age=settings.cors_max_age,
            audit=audit,
        )

    def __init__(
        self,
        app: ASGIApp,
        allowed_origins: Sequence[str],
        *,
        allow_methods: Iterable[str] = ALLOWED_METHODS,
        expose_headers: Iterable[str] = EXPOSED_HEADERS,
        extra_allowed_headers: Iterable[str] = (),
        correlation_header: str = CORRELATION_HEADER,
        max_age: int = DEFAULT_MAX_AGE,
        audit: AuditSink | None = None,
    ) -> None:
        """``allowed_origins`` may hold ``https://*.example.com`` patterns (module doc); every list
        is checked here, so a bad one fails at start-up (``ValueError``)."""
        self.app = app
        self.audit = audit
        origins = parse_origins(list(allowed_origins), patterns=True)
        self.allowed_origins = origins
        self.matcher = OriginMatcher(origins)
        self._origins: dict[bytes, bytes] = {
            origin.encode(): origin.encode() for origin in origins if origin in self.matcher.exact
        }
        self._has_patterns = bool(self.matcher.patterns)
        (correlation,) = _header_names((correlation_header,), "correlation_header")
        defaults = (correlation if name == CORRELATION_HEADER else name for name in ALLOWED_HEADERS)
        header_names = _header_names((*defaults, *extra_allowed_headers), "extra_allowed_headers")
        self.allowed_headers = header_names
        self._allowed_header_keys = frozenset(name.lower() for name in header_names) | SAFELISTED_HEADERS
        methods = allowed_methods(allow_methods)
        self.allow_methods = methods
        self._allowed_methods = frozenset(methods)
        self.expose_headers = exposed_headers(expose_headers, correlation)
        actual: list[tuple[bytes, bytes]] = [(b"access-control-allow-credentials", b"true")]
        if self.expose_headers:
            actual.append((b"access-control-expose-headers", ", ".join(self.expose_headers).encode()))
        self._actual_headers: tuple[tuple[bytes, bytes], ...] = tuple(actual)
        preflight: list[tuple[bytes, bytes]] = [
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", ", ".join(methods).encode()),
            (b"access-control-allow-headers", ", ".join(header_names).encode()),
        ]
        if max_age > 0:
            preflight.append((b"access-control-max-age", str(max_age).encode()))
        self._preflight_headers = tuple(preflight)

    def allowed_origin_values(self) -> tuple[bytes, ...]:
        """Every exact allowlisted origin, as the bytes :meth:`allowed_origin` returns (an origin
        a pattern allows is returned as sent, so it cannot be listed here)."""
        return tuple(self._origins.values())

    def allowed_origin(self, origin: bytes) -> bytes | None:
        """What ``Access-Control-Allow-Origin`` carries for a request's ``Origin`` value: the
        canonical allowlisted origin equal to it, else — when a pattern allows it — the value itself
        (lower case, as browsers send it), else ``None``. Patterns are tried only when the exact
        look-up misses."""
        key = origin.lower()
        allowed = self._origins.get(key)
        if allowed is None and self._has_patterns and self.matcher.matches_pattern_bytes(key):
            return key
        return allowed

    def headers_by_origin(self, tail: tuple[tuple[bytes, bytes], ...]) -> HeadersByOrigin:
        """:meth:`actual_headers` then ``tail``, by :meth:`allowed_origin`'s answer, precomputed."""
        return HeadersByOrigin(self, tail)

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
