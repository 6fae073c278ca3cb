"""The request-body limit (docs/design.md §8): refused before reading when declared, while streaming when not."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.testclient import TestClient

from tests.asgi import Response, acall, http_scope
from thallus import Settings, protect
from thallus._asgi import Message, Receive, Scope, Send
from thallus.bodies import BodyLimit, BodyLimitMiddleware
from thallus.errors import PayloadTooLargeError

SHAPE = {"error", "message", "details", "correlation_id"}


class ReadingApp:
    """Reads the whole body (as every JSON endpoint does), recording each chunk it was handed."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.called = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called = True
        while True:
            message = await receive()
            self.chunks.append(len(message.get("body", b"")))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"read %d" % sum(self.chunks)})


def run(app: Any, path: str = "/upload", *, chunks: list[bytes], declared: int | None = None) -> Response:
    headers = [("content-length", str(declared))] if declared is not None else []
    return asyncio.run(acall(app, http_scope("POST", path, headers), chunks=chunks))


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    inner = ReadingApp()
    response = run(BodyLimitMiddleware(inner, 100), chunks=[b"x" * 50], declared=101)
    assert response.status == 413
    assert response.json()["error"] == "PayloadTooLargeError"
    assert response.json()["details"] == {"max_body_bytes": 100}
    assert not inner.called, "nothing read the body, nothing ran"


def test_a_streamed_body_is_refused_once_it_passes_the_limit() -> None:
    inner = ReadingApp()
    chunks = [b"x" * 40] * 10  # 400 bytes, undeclared (chunked)
    response = run(BodyLimitMiddleware(inner, 100), chunks=chunks)
    assert response.status == 413
    assert sum(inner.chunks) <= 80, "the app never got the chunk that crossed the limit"
    assert len(inner.chunks) == 2


def test_within_the_limit_passes_untouched() -> None:
    inner = ReadingApp()
    response = run(BodyLimitMiddleware(inner, 100), chunks=[b"x" * 60, b"y" * 40], declared=100)
    assert (response.status, response.body) == (200, b"read 100")


@pytest.mark.parametrize(("path", "limit"), [("/upload", 1000), ("/files/a/b", 500), ("/files", 10), ("/other", 10)])
def test_route_limits(path: str, limit: int) -> None:
    limits = BodyLimit(10, {"/upload": 1000, "/files/*": 500})
    assert limits.limit_for(path) == limit
    inner = ReadingApp()
    assert (
        run(
            BodyLimitMiddleware(inner, 10, route_limits={"/upload": 1000, "/files/*": 500}), path, chunks=[b"x" * limit]
        ).status
        == 200
    )
    assert (
        run(
            BodyLimitMiddleware(inner, 10, route_limits={"/upload": 1000, "/files/*": 500}),
            path,
            chunks=[b"x" * (limit + 1)],
        ).status
        == 413
    )


def test_bad_route_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="route limit"):
        BodyLimit(10, {"upload": 5})
    with pytest.raises(ValueError, match="route limit"):
        BodyLimit(10, {"/upload": -1})


def test_an_application_that_answers_the_refusal_itself_gets_the_413_instead() -> None:
    """FastAPI turns any error while reading a body into its own 400; the client must see the 413."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (await receive()).get("more_body"):
                pass
        except PayloadTooLargeError:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})

    response = run(BodyLimitMiddleware(app, 10), chunks=[b"x" * 8, b"x" * 8])
    assert response.status == 413
    assert b"parsing" not in response.body


def test_a_refusal_after_the_response_started_stays_the_applications_exception() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    response = run(BodyLimitMiddleware(app, 10), chunks=[b"x" * 8, b"x" * 8])
    assert response.status == 200
    assert isinstance(response.exception, PayloadTooLargeError)


def test_an_applications_own_413_is_not_ours_to_answer() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise PayloadTooLargeError("Mine.")

    response = run(BodyLimitMiddleware(app, 10), chunks=[b""])
    assert isinstance(response.exception, PayloadTooLargeError)


class Item(BaseModel):
    name: str


def api() -> FastAPI:
    app = FastAPI()

    @app.post("/items")
    async def create(item: Item) -> dict[str, str]:
        return {"name": item.name}

    return app


@pytest.mark.parametrize("declared", [True, False])
def test_protect_limits_bodies_for_every_fastapi_route(declared: bool) -> None:
    settings = Settings(env="development", max_body_bytes=1024)
    client = TestClient(protect(api(), settings), base_url="http://localhost")
    small = client.post("/items", json={"name": "a"})
    assert small.status_code == 200
    big = b'{"name": "' + b"a" * 4096 + b'"}'

    def chunked() -> Any:
        yield big[:1000]
        yield big[1000:]

    response = client.post(
        "/items", content=big if declared else chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    body = response.json()
    assert set(body) == SHAPE and body["error"] == "PayloadTooLargeError"
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_setting_reads_route_limits() -> None:
    settings = Settings(env="development", max_body_bytes=10, route_max_body_bytes="/upload=1000,/files/*=500")
    assert settings.route_max_body_bytes == {"/upload": 1000, "/files/*": 500}
    with pytest.raises(ValueError, match="/path=bytes"):
        Settings(env="development", route_max_body_bytes="/upload:1000")


def test_a_body_that_stops_arriving_is_a_408() -> None:
    async def stalled() -> Message:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(dict(message))

    layer = BodyLimitMiddleware(ReadingApp(), 100, body_timeout=0.2)
    asyncio.run(layer(http_scope("POST", "/upload", []), stalled, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"] == "RequestTimeoutError"


def test_body_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="body_timeout"):
        BodyLimitMiddleware(ReadingApp(), 10, body_timeout=0)


def test_a_body_that_trickles_is_a_408() -> None:
    """Each byte well within the pause bound, the average far below the minimum rate."""

    async def trickle() -> Message:
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(dict(message))

    layer = BodyLimitMiddleware(ReadingApp(), 10_000, body_timeout=0.2, body_min_rate=1000)
    asyncio.run(layer(http_scope("POST", "/upload", []), trickle, send))
    assert sent[0]["status"] == 408
    assert "slower than 1000 bytes" in json.loads(sent[1]["body"])["message"]
