"""FastAPI dependencies shared by the routers: the identity service, the principal, input rules.

Every dependency is ``async def``, though none awaits: FastAPI runs a plain ``def`` dependency in
its thread pool, a thread hop per dependency per request (~0.3 ms each, measured: bench_identity).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from thallus.audit import AuditEvent, request_fields
from thallus.csrf import login_csrf_verdict
from thallus.errors import AuthenticationError, CSRFError, PermissionDeniedError, ThallusError
from thallus.principal import Principal, principal_of
from thallus.server.identity.service import ClientInfo, Identity
from thallus.server.metrics import count_login_csrf_refusal

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="thallus"'}


async def identity(request: Request) -> Identity:
    service: Identity = request.app.state.identity
    return service


async def client_info(request: Request) -> ClientInfo:
    fields = request_fields(request.scope)
    return ClientInfo(fields["ip_address"], fields["user_agent"], fields["method"], fields["path"])


async def current_principal(request: Request) -> Principal:
    principal = principal_of(request.scope)
    if principal is None:
        raise AuthenticationError(
            "Authentication is required.", headers=[(b"www-authenticate", b'Bearer realm="thallus"')]
        )
    return principal


async def admin_principal(
    request: Request,
    principal: Annotated[Principal, Depends(current_principal)],
    service: Annotated[Identity, Depends(identity)],
) -> Principal:
    if not principal.is_admin:
        service.audit.record(
            AuditEvent(
                action="permission_denied",
                outcome="denied",
                user_id=principal.user_id,
                details={"needs": "admin", "auth_method": principal.auth_method},
                **request_fields(request.scope),
            )
        )
        raise PermissionDeniedError("This needs the admin role.")
    return principal


async def session_principal(
    request: Request,
    principal: Annotated[Principal, Depends(current_principal)],
    service: Annotated[Identity, Depends(identity)],
) -> Principal:
    """A principal signed in with a session (Bearer). Key management and password change need one
    (docs/design.md §9): a stolen key must not mint a key that outlives it, nor see or revoke the others."""
    if principal.auth_method != "session":
        service.audit.record(
            AuditEvent(
                action="permission_denied",
                outcome="denied",
                user_id=principal.user_id,
                details={"needs": "session", "auth_method": principal.auth_method, "api_key_id": principal.api_key_id},
                **request_fields(request.scope),
            )
        )
        raise PermissionDeniedError("This needs a signed-in session (Authorization: Bearer), not an API key.")
    return principal


async def require_json(request: Request) -> None:
    """Bodies are JSON only: a cross-site HTML form cannot send JSON without a CORS preflight."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ThallusError("The request body must be JSON (Content-Type: application/json).", status_code=415)


async def login_origin_check(request: Request, service: Annotated[Identity, Depends(identity)]) -> None:
    """Login CSRF (docs/design.md §5): cross-origin evidence must name a trusted origin."""
    headers = request.headers
    verdict = login_csrf_verdict(
        sec_fetch_site=headers.get("sec-fetch-site"),
        origin=headers.get("origin"),
        referer=headers.get("referer"),
        trusted_origins=frozenset(service.settings.trusted_origins),
    )
    if verdict.allowed:
        return
    origin = headers.get("origin")
    details = {"reason": verdict.reason, "origin": origin[:200] if origin else None}
    service.audit.record(
        AuditEvent(action="csrf_rejected", outcome="denied", details=details, **request_fields(request.scope))
    )
    count_login_csrf_refusal(request.app.state.metrics, verdict.reason)
    raise CSRFError("Cross-site request refused: " + verdict.reason + ".", details=details)


IdentityDep = Annotated[Identity, Depends(identity)]
ClientDep = Annotated[ClientInfo, Depends(client_info)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]
SessionDep = Annotated[Principal, Depends(session_principal)]
JSON_ONLY = [Depends(require_json)]
