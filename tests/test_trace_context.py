"""W3C Trace Context: a valid ``traceparent`` is accepted and propagated; without a client
correlation ID its trace ID becomes the correlation ID; an invalid one is ignored, never an error;
with OpenTelemetry the correlation ID lands on the current span."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.asgi import acall, call, http_scope, websocket_handshake, websocket_scope
from tests.server import running_server
from thallus import Settings, propagate_correlation_id, protect
from thallus._asgi import Receive, Scope, Send
from thallus.correlation import correlation_headers, parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        (TRACEPARENT, True),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", True),
        (f"01-{TRACE_ID}-{PARENT_ID}-01-extra-fields", True),  # a later version: its first four fields
        (f"01-{TRACE_ID}-{PARENT_ID}-01", True),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", False),  # version 00 is exactly 55 characters
        (f"01-{TRACE_ID}-{PARENT_ID}-01x", False),
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", False),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT_ID}-01", False),  # all-zero trace ID
        (f"00-{TRACE_ID}-{'0' * 16}-01", False),  # all-zero parent ID
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", False),  # lower-case hex only
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", False),
        (f"00-{TRACE_ID}-{PARENT_ID}-1", False),
        ("", False),
        ("garbage", False),
        (f" {TRACEPARENT}", False),
    ],
)
def test_traceparent_syntax(raw: str, valid: bool) -> None:
    parsed = parse_traceparent(raw.encode())
    assert (parsed is not None) is valid
    if parsed is not None:
        assert (parsed.trace_id, parsed.parent_id) == (TRACE_ID, PARENT_ID)


sent_outgoing: list[httpx.Headers] = []


def outgoing_client() -> httpx.AsyncClient:
    def record(request: httpx.Request) -> httpx.Response:
        sent_outgoing.append(request.headers)
        return httpx.Response(200)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    propagate_correlation_id(client)
    return client


async def calling_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Makes one outgoing call, then answers with the headers it would propagate."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        return
    async with outgoing_client() as client:
        await client.get("https://downstream.example/")
    body = json.dumps(correlation_headers()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def protected() -> Any:
    return protect(calling_app, Settings(rate_limit_enabled=False))


def test_the_trace_id_becomes_the_correlation_id_and_is_propagated_to_a_child_call() -> None:
    sent_outgoing.clear()
    response = call(protected(), "GET", "/items", [("traceparent", TRACEPARENT)])
    assert response.status == 200
    assert response.header("x-correlation-id") == TRACE_ID
    [outgoing] = sent_outgoing
    assert outgoing["x-correlation-id"] == TRACE_ID
    child = parse_traceparent(outgoing["traceparent"].encode())
    assert child is not None
    assert (child.trace_id, child.flags) == (TRACE_ID, "01")
    assert child.parent_id != PARENT_ID, "the outgoing call is a child of this hop"
    propagated = response.json()  # correlation_headers(), for a caller building its own requests
    assert propagated["X-Correlation-ID"] == TRACE_ID
    assert propagated["traceparent"].split("-")[1] == TRACE_ID


def test_a_client_correlation_id_wins_and_the_trace_context_still_travels() -> None:
    sent_outgoing.clear()
    response = call(protected(), "GET", "/items", [("traceparent", TRACEPARENT), ("x-correlation-id", "client-id-1")])
    assert response.header("x-correlation-id") == "client-id-1"
    [outgoing] = sent_outgoing
    assert outgoing["x-correlation-id"] == "client-id-1"
    assert outgoing["traceparent"].split("-")[1] == TRACE_ID


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01")],
        [("traceparent", "garbage\x00")],
        [("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)],  # more than one: ignored
    ],
)
def test_an_invalid_traceparent_is_ignored_never_an_error(headers: list[tuple[str, str]]) -> None:
    sent_outgoing.clear()
    response = call(protected(), "GET", "/items", headers)
    assert response.status == 200
    assert UUID7.fullmatch(response.header("x-correlation-id") or "")
    [outgoing] = sent_outgoing
    assert "traceparent" not in outgoing


def test_no_trace_context_leaks_into_the_next_request() -> None:
    app = protected()

    async def both() -> tuple[Any, Any]:
        first = await acall(app, http_scope("GET", "/items", [("traceparent", TRACEPARENT)]))
        second = await acall(app, http_scope("GET", "/items"))
        return first, second

    sent_outgoing.clear()
    first, second = asyncio.run(both())
    assert first.header("x-correlation-id") == TRACE_ID
    assert second.header("x-correlation-id") != TRACE_ID
    assert "traceparent" in sent_outgoing[0] and "traceparent" not in sent_outgoing[1]


def test_a_websocket_handshake_takes_the_trace_id_too() -> None:
    messages = websocket_handshake(protected(), websocket_scope("/ws", [("traceparent", TRACEPARENT)]))
    accept = next(message for message in messages if message["type"] == "websocket.accept")
    assert (b"x-correlation-id", TRACE_ID.encode()) in accept["headers"]


def test_with_opentelemetry_the_correlation_id_is_set_on_the_current_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")

    async def traced_app(scope: Scope, receive: Receive, send: Send) -> None:
        with trace.use_span(tracer.start_span("handler"), end_on_exit=True):
            async with outgoing_client() as client:
                await client.get("https://downstream.example/")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    sent_outgoing.clear()
    response = call(
        protect(traced_app, Settings(rate_limit_enabled=False)), "GET", "/", [("x-correlation-id", "otel-1")]
    )
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["correlation_id"] == "otel-1"
    assert response.header("x-correlation-id") == "otel-1"
    [outgoing] = sent_outgoing
    context = span.get_span_context()
    assert context is not None
    assert (
        outgoing["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    )


def test_a_traceparent_round_trip_through_thallus_serve() -> None:
    with running_server({"THALLUS_LOG_LEVEL": "INFO"}) as server:
        ok = httpx.get(server.url + "/health", headers={"traceparent": TRACEPARENT}, timeout=10)
        missing = httpx.get(server.url + "/nowhere", headers={"traceparent": TRACEPARENT}, timeout=10)
        ignored = httpx.get(server.url + "/health", headers={"traceparent": "00-zz"}, timeout=10)
        assert ok.status_code == 200 and ok.headers["x-correlation-id"] == TRACE_ID
        assert missing.status_code == 404 and missing.json()["correlation_id"] == TRACE_ID
        assert ignored.status_code == 200 and UUID7.fullmatch(ignored.headers["x-correlation-id"])
        output = server.output()
    access = [json.loads(line) for line in output.splitlines() if '"thallus.access"' in line]
    assert [line["correlation_id"] for line in access if line["path"] == "/nowhere"] == [TRACE_ID]
