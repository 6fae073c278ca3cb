"""Access tokens (JWT, HS256 pinned, 15 minutes) and opaque refresh tokens (docs/design.md §9).

An access token carries ``sub`` (user), ``sid`` (session), ``iat``, ``exp`` and ``jti``; its header
names the signing key (``kid``) so keys can rotate. Verification accepts only HS256 — never
``none`` and never an algorithm named by the token — and requires every claim.

A verified token is remembered (its exact text, at most ``VERIFIED_CAPACITY`` of them), so a
client's next requests with it skip the decoding and the HMAC — PyJWT's pure-Python base64 and
JSON work is most of a Bearer request's CPU — and only its expiry is checked again. The same text
can only carry the same signature, and the keys are fixed for the process's life.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from thallus.correlation import uuid7
from thallus.server.identity.keys import KeyRing

ACCESS_TOKEN_TTL = 900
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("sub", "sid", "iat", "exp", "jti")
REFRESH_PURPOSE = "refresh-token"
VERIFIED_CAPACITY = 10_000


class InvalidTokenError(Exception):
    """The token is malformed, forged, expired or signed by an unknown key."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str
    issued_at: int
    expires_at: int
    token_id: str


class AccessTokens:
    def __init__(self, keys: KeyRing, ttl: int = ACCESS_TOKEN_TTL) -> None:
        self.kid, self._signing_key = keys.signing_key()
        self._verification_keys = keys.verification_keys()
        self.ttl = ttl
        self._verified: OrderedDict[str, AccessClaims] = OrderedDict()

    def issue(self, user_id: str, session_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "sid": session_id, "iat": now, "exp": now + self.ttl, "jti": uuid7()}
        return jwt.encode(claims, self._signing_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def decode(self, token: str) -> AccessClaims:
        claims = self._verified.get(token)
        if claims is not None:
            if claims.expires_at <= time.time():
                del self._verified[token]
                raise InvalidTokenError("the access token has expired")
            self._verified.move_to_end(token)
            return claims
        claims = self._decode(token)
        self._verified[token] = claims
        if len(self._verified) > VERIFIED_CAPACITY:
            self._verified.popitem(last=False)
        return claims

    def _decode(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
            key = self._verification_keys.get(str(header.get("kid")))
            if key is None:
                raise InvalidTokenError("unknown signing key")
            claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": list(REQUIRED_CLAIMS)})
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("the access token has expired") from None
        except jwt.PyJWTError:
            raise InvalidTokenError("the access token is invalid") from None
        if not all(isinstance(claims[name], str) for name in ("sub", "sid", "jti")):
            raise InvalidTokenError("the access token is invalid")
        return AccessClaims(claims["sub"], claims["sid"], int(claims["iat"]), int(claims["exp"]), claims["jti"])


def new_refresh_token() -> str:
    """256 random bits, URL-safe; only its keyed hash is stored."""
    return secrets.token_urlsafe(32)
