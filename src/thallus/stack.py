"""``protect(app, settings)``: the layers of docs/design.md §2 that need no database, composed.

Outermost first::

    correlation → headers → CORS → request audit → error boundary → rate limit → body limit
        → [inner] → CSRF → app

Correlation and headers wrap everything, so every response — a CORS refusal, a 429, a CSRF 403, a
crash — carries the correlation ID and the security headers. The error boundary sits *inside* CORS
(§2 lists it before CORS): its JSON 500 then passes through CORS and stays readable by an allowed
origin, which an SPA needs to show the correlation ID of a failure (Starlette #1175). Nothing
outside the boundary raises: those layers only edit response-start headers or record. The rate
limiter sits inside CORS too, so an allowed SPA can read a 429 and its ``Retry-After``. With an
``audit`` sink, the request-audit layer (§11's ``request`` record) sits outside the error boundary
so that it sees the final status of every state-changing request, crashes included.

The body limit sits inside the rate limiter, so a flood of oversized requests is limited like any
other; it refuses a declared ``Content-Length`` over the limit before anything reads the body.
``inner`` slots further pure-ASGI layers (authentication) between the body limit and CSRF,
outermost first, so an authentication layer can mark a verified API key before CSRF decides.
"""

from __future__ import annotations

import logging
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar, cast, overload

from thallus._asgi import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from thallus.audit import AuditSink
from thallus.audit.middleware import AuditRequestMiddleware
from thallus.bodies import (
    CONTENT_LENGTH,
    TOO_LARGE,
    BodyLimitMiddleware,
    LimitedBody,
    has_body,
    over_limit,
    too_large,
)
from thallus.correlation import (
    TRACEPARENT_KEY,
    CorrelationIdMiddleware,
    access_logger,
    annotate_span,
    correlation_id_var,
    log_access,
)
from thallus.cors import CORSMiddleware, decorate
from thallus.csrf import EVIDENCE_HEADERS, SAFE_METHODS, CSRFMiddleware, RefusalHook
from thallus.errors import (
    ErrorBoundaryMiddleware,
    ResponseGuard,
    install_error_handlers,
    log_exception_after_start,
    send_thallus_error,
)
from thallus.headers import HeaderPolicy, SecurityHeadersMiddleware
from thallus.metrics import PREFLIGHT, UNMATCHED, Metrics
from thallus.ratelimit import RateLimitMiddleware, RateLimitStorage, create_storage
from thallus.settings import Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

Layer = Callable[[ASGIApp], ASGIApp]


class AnyASGIApp(Protocol):
    """Any ASGI 3 application, whatever its framework's own types for scope, receive and send
    (Litestar's, Quart's and Django's are narrower than ``MutableMapping[str, Any]``)."""

    def __call__(self, scope: Any, receive: Any, send: Any, /) -> Awaitable[None]: ...


StarletteT = TypeVar("StarletteT", bound="Starlette")


@overload
def protect(
    app: StarletteT,
    settings: Settings | None = None,
    *,
    inner: Sequence[Layer] = (),
    audit: AuditSink | None = None,
    rate_limit_storage: RateLimitStorage | None = None,
    csrf_refusal: RefusalHook | None = None,
    correlation_id_generator: Callable[[], str] | None = None,
    correlation_id_validator: Callable[[str], bool] | None = None,
    metrics: Metrics | None = None,
) -> StarletteT: ...


@overload
def protect(
    app: AnyASGIApp,
    settings: Settings | None = None,
    *,
    inner: Sequence[Layer] = (),
    audit: AuditSink | None = None,
    rate_limit_storage: RateLimitStorage | None = None,
    csrf_refusal: RefusalHook | None = None,
    correlation_id_generator: Callable[[], str] | None = None,
    correlation_id_validator: Callable[[str], bool] | None = None,
    metrics: Metrics | None = None,
) -> ASGIApp: ...


def protect(
    app: AnyASGIApp,
    settings: Settings | None = None,
    *,
    inner: Sequence[Layer] = (),
    audit: AuditSink | None = None,
    rate_limit_storage: RateLimitStorage | None = None,
    csrf_refusal: RefusalHook | None = None,
    correlation_id_generator: Callable[[], str] | None = None,
    correlation_id_validator: Callable[[str], bool] | None = None,
    metrics: Metrics | None = None,
) -> ASGIApp:
    """Protect an ASGI application with the core layers configured by ``settings``.

    A Starlette or FastAPI application is protected **in place** and returned itself: the layers
    become the outermost part of its middleware stack (outside Starlette's ``ServerErrorMiddleware``
    and any middleware added before or after), so whichever name a server is pointed at —
    ``fastapi run``, ``fastapi dev``, ``uvicorn main:api`` or ``main:app`` — serves the protected
    app. It also gets §8 handlers for its own HTTP and validation errors
    (:func:`~thallus.errors.install_error_handlers`). Any other ASGI application is wrapped and the
    wrapper (a :class:`ProtectedApp`) returned; its non-JSON error responses are rewritten by the
    error boundary. Either way no exception reaches the server, whose plain-text 500 would carry
    no correlation ID and no security headers.

    Without ``settings``, they are read from the environment (``Settings.load()``): a bad
    configuration fails here, at start-up, not at the first request. ``audit`` receives
    ``csrf_rejected``, ``cors_rejected`` and ``rate_limited`` events; ``rate_limit_storage``
    (``create_storage``'s, or any ``limits`` async storage) defaults to memory, or Redis when
    ``THALLUS_REDIS_URL`` is set. ``csrf_refusal`` answers a CSRF refusal instead of the §8 403
    (:data:`~thallus.csrf.RefusalHook`); ``correlation_id_generator`` mints correlation IDs and
    ``correlation_id_validator`` decides which a client may send (defaults: UUIDv7, and the
    ``[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`` rule). ``metrics`` (:class:`thallus.metrics.Metrics`)
    counts every HTTP request, its duration and the layers' refusals. Protecting the same
    application twice is refused (ValueError).
    """
    settings = settings or Settings.load()
    parts = _Parts(
        inner, audit, rate_limit_storage, csrf_refusal, correlation_id_generator, correlation_id_validator, metrics
    )
    if isinstance(app, ProtectedApp) or isinstance(getattr(app, "build_middleware_stack", None), _Installed):
        raise ValueError("protect() was already applied to this application")
    if not _is_starlette(app):
        return _compose(cast(ASGIApp, app), settings, parts)
    install_error_handlers(app)
    own_stack = _OwnStack(app.build_middleware_stack)
    # Starlette builds its middleware stack on the first call, through this public method; ours
    # wraps what it builds. Reset a stack built already, so the next call goes through ours.
    app.build_middleware_stack = _Installed(_compose(own_stack, settings, parts))  # type: ignore[method-assign]
    app.middleware_stack = None
    return app


def protection(app: ASGIApp) -> ProtectedApp:
    """The :class:`ProtectedApp` serving ``app``: ``app`` itself if :func:`protect` wrapped it, or
    the one installed in a Starlette or FastAPI application. Raises ``LookupError`` if neither."""
    if isinstance(app, ProtectedApp):
        return app
    installed = getattr(app, "build_middleware_stack", None)
    if isinstance(installed, _Installed):
        return installed.protected
    raise LookupError("this application is not protected by thallus.protect()")


class _Installed:
    """What :func:`protect` puts in place of a Starlette application's ``build_middleware_stack``:
    it returns the layers. The application holds it, and nothing global holds either, so a
    protected application is freed like any other."""

    __slots__ = ("protected",)

    def __init__(self, protected: ProtectedApp) -> None:
        self.protected = protected

    def __call__(self) -> ProtectedApp:
        return self.protected


class _OwnStack:
    """A Starlette application's own middleware stack, built on first use (as Starlette itself
    does), so middleware the application adds after :func:`protect` still takes effect."""

    __slots__ = ("build", "stack")

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self.build = build
        self.stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stack = self.stack
        if stack is None:
            stack = self.stack = self.build()
        await stack(scope, receive, send)


@dataclass(frozen=True, slots=True)
class _Parts:
    """What :func:`protect` passes to its layers besides the settings (which hold only values)."""

    inner: Sequence[Layer]
    audit: AuditSink | None
    rate_limit_storage: RateLimitStorage | None
    csrf_refusal: RefusalHook | None
    correlation_id_generator: Callable[[], str] | None
    correlation_id_validator: Callable[[str], bool] | None
    metrics: Metrics | None = None


def _compose(app: ASGIApp, settings: Settings, parts: _Parts) -> ProtectedApp:
    """The layers around ``app``, outermost first as the module docstring draws them."""
    inner, audit, rate_limit_storage, metrics = parts.inner, parts.audit, parts.rate_limit_storage, parts.metrics
    # the layers' refusals are counted from the events they audit; the request record stays opt-in
    layer_audit = metrics.audit_sink(audit) if metrics is not None else audit
    csrf = CSRFMiddleware(
        app,
        settings.trusted_origins,
        environment=settings.env,
        exempt_paths=settings.csrf_exempt_paths,
        on_refusal=parts.csrf_refusal,
        audit=layer_audit,
    )
    wrapped: ASGIApp = csrf
    for layer in reversed(inner):
        wrapped = layer(wrapped)
    wrapped = BodyLimitMiddleware(
        wrapped,
        settings.max_body_bytes,
        route_limits=settings.route_max_body_bytes,
        body_timeout=settings.body_timeout,
        body_min_rate=settings.body_min_rate,
        count_refusal=metrics.body_refused if metrics is not None else None,
    )
    if settings.rate_limit_enabled:
        wrapped = RateLimitMiddleware(
            wrapped,
            rate_limit_storage or create_storage(settings.redis_url, settings.redis_key_prefix),
            general=settings.rate_limit,
            auth=settings.rate_limit_auth,
            auth_paths=settings.rate_limit_auth_paths,
            exempt_paths=settings.rate_limit_exempt_paths,
            trusted_proxies=settings.trusted_proxies,
            proxy_header=settings.proxy_header,
            ipv4_prefix=settings.rate_limit_ipv4_prefix,
            ipv6_prefix=settings.rate_limit_ipv6_prefix,
            key_prefix=settings.redis_key_prefix,
            audit=layer_audit,
        )
    boundary = ErrorBoundaryMiddleware(wrapped, expose_details=settings.expose_error_details)
    request_audit = AuditRequestMiddleware(boundary, audit) if audit is not None else None
    cors = CORSMiddleware.from_settings(request_audit or boundary, settings, layer_audit)
    headers = SecurityHeadersMiddleware(cors, HeaderPolicy.from_settings(settings))
    return ProtectedApp(
        CorrelationIdMiddleware(
            headers,
            header=settings.correlation_header,
            generator=parts.correlation_id_generator,
            validator=parts.correlation_id_validator,
        ),
        headers.policy,
        cors,
        boundary,
        csrf=csrf,
        request_audit=request_audit,
        metrics=metrics,
    )


def _is_starlette(app: object) -> TypeGuard[Starlette]:
    """Whether ``app`` is a Starlette (or FastAPI) application; Starlette is not a dependency of the
    layers, so an application of it means it is installed."""
    starlette = sys.modules.get("starlette.applications")
    return starlette is not None and isinstance(app, starlette.Starlette)


#: The request headers the fast path reads, in its one pass over them.
_READ_HEADERS = EVIDENCE_HEADERS | {b"access-control-request-method", CONTENT_LENGTH, TRACEPARENT_KEY}
# ... and the configured correlation header
_NO_VALUES: tuple[bytes, ...] = ()


class ProtectedApp:
    """What :func:`protect` returns: the composed layers, with one fast path for HTTP requests.

    Composed as separate pure-ASGI layers, an HTTP request pays for every layer a coroutine frame,
    a ``send`` wrapper called once per message and its own pass over the headers — together several
    times the layers' actual work (table 2 of ``benchmarks/bench_core.py``). For HTTP this class
    drives the *same* layer objects from one frame instead: one pass over the request headers, one
    ``send`` wrapper that sets the security, CORS and correlation headers of a response start in one
    pass (header lists precomputed per allowed origin), the error boundary engaged only once a
    response is an error (:class:`~thallus.errors.ResponseGuard`), and the CSRF check made here when
    nothing sits between the boundary and CSRF (no rate limiter, no ``inner`` layers). Preflights,
    WebSocket and lifespan scopes go through the composed layers (:attr:`composed`). With
    ``metrics``, each HTTP request is counted in the same frame, when its response is done.

    The result is the composed layers' result, header for header: tests/test_fast_path.py compares
    the two paths on generated requests and application behaviours.
    """

    def __init__(
        self,
        composed: CorrelationIdMiddleware,
        policy: HeaderPolicy,
        cors: CORSMiddleware,
        boundary: ErrorBoundaryMiddleware,
        *,
        csrf: CSRFMiddleware,
        request_audit: AuditRequestMiddleware | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.composed = composed
        self.metrics = metrics
        # preflights are answered by the composed layers; counted there when metrics are on
        self._preflight = composed if metrics is None else metrics.observed(composed, PREFLIGHT)
        self.policy = policy
        self.cors = cors
        self.boundary = boundary
        self.request_audit = request_audit
        self.access_log = composed.access_log
        # The body limit and CSRF are applied here only when nothing runs between them and the
        # boundary (no rate limiter, no ``inner`` layers); otherwise they run as the layers they are.
        under_boundary = boundary.app
        self.body_limit = under_boundary if isinstance(under_boundary, BodyLimitMiddleware) else None
        after_limit = self.body_limit.app if self.body_limit is not None else under_boundary
        self.csrf = csrf if after_limit is csrf else None
        self.app = csrf.app if self.csrf is not None else after_limit
        self._correlation_key = composed.header_key  # the configured correlation header
        self._accept_or_mint = composed.ids.accept_or_mint
        self._read_headers = _READ_HEADERS | {self._correlation_key}
        self._plain_drop = policy.managed | {self._correlation_key}
        self._no_store_drop = policy.no_store_managed | {self._correlation_key}
        # by allowed origin: rendered now for the exact ones, on first use for one a pattern allows
        self._plain_tails = cors.headers_by_origin(policy.headers)
        self._no_store_tails = cors.headers_by_origin(policy.no_store_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.composed(scope, receive, send)
            return
        found: dict[bytes, list[bytes]] = {}
        read_headers = self._read_headers
        for name, value in scope["headers"]:
            key = name.lower()
            if key in read_headers:
                values = found.get(key)
                if values is None:
                    found[key] = [value]
                else:
                    values.append(value)
        method = scope["method"]
        origins = found.get(b"origin")
        if method == "OPTIONS" and origins is not None and b"access-control-request-method" in found:
            await self._preflight(scope, receive, send)  # a preflight: answered by the CORS layer
            return
        correlation_id, correlation_header = self._accept_or_mint(
            scope, found.get(self._correlation_key, _NO_VALUES), found.get(TRACEPARENT_KEY, _NO_VALUES)
        )
        allowed = self.cors.allowed_origin(origins[0]) if origins is not None and len(origins) == 1 else None
        audited = self.request_audit is not None and method not in SAFE_METHODS
        logging_access = self.access_log and access_logger.isEnabledFor(logging.INFO)
        metrics = self.metrics
        started = time.perf_counter() if audited or logging_access or metrics is not None else 0.0
        status = 0
        guard: ResponseGuard | None = None

        async def emit(message: Message) -> None:
            """The boundary's output: decorated and sent."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = self._response_headers(
                    message.get("headers") or (), status, scope, allowed, correlation_header
                )
            await send(message)

        async def app_send(message: Message) -> None:
            """What the application sends: straight through until an error response starts."""
            nonlocal status, guard
            if guard is not None:
                await guard.send(message)
                return
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    guard = ResponseGuard(self.boundary, emit)
                    await guard.send(message)
                    return
                status = message["status"]
                message["headers"] = self._response_headers(
                    message.get("headers") or (), status, scope, allowed, correlation_header
                )
            await send(message)

        token = correlation_id_var.set(correlation_id)
        try:
            refused = False
            if self.body_limit is not None:
                limit = self.body_limit.limits.limit_for(scope["path"])
                declared = found.get(CONTENT_LENGTH)
                count_refusal = self.body_limit.count_refusal
                if declared is not None and over_limit(declared, limit):
                    if count_refusal is not None:
                        count_refusal(TOO_LARGE)
                    await send_thallus_error(app_send, too_large(limit))
                    refused = True
                else:  # a refusal raised from receive is answered by the boundary, as a ThallusError
                    body = LimitedBody(
                        receive,
                        app_send,
                        limit,
                        self.body_limit.body_timeout,
                        self.body_limit.body_min_rate,
                        expected=has_body(scope["headers"]),
                        count_refusal=count_refusal,
                    )
                    receive, app_send = body.receive, body.send
            csrf = self.csrf
            if refused:
                pass
            elif csrf is not None and method not in SAFE_METHODS:
                verdict = csrf.verdict_from(method, found, scope.get("state"), scope["path"])
                if not verdict.allowed:
                    await csrf.refuse(scope, receive, app_send, method, verdict)
                else:
                    await self.app(scope, receive, app_send)
            else:
                await self.app(scope, receive, app_send)
        except Exception as exc:
            if guard.forwarded if guard is not None else status:
                log_exception_after_start()
                raise
            await self.boundary.answer_exception(emit, exc)
        else:
            if guard is not None:
                await guard.finish()
            elif not status:
                await ResponseGuard(self.boundary, emit).finish()
        finally:
            if audited:
                assert self.request_audit is not None
                self.request_audit.record(scope, status or None, (time.perf_counter() - started) * 1000)
            if logging_access:
                log_access(scope, status, started)
            if metrics is not None:  # Metrics.observe, inline: one lookup, two increments
                seconds = time.perf_counter() - started
                key = (method, getattr(scope.get("route"), "path", UNMATCHED), status)
                cell = metrics.cells.get(key) or metrics.cell(key)
                cell[bisect_left(metrics.buckets, seconds)] += 1
                cell[-1] += seconds
            correlation_id_var.reset(token)

    def _response_headers(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        status: int,
        scope: Scope,
        allowed: bytes | None,
        correlation_header: tuple[bytes, bytes],
    ) -> RawHeaders:
        """The headers the composed CORS, security-header and correlation layers would give, in one pass."""
        policy = self.policy
        ours = policy.select(status, scope)[1]
        if ours is policy.headers:
            result = decorate(headers, self._plain_tails[allowed], self._plain_drop)
        elif ours is policy.no_store_headers:
            result = decorate(headers, self._no_store_tails[allowed], self._no_store_drop)
        else:  # a per-route variant (override_header, csp_nonce): the layers' own steps, in their order
            result = policy.apply(decorate(headers, self.cors.actual_headers(allowed)), status, scope)
            correlation_key = self._correlation_key
            result = [header for header in result if header[0].lower() != correlation_key]
        result.append(correlation_header)
        if annotate_span is not None:  # OpenTelemetry installed: the span current at response start
            annotate_span(correlation_header[1])
        return result
