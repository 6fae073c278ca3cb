"""Small inner applications the layer tests wrap."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from thallus._asgi import Receive, Scope, Send
from thallus.correlation import get_correlation_id
from thallus.errors import NotFoundError


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Plain ASGI: 200 JSON echoing the correlation ID and the request method."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    body = json.dumps({"method": scope["method"], "correlation_id": get_correlation_id()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def status_app(status: int, content_type: bytes = b"text/plain", body: bytes = b"x") -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app


async def _items(request: Request) -> Response:
    return JSONResponse({"items": [], "correlation_id": get_correlation_id()})


async def _create(request: Request) -> Response:
    return JSONResponse({"created": True}, status_code=201)


async def _boom(request: Request) -> Response:
    raise RuntimeError("database password is hunter2")


async def _missing(request: Request) -> Response:
    raise NotFoundError("No such widget.", details={"widget": 7})


async def _stream(request: Request) -> Response:
    async def chunks() -> object:
        for index in range(3):
            yield f"chunk {index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")  # type: ignore[arg-type]


async def _framed(request: Request) -> Response:
    return PlainTextResponse(
        "hello",
        headers={"X-Frame-Options": "SAMEORIGIN", "Server": "leaky/1.0", "X-Powered-By": "php", "Vary": "Accept"},
    )


async def _unauthorized(request: Request) -> Response:
    return JSONResponse({"error": "AuthenticationError"}, status_code=401)


async def _forbidden(request: Request) -> Response:
    return JSONResponse({"error": "PermissionDeniedError"}, status_code=403)


async def _socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.close()


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items", _items, methods=["GET"]),
            Route("/items", _create, methods=["POST", "PUT", "PATCH", "DELETE"]),
            Route("/boom", _boom),
            Route("/missing", _missing),
            Route("/stream", _stream),
            Route("/framed", _framed),
            Route("/unauthorized", _unauthorized),
            Route("/forbidden", _forbidden),
            WebSocketRoute("/ws", _socket),
        ]
    )


async def raising_after_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    raise RuntimeError("mid-stream failure")


async def silent_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Returns without answering."""
