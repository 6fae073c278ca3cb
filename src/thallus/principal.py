"""Who a request acts for, as resolved by the authentication layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from thallus._asgi import Scope

AuthMethod = Literal["session", "api_key"]
#: ``scope["state"]`` key (``request.state.principal`` in Starlette/FastAPI).
PRINCIPAL_STATE_KEY = "principal"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    email: str
    name: str
    role: str
    auth_method: AuthMethod
    session_id: str | None = None
    api_key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def principal_of(scope: Scope) -> Principal | None:
    state = scope.get("state") or {}
    principal = state.get(PRINCIPAL_STATE_KEY)
    return principal if isinstance(principal, Principal) else None
