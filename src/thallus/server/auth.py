"""The authentication layer (docs/design.md §2, layer 6): credentials → a principal in ``scope["state"]``.

* ``X-API-Key: thal_…`` — verified against the stored keyed hashes; a valid key sets the principal
  and the CSRF hand-off (:func:`~thallus.csrf.mark_api_key_authenticated`), so API-key requests are
  exempt from CSRF exactly as the page says;
* ``Authorization: Bearer <JWT>`` — signature, expiry and the session it belongs to (still open);
* both at once — 400: one credential per request;
* a credential that is presented but invalid — 401 at once (with ``WWW-Authenticate``), never a
  silent fall-through: an invalid key must not end up treated like no key.

Requests without credentials pass with no principal; routes that need one answer 401 themselves.
Keys travel only in ``X-API-Key`` (never in the URL). The refresh cookie is read only by the refresh
and logout endpoints.
"""

from __future__ import annotations

import logging

from thallus._asgi import ASGIApp, Receive, Scope, Send, collect_headers, scope_state
from thallus.csrf import mark_api_key_authenticated
from thallus.errors import AuthenticationError, BadRequestError, ThallusError, send_thallus_error
from thallus.principal import PRINCIPAL_STATE_KEY
from thallus.server.identity.service import Identity
from thallus.server.storage.database import DatabaseUnavailableError

logger = logging.getLogger("thallus.server.auth")

API_KEY_HEADER = b"x-api-key"
AUTHORIZATION_HEADER = b"authorization"
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="thallus"')
_CREDENTIAL_HEADERS = frozenset({API_KEY_HEADER, AUTHORIZATION_HEADER})


class AuthenticationMiddleware:
    """Pure-ASGI layer resolving ``X-API-Key`` and ``Authorization: Bearer`` with :class:`Identity`."""

    def __init__(self, app: ASGIApp, identity: Identity) -> None:
        self.app = app
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = collect_headers(scope, _CREDENTIAL_HEADERS)
        api_keys, authorizations = headers.get(API_KEY_HEADER, []), headers.get(AUTHORIZATION_HEADER, [])
        if not api_keys and not authorizations:
            await self.app(scope, receive, send)
            return
        try:
            self._require_one_credential(api_keys, authorizations)
            await self._resolve(scope, api_keys, authorizations)
        except ThallusError as exc:
            await self._refuse(scope, receive, send, exc)
            return
        except DatabaseUnavailableError:
            await self._refuse(
                scope, receive, send, ThallusError("The service is temporarily unavailable.", status_code=503)
            )
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _require_one_credential(api_keys: list[str], authorizations: list[str]) -> None:
        if (api_keys and authorizations) or len(api_keys) > 1 or len(authorizations) > 1:
            raise BadRequestError("Send exactly one credential: an X-API-Key or an Authorization header.")

    async def _resolve(self, scope: Scope, api_keys: list[str], authorizations: list[str]) -> None:
        if api_keys:
            raw = api_keys[0].strip()
            principal = await self.identity.principal_from_api_key(raw)
            mark_api_key_authenticated(scope)
        else:
            scheme, _, token = authorizations[0].strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("Use Authorization: Bearer <access token>.", headers=[WWW_AUTHENTICATE])
            try:
                principal = await self.identity.principal_from_access_token(token.strip())
            except AuthenticationError as exc:
                exc.headers.append((b"www-authenticate", b'Bearer realm="thallus", error="invalid_token"'))
                raise
        scope_state(scope)[PRINCIPAL_STATE_KEY] = principal

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ThallusError) -> None:
        logger.info("credential refused: %s", exc.message, extra={"status": exc.status_code})
        if scope["type"] == "http":
            await send_thallus_error(send, exc)
            return
        message = await receive()  # a WebSocket handshake: refuse it before accepting
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})
