"""The denominator of ``bench_service.py``: a plain Starlette app, no middleware, under uvicorn.

Same paths, methods and statuses as the requests the benchmark sends to ``thallus serve``, answered
from constants, so a ratio against it is what the whole reference service (every layer, the
identity service, the database, the audit writer) adds to serving the request at all::

    .venv/bin/python -m uvicorn --app-dir benchmarks bare_service:app --workers 1 --no-access-log
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

#: The shape and size of ``thallus.server.identity.service.user_document`` for the benchmark's user.
USER: dict[str, Any] = {
    "id": "0195f3a0-8c1e-7d4b-9a6f-2b3c4d5e6f70",
    "email": "bench@example.com",
    "name": "Bench",
    "role": "user",
    "features": ["api_access"],
    "created_at": "2026-01-01T00:00:00+00:00",
}


async def health(request: Request) -> Response:
    """``GET /health``: the same body and ``Cache-Control`` as the reference service's."""
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def me(request: Request) -> Response:
    """``GET /api/v1/users/me``: a constant user document; the ``X-API-Key`` sent is not read."""
    return JSONResponse(USER)


async def logout(request: Request) -> Response:
    """``POST /api/v1/auth/logout``: 204, as the reference service answers it without credentials."""
    return Response(status_code=204)


app = Starlette(
    routes=[
        Route("/health", health, methods=["GET"]),
        Route("/api/v1/users/me", me, methods=["GET"]),
        Route("/api/v1/auth/logout", logout, methods=["POST"]),
    ]
)
