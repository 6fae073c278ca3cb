"""ASGI type aliases and the few header helpers every layer shares.

Thallus depends on no framework: these aliases follow the ASGI 3.0 specification
(https://asgi.readthedocs.io/en/latest/specs/main.html) so any server or framework fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RawHeaders = list[tuple[bytes, bytes]]

#: Response-start message types: a normal HTTP response, and the denial response a
#: WebSocket handshake may receive (ASGI "websocket.http.response" extension).
RESPONSE_START_TYPES = frozenset({"http.response.start", "websocket.http.response.start"})


def scope_state(scope: Scope) -> dict[str, Any]:
    """The per-request ``scope["state"]`` dict (created if the server set none).

    Starlette's ``request.state`` reads the same dict, so values placed here by one
    layer are visible to later layers and to route handlers.
    """
    state = scope.get("state")
    if state is None:
        state = {}
        scope["state"] = state
    return state


def request_header_values(scope: Scope, name: bytes) -> list[bytes]:
    """Every value of the request header ``name`` (lower-case), in order."""
    return [value for key, value in scope["headers"] if key.lower() == name]


def without_headers(headers: Iterable[tuple[bytes, bytes]], names: frozenset[bytes]) -> RawHeaders:
    """``headers`` minus every header whose lower-cased name is in ``names``."""
    return [(key, value) for key, value in headers if key.lower() not in names]
