"""The service ``thallus serve`` runs: the core layers around a minimal application.

For now the application answers ``GET /health`` and receives CSP violation reports at
``POST /csp-report`` (logged, never stored; set ``THALLUS_CSP_REPORT_URI=/csp-report`` to use it).
The reference API of the identity issue replaces the inner application; the layers stay.
"""

from __future__ import annotations

import json
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thallus._asgi import ASGIApp
from thallus.errors import BadRequestError, PayloadTooLargeError, ThallusError
from thallus.settings import Settings
from thallus.stack import protect

CSP_REPORT_PATH = "/csp-report"
CSP_REPORT_MAX_BYTES = 64 * 1024
_REPORT_TYPES = frozenset({"application/csp-report", "application/reports+json", "application/json"})

report_logger = logging.getLogger("thallus.csp")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})


async def csp_report(request: Request) -> Response:
    """Log a browser's CSP violation report (report-uri or Reporting API format)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in _REPORT_TYPES:
        raise ThallusError("CSP reports must be JSON.", status_code=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > CSP_REPORT_MAX_BYTES:
            raise PayloadTooLargeError(f"A CSP report may be at most {CSP_REPORT_MAX_BYTES} bytes.")
    try:
        report = json.loads(body)
    except ValueError:
        raise BadRequestError("The CSP report is not valid JSON.") from None
    report_logger.warning("CSP violation reported", extra={"csp_report": report})
    return Response(status_code=204)


def create_application() -> Starlette:
    """The inner application, without protection layers."""
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET", "HEAD"]),
            Route(CSP_REPORT_PATH, csp_report, methods=["POST"]),
        ]
    )


def create_service(settings: Settings | None = None) -> ASGIApp:
    """The served ASGI application: :func:`create_application` inside :func:`thallus.protect`."""
    return protect(create_application(), settings or Settings.load())


def serve_factory() -> ASGIApp:
    """What ``thallus serve`` hands to uvicorn (in every worker): JSON logging, then the service."""
    from thallus.logs import configure_logging

    settings = Settings.load()
    configure_logging(settings.log_level)
    return create_service(settings)
