"""ASGI type aliases and the few header helpers every layer shares.

Thallus depends on no framework: these aliases follow the ASGI 3.0 specification
(https://asgi.readthedocs.io/en/latest/specs/main.html) so any server or framework fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
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


def collect_headers(scope: Scope, names: frozenset[bytes]) -> dict[bytes, list[str]]:
    """The request headers named in ``names`` (lower-case), each with all its values in order,
    decoded as Latin-1 (lossless: every byte maps to one character). One pass over the headers;
    names are compared case-insensitively, since ASGI only says servers *should* lower-case them.
    """
    found: dict[bytes, list[str]] = {}
    for name, value in scope["headers"]:
        key = name.lower()
        if key in names:
            found.setdefault(key, []).append(value.decode("latin-1"))
    return found
