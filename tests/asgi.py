"""A tiny, exact ASGI driver for tests: hand-built scopes, raw header bytes, every message kept.

Starlette's TestClient normalises headers through httpx; these tests need to send raw bytes,
repeated headers and non-ASCII values, and to see the exact ``http.response.start`` message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from thallus._asgi import ASGIApp, Message

HeaderInput = Iterable[tuple[str | bytes, str | bytes]]


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message] = field(default_factory=list)
    exception: BaseException | None = None

    def values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [value.decode("latin-1") for header, value in self.headers if header.lower() == key]

    def header(self, name: str) -> str | None:
        """The single value of ``name``; fails the test if the header is duplicated."""
        values = self.values(name)
        assert len(values) <= 1, f"{name} is duplicated: {values}"
        return values[0] if values else None

    def names(self) -> list[str]:
        return [name.decode("latin-1").lower() for name, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(
    method: str = "GET",
    path: str = "/",
    headers: HeaderInput = (),
    *,
    scheme: str = "http",
    query_string: bytes = b"",
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode("latin-1", "replace"),
        "root_path": "",
        "query_string": query_string,
        "headers": [(_raw(name).lower(), _raw(value)) for name, value in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    if state is not None:
        scope["state"] = state
    return scope


async def acall(app: ASGIApp, scope: dict[str, Any], body: bytes = b"", *, chunks: Sequence[bytes] = ()) -> Response:
    """Run one HTTP request through ``app``; an exception escaping the app is kept, not raised."""
    parts = list(chunks) or [body]
    inbound: list[Message] = [
        {"type": "http.request", "body": part, "more_body": index < len(parts) - 1} for index, part in enumerate(parts)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbound:
            return inbound.pop(0)
        await asyncio.sleep(3600)  # a real server blocks until the client disconnects
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    exception: BaseException | None = None
    try:
        await app(scope, receive, send)
    except Exception as exc:
        exception = exc
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) <= 1, f"response started {len(starts)} times"
    if not starts:
        return Response(0, [], b"", sent, exception)
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Response(starts[0]["status"], list(starts[0].get("headers", [])), body_bytes, sent, exception)


def call(
    app: ASGIApp,
    method: str = "GET",
    path: str = "/",
    headers: HeaderInput = (),
    body: bytes = b"",
    **scope_options: Any,
) -> Response:
    return asyncio.run(acall(app, http_scope(method, path, headers, **scope_options), body))


def websocket_scope(path: str = "/ws", headers: HeaderInput = (), *, denial_extension: bool = True) -> dict[str, Any]:
    scope = http_scope("GET", path, headers)
    scope["type"] = "websocket"
    scope["scheme"] = "ws"
    del scope["method"]
    scope["subprotocols"] = []
    scope["extensions"] = {"websocket.http.response": {}} if denial_extension else {}
    return scope


def websocket_handshake(app: ASGIApp, scope: dict[str, Any]) -> list[Message]:
    """Send ``websocket.connect`` (then a disconnect) and return everything the app sent."""
    inbound: list[Message] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbound.pop(0) if inbound else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent
