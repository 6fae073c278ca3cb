"""``GET /health``: liveness, exempt from authentication and (later) rate limits."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from thallus.server.api.responses import error_responses

router = APIRouter(tags=["health"], responses=error_responses(429, 500, 503))


@router.head("/health", include_in_schema=False)
@router.get("/health", summary="Liveness")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
