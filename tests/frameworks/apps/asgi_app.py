"""A plain ASGI application behind Thallus: docs/frameworks/asgi.md shows this module, tests/frameworks/test_asgi.py serves it."""

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from thallus import Settings, protect

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def respond(send: Send, status: int, body: bytes, content_type: bytes, *extra: tuple[bytes, bytes]) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/boom":
        raise RuntimeError("kaboom")
    if scope["path"] != "/items":  # a plain-text error: the error boundary answers it in the JSON shape
        await respond(send, 404, b"Not Found", b"text/plain")
    elif scope["method"] == "GET":
        await respond(send, 200, b'{"items":[]}', b"application/json")
    elif scope["method"] == "POST":
        item = json.loads(await read_body(receive))
        await respond(send, 200, json.dumps({"created": item["name"]}).encode(), b"application/json")
    else:
        await respond(send, 405, b"Method Not Allowed", b"text/plain", (b"allow", b"GET, POST"))


app = protect(api, Settings.load())  # THALLUS_* variables; serve `app`
