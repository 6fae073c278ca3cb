"""``/api/v1/auth``: register, login, refresh, logout, password change (docs/design.md §9).

The refresh token lives only in an HttpOnly cookie scoped to this path (§6); the access token is
returned in the body and sent back as ``Authorization: Bearer``. Every response here is
``Cache-Control: no-store`` (the headers layer's auth-path rule).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from thallus.errors import AuthenticationError, PermissionDeniedError
from thallus.server.api.deps import JSON_ONLY, ClientDep, IdentityDep, SessionDep, login_origin_check
from thallus.server.api.responses import AUTHENTICATED, error_responses
from thallus.server.api.text import Text
from thallus.server.identity.service import Identity, Login, user_document
from thallus.server.identity.tokens import ACCESS_TOKEN_TTL
from thallus.server.settings import ServiceSettings
from thallus.settings import AUTH_PATH

router = APIRouter(prefix=AUTH_PATH, tags=["auth"], responses=error_responses(*AUTHENTICATED, 409, 415))


class RegisterRequest(BaseModel):
    email: Text = Field(max_length=320)
    password: Text = Field(max_length=1024)
    name: Text = Field("", max_length=200)


class LoginRequest(BaseModel):
    email: Text = Field(max_length=320)
    password: Text = Field(max_length=1024)


class PasswordChangeRequest(BaseModel):
    current_password: Text = Field(max_length=1024)
    new_password: Text = Field(max_length=1024)


class UserSummary(BaseModel):
    id: str
    email: str
    name: str


class TokenResponse(BaseModel):
    access_token: str
    user: UserSummary
    expires_in: int = ACCESS_TOKEN_TTL


def refresh_cookie(settings: ServiceSettings, value: str, max_age: int) -> tuple[bytes, bytes]:
    """``Set-Cookie`` for the refresh token with the environment's name and attributes (docs/design.md §6),
    e.g. ``__Secure-thallus_refresh=…; Path=/api/v1/auth; Max-Age=2592000; Secure; HttpOnly; SameSite=Strict``."""
    policy = settings.cookie_policy
    attributes = [f"{policy.name}={value}", f"Path={policy.path}", f"Max-Age={max_age}"]
    if max_age == 0:
        attributes.append("Expires=Thu, 01 Jan 1970 00:00:00 GMT")
    if policy.secure:
        attributes.append("Secure")
    if policy.http_only:
        attributes.append("HttpOnly")
    attributes.append(f"SameSite={policy.same_site}")
    return b"set-cookie", "; ".join(attributes).encode("latin-1")


def _set_refresh_cookie(response: Response, service: Identity, token: str) -> None:
    response.raw_headers.append(refresh_cookie(service.settings, token, service.settings.refresh_token_ttl))


def _clear_refresh_cookie_header(service: Identity) -> tuple[bytes, bytes]:
    return refresh_cookie(service.settings, "", 0)


def _clear_refresh_cookie(response: Response, service: Identity) -> None:
    response.raw_headers.append(_clear_refresh_cookie_header(service))


def _token_response(login: Login, response: Response, service: Identity) -> dict[str, Any]:
    _set_refresh_cookie(response, service, login.refresh_token)
    user = login.user
    return {
        "access_token": login.access_token,
        "user": {"id": user.id, "email": user.email, "name": user.name},
        "expires_in": ACCESS_TOKEN_TTL,
    }


@router.post(
    "/register",
    status_code=201,
    dependencies=[*JSON_ONLY, Depends(login_origin_check)],
    summary="Create an account (can be disabled with THALLUS_REGISTRATION_ENABLED=false)",
)
async def register(body: RegisterRequest, service: IdentityDep, client: ClientDep) -> dict[str, Any]:
    if not service.settings.registration_enabled:
        raise PermissionDeniedError("Registration is disabled.")
    user = await service.create_user(body.email, body.password, body.name)
    return user_document(user)


@router.post(
    "/login",
    response_model=TokenResponse,
    dependencies=[*JSON_ONLY, Depends(login_origin_check)],
    summary="Sign in: an access token in the body, the refresh token in an HttpOnly cookie",
)
async def login(body: LoginRequest, response: Response, service: IdentityDep, client: ClientDep) -> dict[str, Any]:
    signed_in = await service.login(body.email, body.password, client)
    return _token_response(signed_in, response, service)


@router.post("/refresh", response_model=TokenResponse, summary="Rotate the refresh cookie; a new access token")
async def refresh(request: Request, response: Response, service: IdentityDep, client: ClientDep) -> dict[str, Any]:
    raw = request.cookies.get(service.settings.cookie_policy.name)
    if not raw:
        raise AuthenticationError("No refresh token: sign in first.")
    try:
        rotated = await service.refresh(raw, client)
    except AuthenticationError as exc:
        exc.headers.append(_clear_refresh_cookie_header(service))
        raise
    return _token_response(rotated, response, service)


@router.post("/logout", status_code=204, summary="End the session of the refresh cookie or access token")
async def logout(request: Request, service: IdentityDep, client: ClientDep) -> Response:
    """Idempotent. The cookie is cleared only when the request presented one: a credential-less
    request (a cross-site form, whose cookie SameSite held back) must not sign anyone out."""
    principal = getattr(request.state, "principal", None)
    session_id = principal.session_id if principal is not None else None
    raw_refresh = request.cookies.get(service.settings.cookie_policy.name)
    await service.logout(raw_refresh=raw_refresh, session_id=session_id, client=client)
    response = Response(status_code=204)
    if raw_refresh is not None:
        _clear_refresh_cookie(response, service)
    return response


@router.post(
    "/password",
    status_code=204,
    dependencies=JSON_ONLY,
    summary="Change the password; every session of the user ends at once",
)
async def change_password(
    body: PasswordChangeRequest, principal: SessionDep, service: IdentityDep, client: ClientDep
) -> Response:
    await service.change_password(principal, body.current_password, body.new_password, client)
    response = Response(status_code=204)
    _clear_refresh_cookie(response, service)
    return response
