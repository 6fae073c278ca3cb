"""Correlation IDs (docs/design.md §7): validation, UUIDv7, the layer, JSON logs, httpx propagation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.apps import ok_app
from tests.asgi import call, websocket_handshake, websocket_scope
from thallus._asgi import Receive, Scope, Send
from thallus.correlation import (
    CorrelationIdMiddleware,
    correlation_headers,
    get_correlation_id,
    is_valid_correlation_id,
    propagate_correlation_id,
    uuid7,
)
from thallus.logs import configure_logging

UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize(
    "value", ["a", "1", "abc-123", "req.42:part_7", "A" * 128, "0190e0c4-1f6b-7c3d-8e5f-0123456789ab", "trace:span"]
)
def test_valid_ids(value: str) -> None:
    assert is_valid_correlation_id(value)


@pytest.mark.parametrize(
    "value",
    ["", "A" * 129, "-leading-dash", ".dot", ":colon", "has space", "tab\there", "new\nline", "a,b", "a;b",
     "ünïcode", "a/b", "{braces}", "a\x00", "trailing\n", "é"],
)  # fmt: skip
def test_invalid_ids(value: str) -> None:
    assert not is_valid_correlation_id(value)


@given(st.binary(max_size=200))
def test_validator_matches_the_rule(raw: bytes) -> None:
    allowed = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
    expected = 1 <= len(raw) <= 128 and raw[0] in allowed - set(b"._:-") and all(byte in allowed for byte in raw)
    assert is_valid_correlation_id(raw) is expected


def test_uuid7_format_and_order() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert all(UUID7.fullmatch(value) for value in ids)
    assert ids == sorted(ids), "strictly time-ordered within a process"
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_uuid7_embeds_the_current_time() -> None:
    import time

    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= int(value.replace("-", "")[:12], 16) <= after


# -- the layer --------------------------------------------------------------------------------


def test_generates_an_id_and_binds_it_for_the_app() -> None:
    response = call(CorrelationIdMiddleware(ok_app), "GET", "/")
    correlation_id = response.header("x-correlation-id")
    assert correlation_id is not None
    assert UUID7.fullmatch(correlation_id)
    assert response.json()["correlation_id"] == correlation_id


def test_valid_client_id_is_used() -> None:
    response = call(CorrelationIdMiddleware(ok_app), "GET", "/", [("X-Correlation-ID", "client-req.7")])
    assert response.header("x-correlation-id") == "client-req.7"
    assert response.json()["correlation_id"] == "client-req.7"


@pytest.mark.parametrize(
    "headers",
    [
        [("x-correlation-id", "A" * 129)],
        [("x-correlation-id", "evil\r\nInjected: yes")],
        [("x-correlation-id", b"\xff\xfe")],
        [("x-correlation-id", "spaces are bad")],
        [("x-correlation-id", "")],
        [("x-correlation-id", "one"), ("x-correlation-id", "two")],
        [("x-correlation-id", "same"), ("x-correlation-id", "same")],
    ],
)
def test_invalid_client_ids_are_replaced(headers: list[tuple[str, str | bytes]]) -> None:
    response = call(CorrelationIdMiddleware(ok_app), "GET", "/", headers)
    correlation_id = response.header("x-correlation-id")
    assert correlation_id is not None
    assert UUID7.fullmatch(correlation_id)


def test_generated_id_is_written_back_into_the_request_headers() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))
        seen.append(scope["state"]["correlation_id"])
        await ok_app(scope, receive, send)

    response = call(CorrelationIdMiddleware(app), "GET", "/", [("x-correlation-id", "bad id")])
    headers, state_id = seen
    values = [value for name, value in headers if name == b"x-correlation-id"]
    assert values == [response.header("x-correlation-id").encode()]  # type: ignore[union-attr]
    assert state_id == response.header("x-correlation-id")


def test_app_set_correlation_header_is_replaced_not_duplicated() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"X-Correlation-ID", b"from-app"), (b"x-correlation-id", b"again")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    response = call(CorrelationIdMiddleware(app), "GET", "/", [("x-correlation-id", "client-1")])
    assert response.values("x-correlation-id") == ["client-1"]


def test_context_variable_is_reset_after_the_request() -> None:
    call(CorrelationIdMiddleware(ok_app), "GET", "/")
    assert get_correlation_id() is None


def test_websocket_accept_carries_the_id() -> None:
    sent = websocket_handshake(CorrelationIdMiddleware(ok_app), websocket_scope(headers=[("x-correlation-id", "ws-1")]))
    assert sent[0]["type"] == "websocket.accept"
    assert (b"x-correlation-id", b"ws-1") in sent[0]["headers"]


def test_lifespan_is_untouched() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    asyncio.run(CorrelationIdMiddleware(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == [{"type": "lifespan"}]


# -- logs -------------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    configure_logging("INFO", stream)
    yield stream
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_log_line_of_a_request_carries_its_id(log_stream: io.StringIO) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        logging.getLogger("someone.elses.library").info("inside the handler")
        await ok_app(scope, receive, send)

    response = call(CorrelationIdMiddleware(app), "POST", "/orders", [("x-correlation-id", "order-77")])
    records = lines(log_stream)
    assert [r["message"] for r in records] == ["inside the handler", "POST /orders 200"]
    assert all(r["correlation_id"] == "order-77" for r in records)
    access = records[-1]
    assert access["logger"] == "thallus.access"
    assert (access["method"], access["path"], access["status"]) == ("POST", "/orders", 200)
    assert isinstance(access["duration_ms"], float)
    assert access["duration_ms"] >= 0
    assert response.status == 200


def test_refused_id_is_logged_escaped_and_truncated(log_stream: io.StringIO) -> None:
    hostile = b'\x1b[31mfake\r\n{"level": "CRITICAL"}' + b"x" * 500
    call(CorrelationIdMiddleware(ok_app), "GET", "/", [("x-correlation-id", hostile)])
    raw = log_stream.getvalue()
    assert "\x1b" not in raw
    assert "\r" not in raw
    assert len(raw.splitlines()) == 2, "no forged line"
    warning = lines(log_stream)[0]
    assert warning["level"] == "WARNING"
    assert warning["refused_count"] == 1
    sample = warning["refused_values"][0]
    assert sample.startswith("\\x1b[31mfake\\x0d\\x0a")
    assert sample.endswith("…")
    assert len(sample) < 120


def test_log_lines_outside_requests_have_null_id(log_stream: io.StringIO) -> None:
    logging.getLogger("thallus.test").warning("startup")
    assert lines(log_stream)[0]["correlation_id"] is None


def test_exception_log_line_carries_traceback(log_stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("thallus.test").exception("failed")
    record = lines(log_stream)[0]
    assert "ValueError: boom" in record["exception"]


# -- outgoing httpx calls ---------------------------------------------------------------------


async def _echo_headers(scope: Scope, receive: Receive, send: Send) -> None:
    headers = {name.decode(): value.decode() for name, value in scope["headers"]}
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(headers).encode()})


def test_async_client_propagates_the_current_id() -> None:
    seen: dict[str, Any] = {}

    async def service(scope: Scope, receive: Receive, send: Send) -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_echo_headers), base_url="http://downstream"
        ) as client:
            propagate_correlation_id(client)
            seen["propagated"] = (await client.get("/")).json().get("x-correlation-id")
            explicit = await client.get("/", headers={"X-Correlation-ID": "explicit"})
            seen["explicit"] = explicit.json().get("x-correlation-id")
        await ok_app(scope, receive, send)

    call(CorrelationIdMiddleware(service), "GET", "/", [("x-correlation-id", "upstream-9")])
    assert seen == {"propagated": "upstream-9", "explicit": "explicit"}


def test_sync_client_hook_and_headers_helper() -> None:
    from thallus.correlation import correlation_id_var

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": request.headers.get("x-correlation-id")})

    client = propagate_correlation_id(httpx.Client(transport=httpx.MockTransport(handler)))
    assert client.get("http://x/").json() == {"id": None}
    assert correlation_headers() == {}
    token = correlation_id_var.set("sync-5")
    try:
        assert client.get("http://x/").json() == {"id": "sync-5"}
        assert correlation_headers() == {"X-Correlation-ID": "sync-5"}
    finally:
        correlation_id_var.reset(token)
