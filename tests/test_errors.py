"""The error boundary and the §8 JSON shape."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tests.apps import raising_after_start, silent_app, starlette_app, status_app
from tests.asgi import call, websocket_handshake, websocket_scope
from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.errors import (
    ERROR_TYPES,
    ConflictError,
    ErrorBoundaryMiddleware,
    ThallusError,
    error_body,
    error_type_for,
)

SHAPE = {"error", "message", "details", "correlation_id"}


def boundary(app: ASGIApp, *, expose: bool = False) -> ErrorBoundaryMiddleware:
    return ErrorBoundaryMiddleware(app, expose_details=expose)


def test_type_names() -> None:
    assert ERROR_TYPES[401] == "AuthenticationError"
    assert error_type_for(415) == "UnsupportedMediaTypeError"
    assert error_type_for(503) == "ServiceUnavailableError"
    assert error_type_for(418) == "ImATeapotError"
    assert error_type_for(599) == "ServerError"
    assert error_type_for(499) == "ClientError"


def test_error_body_shape() -> None:
    import json

    body = json.loads(error_body("ConflictError", "Taken.", {"field": "email"}, "cid-1"))
    assert body == {
        "error": "ConflictError",
        "message": "Taken.",
        "details": {"field": "email"},
        "correlation_id": "cid-1",
    }


def test_unhandled_exception_is_a_generic_json_500(caplog: pytest.LogCaptureFixture) -> None:
    response = call(boundary(starlette_app()), "GET", "/boom")
    assert response.status == 500
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert set(body) == SHAPE
    assert body["error"] == "InternalServerError"
    assert body["details"] is None
    assert "hunter2" not in response.body.decode()
    assert response.exception is None, "answered, not re-raised to the server"
    assert any(r.name == "thallus.errors" and r.exc_info for r in caplog.records), "logged with its traceback"


def test_development_names_the_exception() -> None:
    body = call(boundary(starlette_app(), expose=True), "GET", "/boom").json()
    assert body["details"] == {"exception": "RuntimeError", "message": "database password is hunter2"}


def test_starlette_plain_text_500_is_replaced() -> None:
    """Starlette's ServerErrorMiddleware sends 'Internal Server Error' then re-raises: never seen."""
    response = call(boundary(starlette_app()), "GET", "/boom")
    assert b"Internal Server Error" not in response.body
    assert [m["type"] for m in response.messages] == ["http.response.start", "http.response.body"]


def test_starlette_debug_traceback_page_is_replaced() -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals")

    app = Starlette(debug=True, routes=[Route("/", boom)])
    response = call(boundary(app), "GET", "/")
    assert response.status == 500
    assert b"secret internals" not in response.body
    assert b"<html" not in response.body


def test_thallus_error_raised_by_the_app_keeps_its_status_and_details() -> None:
    response = call(boundary(starlette_app()), "GET", "/missing")
    assert response.status == 404
    assert response.json()["details"] == {"widget": 7}
    assert response.json()["message"] == "No such widget."


def test_thallus_error_headers_are_sent() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ConflictError("Taken.", headers=[(b"x-extra", b"1")])

    response = call(boundary(app), "POST", "/")
    assert (response.status, response.header("x-extra"), response.json()["error"]) == (409, "1", "ConflictError")


def test_custom_status_error() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ThallusError("Use JSON.", status_code=415)

    response = call(boundary(app), "POST", "/")
    assert (response.status, response.json()["error"]) == (415, "UnsupportedMediaTypeError")


def test_exception_after_the_response_started_is_reraised(caplog: pytest.LogCaptureFixture) -> None:
    response = call(boundary(raising_after_start), "GET", "/")
    assert response.status == 200
    assert isinstance(response.exception, RuntimeError), "the server must abort the connection"
    assert any("after the response started" in r.getMessage() for r in caplog.records)


def test_app_that_never_answers_gets_a_500() -> None:
    response = call(boundary(silent_app), "GET", "/")
    assert response.status == 500
    assert response.json()["error"] == "InternalServerError"


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "BadRequestError"), (401, "AuthenticationError"), (403, "PermissionDeniedError"), (404, "NotFoundError"),
     (405, "MethodNotAllowedError"), (409, "ConflictError"), (413, "PayloadTooLargeError"), (422, "ValidationError"),
     (429, "RateLimitError"), (500, "InternalServerError"), (503, "ServiceUnavailableError")],
)  # fmt: skip
def test_non_json_errors_are_rewritten_to_the_shape(status: int, error: str) -> None:
    response = call(boundary(status_app(status)), "GET", "/")  # type: ignore[arg-type]
    assert response.status == status
    assert response.json()["error"] == error
    assert set(response.json()) == SHAPE
    assert response.header("content-length") == str(len(response.body))


def test_html_error_is_rewritten() -> None:
    async def page(request: Request) -> Response:
        return HTMLResponse("<h1>nope</h1>", status_code=404)

    response = call(boundary(Starlette(routes=[Route("/", page)])), "GET", "/")
    assert response.json()["error"] == "NotFoundError"


def test_json_errors_pass_through_untouched() -> None:
    app = status_app(409, b"application/problem+json", b'{"title": "mine"}')
    response = call(boundary(app), "GET", "/")  # type: ignore[arg-type]
    assert response.body == b'{"title": "mine"}'
    app500 = status_app(500, b"application/json", b'{"error": "handled"}')
    assert call(boundary(app500), "GET", "/").body == b'{"error": "handled"}'  # type: ignore[arg-type]


def test_rewrite_keeps_allow_and_other_headers() -> None:
    response = call(boundary(starlette_app()), "POST", "/boom")
    assert response.status == 405
    assert response.header("allow") is not None
    assert sorted(response.json()["details"]["allowed_methods"]) == ["GET", "HEAD"]


def test_starlette_http_exception_headers_survive() -> None:
    async def limited(request: Request) -> Response:
        raise HTTPException(429, headers={"Retry-After": "60"})

    response = call(boundary(Starlette(routes=[Route("/", limited)])), "GET", "/")
    assert (response.status, response.header("retry-after"), response.json()["error"]) == (429, "60", "RateLimitError")


def test_success_responses_and_streams_are_untouched() -> None:
    response = call(boundary(starlette_app()), "GET", "/stream")
    assert response.status == 200
    assert response.body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert len([m for m in response.messages if m["type"] == "http.response.body"]) >= 3, "still streamed"


def test_large_non_json_500_is_not_held_in_memory() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    response = call(boundary(app), "GET", "/")
    assert response.status == 500
    assert response.json()["error"] == "InternalServerError"


def test_large_json_500_is_streamed_through() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b" " * 4096, "more_body": True})
        await send({"type": "http.response.body", "body": b"{}"})

    response = call(boundary(app), "GET", "/")
    assert response.status == 500
    assert response.body.strip() == b"{}"


def test_rewrite_can_be_turned_off() -> None:
    app = ErrorBoundaryMiddleware(status_app(404), rewrite_non_json_errors=False)  # type: ignore[arg-type]
    assert call(app, "GET", "/").body == b"x"


def test_websocket_exception_before_accept_is_a_json_denial(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("ws boom")

    sent = websocket_handshake(boundary(app), websocket_scope())
    assert sent[0]["type"] == "websocket.http.response.start"
    assert sent[0]["status"] == 500
    assert b"InternalServerError" in sent[1]["body"]
    closed = websocket_handshake(boundary(app), websocket_scope(denial_extension=False))
    assert closed == [{"type": "websocket.close", "code": 1011}]


def test_websocket_exception_after_accept_is_reraised() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("later")

    with pytest.raises(RuntimeError, match="later"):
        websocket_handshake(boundary(app), websocket_scope())


def test_non_http_scopes_pass() -> None:
    import asyncio

    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    asyncio.run(boundary(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_error_logs_do_not_fire_for_client_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    call(boundary(starlette_app()), "GET", "/missing")
    assert not [r for r in caplog.records if r.name == "thallus.errors"]
