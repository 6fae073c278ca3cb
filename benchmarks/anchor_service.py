"""The anchor of ``bench_service.py``: what a plain FastAPI app does for the same routes.

No middleware, no database: ``GET /health``, and ``GET /api/v1/users/me`` answered for an
``Authorization: Bearer`` token verified with PyJWT (HS256 pinned, the ``kid`` header looked up,
the claims ``sub``, ``sid``, ``iat``, ``exp`` and ``jti`` required — the shape Thallus issues) and
its ``sub`` found in an in-memory user dict, or for an ``X-API-Key`` found in an in-memory dict. So a
Thallus/anchor ratio is what the security layer and the reference service's identity view cost
over the least an application must do to answer the same authenticated request; the anchor's
``/health`` is a bare FastAPI app's. The benchmark passes the signing secret, its ``kid`` and the
key in the environment::

    BENCH_ANCHOR_SECRET=… BENCH_ANCHOR_KID=… BENCH_ANCHOR_API_KEY=thal_… \\
        .venv/bin/python -m uvicorn --app-dir benchmarks anchor_service:app --workers 1 --no-access-log
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, Header, HTTPException, Response

from bare_service import USER

SECRET = os.environ.get("BENCH_ANCHOR_SECRET", "anchor-secret-" + "a" * 34)
KID = os.environ.get("BENCH_ANCHOR_KID", "anchor")
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["sub", "sid", "iat", "exp", "jti"]
#: signing keys by ``kid`` (one, as Thallus has until a rotation)
KEYS = {KID: SECRET}
#: users by id: the same document the reference service answers
USERS: dict[str, dict[str, Any]] = {USER["id"]: USER}
#: raw API key → user id
API_KEYS: dict[str, str] = {os.environ.get("BENCH_ANCHOR_API_KEY", "thal_" + "x" * 43): USER["id"]}

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


async def current_user(
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """The user of the request's API key or Bearer token; 401 otherwise (``async``: run on the
    event loop, not in FastAPI's thread pool, as a dependency that awaits nothing should be)."""
    if x_api_key is not None:
        user_id = API_KEYS.get(x_api_key)
    elif authorization is not None and authorization.startswith("Bearer "):
        token = authorization.removeprefix("Bearer ")
        try:
            key = KEYS.get(str(jwt.get_unverified_header(token).get("kid")))
            if key is None:
                raise HTTPException(401, "unknown signing key")
            claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": REQUIRED_CLAIMS})
        except jwt.PyJWTError:
            raise HTTPException(401, "invalid token") from None
        user_id = claims["sub"]
    else:
        user_id = None
    user = USERS.get(user_id) if user_id is not None else None
    if user is None:
        raise HTTPException(401, "not authenticated")
    return user


@app.get("/health")
async def health(response: Response) -> dict[str, str]:
    """The same body and ``Cache-Control`` as the reference service's."""
    response.headers["Cache-Control"] = "no-store"
    return {"status": "ok"}


@app.get("/api/v1/users/me")
async def me(user: Annotated[dict[str, Any], Depends(current_user)]) -> dict[str, Any]:
    return user
