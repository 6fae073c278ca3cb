"""Text the service accepts: no NUL, no lone surrogate — a 400/422, never a 500 further down.

JSON lets a string carry both (``"\\u0000"``, ``"\\ud800"``) and a URL a NUL (``%00``). Neither is
text any person types, and each breaks something below the API: PostgreSQL refuses NUL in
``text`` columns (a ``DBAPIError``), a lone surrogate cannot be encoded as UTF-8 (for a hash, a
log line, a response). So they are refused at the edge: :data:`Text` for every string field of
a request body (422), :class:`RefuseNulInUrl` for the path and query of every request (400).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.errors import BadRequestError, send_thallus_error


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text, or ``None``."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it contains a lone surrogate)"
    return None


def _checked(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A request-body string without NUL or lone surrogates (otherwise a 422 naming the field).
Text = Annotated[str, AfterValidator(_checked)]


class RefuseNulInUrl:
    """A pure-ASGI layer: a NUL in the path (``%00`` decoded) or in the query is a 400.

    Checked on the scope's decoded path and raw query string before anything routes, so no path
    parameter, query value or filter ever carries one — a constant-time look, not a per-route
    dependency (FastAPI resolves those for every request).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
        ):
            if scope["type"] == "http":
                await send_thallus_error(send, BadRequestError("The URL contains a NUL character."))
                return
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)
