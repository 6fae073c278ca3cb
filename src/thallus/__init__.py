"""Thallus: a security layer for HTTP APIs — headers, CSRF, CORS, correlation IDs, JSON errors.

``protect(app, settings)`` protects any ASGI application (a Starlette or FastAPI one in place);
each layer is also usable on its own. The reference service is :mod:`thallus.server`
(``pip install "thallus[server]"``).
"""

from thallus.correlation import CorrelationIdMiddleware, get_correlation_id, propagate_correlation_id
from thallus.cors import CORSMiddleware
from thallus.csrf import CSRFMiddleware, csrf_verdict, mark_api_key_authenticated
from thallus.errors import ErrorBoundaryMiddleware, ThallusError
from thallus.headers import HeaderPolicy, SecurityHeadersMiddleware, csp_nonce, override_header
from thallus.logs import CorrelationIdFilter, configure_logging
from thallus.settings import ConfigurationError, Settings
from thallus.stack import protect, protection

__all__ = [
    "CORSMiddleware",
    "CSRFMiddleware",
    "ConfigurationError",
    "CorrelationIdFilter",
    "CorrelationIdMiddleware",
    "ErrorBoundaryMiddleware",
    "HeaderPolicy",
    "SecurityHeadersMiddleware",
    "Settings",
    "ThallusError",
    "configure_logging",
    "csp_nonce",
    "csrf_verdict",
    "get_correlation_id",
    "mark_api_key_authenticated",
    "override_header",
    "propagate_correlation_id",
    "protect",
    "protection",
]

__version__ = "0.1.0"
