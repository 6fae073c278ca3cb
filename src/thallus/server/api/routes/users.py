"""``/api/v1/users``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from thallus.server.api.deps import IdentityDep, PrincipalDep
from thallus.server.api.responses import AUTHENTICATED, error_responses
from thallus.server.identity.service import user_document

router = APIRouter(prefix="/api/v1/users", tags=["users"], responses=error_responses(*AUTHENTICATED))


@router.get("/me", summary="The signed-in user (session or API key)")
async def me(principal: PrincipalDep, service: IdentityDep) -> dict[str, Any]:
    return user_document(await service.current_user(principal))
