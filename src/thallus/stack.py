"""``protect(app, settings)``: the layers of SYSTEM.md §2 that need no database, composed.

Outermost first::

    correlation → security headers → CORS → error boundary → [inner layers] → CSRF → app

Correlation and headers wrap everything, so every response — a CORS refusal, a CSRF 403, a crash —
carries the correlation ID and the security headers. The error boundary sits *inside* CORS
(§2 lists it before CORS): its JSON 500 then passes through CORS and stays readable by an allowed
origin, which an SPA needs to show the correlation ID of a failure (Starlette #1175). Nothing
outside the boundary raises: those three layers only edit response-start headers.

``inner`` slots further pure-ASGI layers (rate limiting, authentication) between the boundary and
CSRF, outermost first, so an authentication layer can mark a verified API key before CSRF decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from thallus._asgi import ASGIApp
from thallus.correlation import CorrelationIdMiddleware
from thallus.cors import CORSMiddleware
from thallus.csrf import CSRFMiddleware
from thallus.errors import ErrorBoundaryMiddleware, install_error_handlers
from thallus.headers import HeaderPolicy, SecurityHeadersMiddleware
from thallus.settings import Settings

Layer = Callable[[ASGIApp], ASGIApp]


def protect(app: ASGIApp, settings: Settings | None = None, *, inner: Sequence[Layer] = ()) -> ASGIApp:
    """Wrap any ASGI application in the core protection layers configured by ``settings``.

    Without ``settings``, they are read from the environment (``Settings.load()``). A Starlette or
    FastAPI application also gets §8 handlers for its own HTTP and validation errors
    (:func:`~thallus.errors.install_error_handlers`); any other application's non-JSON error
    responses are rewritten by the error boundary.
    """
    settings = settings or Settings.load()
    if _is_starlette(app):
        install_error_handlers(app)
    wrapped: ASGIApp = CSRFMiddleware(app, settings.trusted_origins, environment=settings.env)
    for layer in reversed(inner):
        wrapped = layer(wrapped)
    wrapped = ErrorBoundaryMiddleware(wrapped, expose_details=settings.expose_error_details)
    wrapped = CORSMiddleware(
        wrapped, settings.origins, extra_allowed_headers=settings.cors_extra_headers, max_age=settings.cors_max_age
    )
    wrapped = SecurityHeadersMiddleware(wrapped, HeaderPolicy.from_settings(settings))
    return CorrelationIdMiddleware(wrapped)


def _is_starlette(app: ASGIApp) -> bool:
    try:
        from starlette.applications import Starlette
    except ImportError:  # pragma: no cover - starlette is a dependency
        return False
    return isinstance(app, Starlette)
