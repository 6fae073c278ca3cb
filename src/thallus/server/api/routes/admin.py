"""``/api/v1/admin``: operations for the admin role."""

from __future__ import annotations

from fastapi import APIRouter, Response

from thallus.server.api.deps import AdminDep, ClientDep, IdentityDep
from thallus.server.api.responses import AUTHENTICATED, error_responses

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], responses=error_responses(*AUTHENTICATED, 404))


@router.post("/users/{user_id}/unlock", status_code=204, summary="Lift a login lockout and reset its progression")
async def unlock_user(user_id: str, admin: AdminDep, service: IdentityDep, client: ClientDep) -> Response:
    await service.unlock(user_id, client, actor=admin.user_id)
    return Response(status_code=204)
