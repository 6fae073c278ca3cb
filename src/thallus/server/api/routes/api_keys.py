"""``/api/v1/api-keys``: create (the raw key is returned once, under ``key``), list, revoke.

Each needs a signed-in session (docs/design.md §9): with an API key these answer 403, so a key cannot
mint a key without its expiry, list its owner's keys or revoke them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from thallus.server.api.deps import JSON_ONLY, ClientDep, IdentityDep, SessionDep
from thallus.server.api.responses import AUTHENTICATED, error_responses
from thallus.server.api.text import Text
from thallus.server.identity.service import key_document, utc

router = APIRouter(prefix="/api/v1/api-keys", tags=["api keys"], responses=error_responses(*AUTHENTICATED, 404))


class ApiKeyCreateRequest(BaseModel):
    name: Text = Field(min_length=1, max_length=100)
    expires_at: datetime | None = Field(None, description="ISO 8601; a time without zone is UTC")


@router.post(
    "", status_code=201, dependencies=JSON_ONLY, summary="Create a key (needs a session and the api_access feature)"
)
async def create_key(
    body: ApiKeyCreateRequest, principal: SessionDep, service: IdentityDep, client: ClientDep
) -> dict[str, Any]:
    expires_at = utc(body.expires_at) if body.expires_at else None
    key, raw = await service.create_api_key(principal, body.name.strip(), expires_at, client)
    return {**key_document(key), "key": raw}


@router.get("", summary="The signed-in user's keys (masked; needs a session)")
async def list_keys(principal: SessionDep, service: IdentityDep) -> list[dict[str, Any]]:
    return await service.list_api_keys(principal)


@router.delete("/{key_id}", status_code=204, summary="Revoke a key; it stops working at once (needs a session)")
async def revoke_key(key_id: str, principal: SessionDep, service: IdentityDep, client: ClientDep) -> Response:
    await service.revoke_api_key(principal, key_id, client)
    return Response(status_code=204)
