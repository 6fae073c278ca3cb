"""``protect(app, settings)``: the layers of SYSTEM.md §2 that need no database, composed.

Outermost first::

    correlation → headers → CORS → request audit → error boundary → rate limit → [inner] → CSRF → app

Correlation and headers wrap everything, so every response — a CORS refusal, a 429, a CSRF 403, a
crash — carries the correlation ID and the security headers. The error boundary sits *inside* CORS
(§2 lists it before CORS): its JSON 500 then passes through CORS and stays readable by an allowed
origin, which an SPA needs to show the correlation ID of a failure (Starlette #1175). Nothing
outside the boundary raises: those layers only edit response-start headers or record. The rate
limiter sits inside CORS too, so an allowed SPA can read a 429 and its ``Retry-After``. With an
``audit`` sink, the request-audit layer (§11's ``request`` record) sits outside the error boundary
so that it sees the final status of every state-changing request, crashes included.

``inner`` slots further pure-ASGI layers (authentication) between the rate limiter and CSRF,
outermost first, so an authentication layer can mark a verified API key before CSRF decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from limits.aio.storage import Storage

from thallus._asgi import ASGIApp
from thallus.audit import AuditSink
from thallus.audit.middleware import AuditRequestMiddleware
from thallus.correlation import CorrelationIdMiddleware
from thallus.cors import CORSMiddleware
from thallus.csrf import CSRFMiddleware
from thallus.errors import ErrorBoundaryMiddleware, install_error_handlers
from thallus.headers import HeaderPolicy, SecurityHeadersMiddleware
from thallus.ratelimit import RateLimitMiddleware, create_storage
from thallus.settings import Settings

Layer = Callable[[ASGIApp], ASGIApp]


def protect(
    app: ASGIApp,
    settings: Settings | None = None,
    *,
    inner: Sequence[Layer] = (),
    audit: AuditSink | None = None,
    rate_limit_storage: Storage | None = None,
) -> ASGIApp:
    """Wrap any ASGI application in the core protection layers configured by ``settings``.

    Without ``settings``, they are read from the environment (``Settings.load()``). A Starlette or
    FastAPI application also gets §8 handlers for its own HTTP and validation errors
    (:func:`~thallus.errors.install_error_handlers`); any other application's non-JSON error
    responses are rewritten by the error boundary. ``audit`` receives ``csrf_rejected``,
    ``cors_rejected`` and ``rate_limited`` events; ``rate_limit_storage`` (a ``limits`` storage)
    defaults to memory, or Redis when ``THALLUS_REDIS_URL`` is set.
    """
    settings = settings or Settings.load()
    if _is_starlette(app):
        install_error_handlers(app)
    wrapped: ASGIApp = CSRFMiddleware(app, settings.trusted_origins, environment=settings.env, audit=audit)
    for layer in reversed(inner):
        wrapped = layer(wrapped)
    if settings.rate_limit_enabled:
        wrapped = RateLimitMiddleware(
            wrapped,
            rate_limit_storage or create_storage(settings.redis_url, settings.redis_key_prefix),
            general=settings.rate_limit,
            auth=settings.rate_limit_auth,
            auth_paths=settings.rate_limit_auth_paths,
            exempt_paths=settings.rate_limit_exempt_paths,
            trusted_proxies=settings.trusted_proxies,
            key_prefix=settings.redis_key_prefix,
            audit=audit,
        )
    wrapped = ErrorBoundaryMiddleware(wrapped, expose_details=settings.expose_error_details)
    if audit is not None:
        wrapped = AuditRequestMiddleware(wrapped, audit)
    wrapped = CORSMiddleware(
        wrapped,
        settings.origins,
        extra_allowed_headers=settings.cors_extra_headers,
        max_age=settings.cors_max_age,
        audit=audit,
    )
    wrapped = SecurityHeadersMiddleware(wrapped, HeaderPolicy.from_settings(settings))
    return CorrelationIdMiddleware(wrapped)


def _is_starlette(app: ASGIApp) -> bool:
    try:
        from starlette.applications import Starlette
    except ImportError:  # pragma: no cover - starlette is a dependency
        return False
    return isinstance(app, Starlette)
