"""``GET /health``: liveness; ``GET /ready``: readiness. Both unauthenticated, never rate limited
(``THALLUS_RATE_LIMIT_EXEMPT_PATHS``), never cached."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from thallus.errors import error_body
from thallus.server.api.responses import error_responses
from thallus.server.readiness import Readiness

router = APIRouter(tags=["health"], responses=error_responses(429, 500))
NO_STORE = {"Cache-Control": "no-store"}


@router.head("/health", include_in_schema=False)
@router.get("/health", summary="Liveness")
async def health() -> JSONResponse:
    """The process answers: nothing else is checked (a dead database must not get it restarted)."""
    return JSONResponse({"status": "ok"}, headers=NO_STORE)


@router.head("/ready", include_in_schema=False)
@router.get("/ready", summary="Readiness", responses=error_responses(503))
async def ready(request: Request) -> Response:
    """The database (and Redis, when configured) answer within their deadline: 200, or a 503 in the
    §8 shape naming what failed, so a load balancer takes the instance out until it is back."""
    readiness: Readiness = request.app.state.readiness
    verdict = await readiness.check()
    if verdict.ready:
        return JSONResponse({"status": "ready", "checks": verdict.checks}, headers=NO_STORE)
    failed = ", ".join(verdict.failed)
    body = error_body("ServiceUnavailableError", f"Not ready: {failed} unavailable.", {"checks": verdict.checks})
    return Response(body, status_code=503, media_type="application/json", headers={**NO_STORE, "Retry-After": "5"})
