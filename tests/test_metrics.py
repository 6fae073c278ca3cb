"""Metrics of the layers, in process (thallus.metrics): what ``protect(..., metrics=)`` counts, with
which labels, how snapshots add up, and who :class:`MetricsEndpoint` lets read them.

Every figure is checked exactly, read back through prometheus-client's own parser of the text
exposition. The reference service's families and ``/metrics`` under several workers are
tests/test_metrics_served.py's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from tests.asgi import Response, acall, http_scope
from thallus import Settings, protect
from thallus.audit import AuditEvent
from thallus.csrf import REJECT_NO_EVIDENCE, REJECT_UNTRUSTED_ORIGIN
from thallus.metrics import (
    DEFAULT_BUCKETS,
    Metrics,
    MetricsEndpoint,
    merge,
    render_snapshot,
)
from thallus.stack import protection

SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"
EVIL = "https://evil.example"
TOKEN = "t" * 40
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "production",
        "allowed_origins": SPA,
        "public_origin": PUBLIC,
        "rate_limit_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"]})


async def user(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["user_id"]})


async def create(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({}, status_code=201)


async def fail(request: Request) -> JSONResponse:
    raise RuntimeError("kaboom")


async def moved(request: Request) -> PlainTextResponse:
    return PlainTextResponse("", status_code=302, headers={"location": "/items/1"})


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/items", create, methods=["POST"]),
            Route("/fail", fail),
            Route("/moved", moved),
            Mount("/admin", routes=[Route("/users/{user_id}", user)]),
        ]
    )


def protected(**settings: Any) -> tuple[Starlette, Metrics]:
    metrics = Metrics()
    app = protect(make_app(), production(**settings), metrics=metrics)
    return app, metrics


def request(
    app: Any, method: str = "GET", path: str = "/", headers: Any = (), body: bytes = b"", **scope: Any
) -> Response:
    chunks = scope.pop("chunks", ())
    client = scope.pop("client", None)
    built = http_scope(method, path, headers, scheme="https", **scope)
    if client is not None:
        built["client"] = client
    return asyncio.run(acall(app, built, body, chunks=chunks))


def stalled_request(app: Any) -> Response:
    """A POST whose body stops after its first byte (the client holds the connection open)."""

    async def run() -> Response:
        sent: list[Any] = []
        inbound = [{"type": "http.request", "body": b"x", "more_body": True}]

        async def receive() -> Any:
            if inbound:
                return inbound.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        await app(http_scope("POST", "/items", [("content-length", "5")], scheme="https"), receive, send)
        start = next(message for message in sent if message["type"] == "http.response.start")
        return Response(start["status"], start["headers"], b"", sent)

    return asyncio.run(run())


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def samples(exposition: bytes) -> Samples:
    """Every sample of a text exposition: (name, labels) → value."""
    found: Samples = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def of(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def requests_of(found: Samples) -> dict[tuple[str, str, str], float]:
    """``thallus_http_requests_total`` as (method, route, status_class) → count."""
    table = {}
    for (name, labels), value in found.items():
        if name == "thallus_http_requests_total":
            label = dict(labels)
            table[(label["method"], label["route"], label["status_class"])] = value
    return table


def refusals_of(found: Samples) -> dict[tuple[str, str], float]:
    table = {}
    for (name, labels), value in found.items():
        if name == "thallus_refusals_total":
            label = dict(labels)
            table[(label["layer"], label["reason"])] = value
    return table


# -- requests, durations, labels ---------------------------------------------------------------


def test_requests_are_counted_by_method_route_template_and_status_class() -> None:
    app, metrics = protected()
    for number in range(3):
        assert request(app, "GET", f"/items/{number}").status == 200
    assert request(app, "GET", "/nowhere").status == 404
    assert request(app, "GET", "/also/nowhere").status == 404
    assert request(app, "DELETE", "/items").status == 405  # a partial match: the route is known
    assert request(app, "BREW", "/items/1").status == 405
    assert request(app, "get", "/items/1").status == 405  # methods are case-sensitive: not "GET"
    assert request(app, "GET", "/fail").status == 500
    assert request(app, "GET", "/moved").status == 302
    assert request(app, "GET", "/admin/users/7").status == 200
    preflight = [("origin", SPA), ("access-control-request-method", "POST")]
    assert request(app, "OPTIONS", "/items", preflight).status == 204
    assert (
        request(app, "OPTIONS", "/items", [("origin", EVIL), ("access-control-request-method", "POST")]).status == 403
    )
    assert requests_of(samples(metrics.render())) == {
        ("GET", "/items/{item_id}", "2xx"): 3,
        ("GET", "<unmatched>", "4xx"): 2,
        ("DELETE", "/items", "4xx"): 1,
        ("OTHER", "/items/{item_id}", "4xx"): 2,
        ("GET", "/fail", "5xx"): 1,
        ("GET", "/moved", "3xx"): 1,
        ("GET", "/users/{user_id}", "2xx"): 1,  # a mounted app's own routes: without the mount's prefix
        ("OPTIONS", "<preflight>", "2xx"): 1,
        ("OPTIONS", "<preflight>", "4xx"): 1,
    }


def test_label_values_stay_bounded_whatever_the_clients_send() -> None:
    app, metrics = protected()
    for number in range(200):
        request(app, "GET", f"/items/{number}")
        request(app, "GET", f"/random/{number}")
        request(app, f"X-METHOD-{number}", "/nowhere")
    assert requests_of(samples(metrics.render())) == {
        ("GET", "/items/{item_id}", "2xx"): 200,
        ("GET", "<unmatched>", "4xx"): 200,
        ("OTHER", "<unmatched>", "4xx"): 200,
    }
    assert len(metrics.cells) == 3  # one cell per label set (and status code) however many requests


def test_the_histogram_places_each_duration_in_its_bucket_and_sums_them() -> None:
    metrics = Metrics(buckets=(0.01, 0.1, 1.0))
    scope = {"route": Route("/items", create)}
    for seconds in (0.005, 0.01, 0.05, 0.5, 5.0):
        metrics.observe("GET", scope, 200, seconds)
    found = samples(metrics.render())
    labels = {"method": "GET", "route": "/items", "status_class": "2xx"}
    buckets = {
        le: of(found, "thallus_http_request_duration_seconds_bucket", **labels, le=le)
        for le in ("0.01", "0.1", "1.0", "+Inf")
    }
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}  # upper bounds inclusive, cumulative
    assert of(found, "thallus_http_request_duration_seconds_count", **labels) == 5
    assert of(found, "thallus_http_request_duration_seconds_sum", **labels) == pytest.approx(5.565)
    assert of(found, "thallus_http_requests_total", **labels) == 5


def test_durations_are_measured_for_every_request() -> None:
    app, metrics = protected()
    request(app, "GET", "/items/1")
    found = samples(metrics.render())
    labels = {"method": "GET", "route": "/items/{item_id}", "status_class": "2xx"}
    assert of(found, "thallus_http_request_duration_seconds_count", **labels) == 1
    assert 0 < (of(found, "thallus_http_request_duration_seconds_sum", **labels) or 0) < 60
    assert of(found, "thallus_http_request_duration_seconds_bucket", **labels, le="+Inf") == 1
    assert [str(bound) for bound in DEFAULT_BUCKETS][:3] == ["0.001", "0.0025", "0.005"]


def test_a_request_without_a_response_has_the_status_class_none() -> None:
    metrics = Metrics()
    metrics.observe("GET", {}, 0, 0.1)
    assert requests_of(samples(metrics.render())) == {("GET", "<unmatched>", "none"): 1}


def test_several_apps_count_apart() -> None:
    first, first_metrics = protected()
    second, second_metrics = protected()
    request(first, "GET", "/items/1")
    request(first, "GET", "/items/2")
    request(second, "GET", "/items/3")
    assert requests_of(samples(first_metrics.render())) == {("GET", "/items/{item_id}", "2xx"): 2}
    assert requests_of(samples(second_metrics.render())) == {("GET", "/items/{item_id}", "2xx"): 1}


def test_without_metrics_nothing_changes() -> None:
    app = protect(make_app(), production())
    assert protection(app).metrics is None
    assert request(app, "GET", "/items/1").status == 200


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate_limited", [False, True], ids=["fast path", "body limit as a layer"])
def test_refusals_are_counted_by_layer_and_reason(rate_limited: bool) -> None:
    app, metrics = protected(
        rate_limit_enabled=rate_limited, rate_limit="1000/minute", max_body_bytes=10, body_timeout=0.05
    )
    cookie = ("cookie", "session=1")
    assert request(app, "POST", "/items", [cookie, ("origin", EVIL)]).status == 403
    assert request(app, "POST", "/items", [cookie, ("origin", EVIL)]).status == 403
    assert request(app, "POST", "/items", [cookie]).status == 403  # production: no evidence
    preflight = [("origin", SPA), ("access-control-request-method", "POST")]
    assert (
        request(app, "OPTIONS", "/items", [("origin", EVIL), ("access-control-request-method", "POST")]).status == 403
    )
    assert request(app, "OPTIONS", "/items", [("origin", SPA), ("access-control-request-method", "BREW")]).status == 403
    assert request(app, "OPTIONS", "/items", [*preflight, ("access-control-request-headers", "x-secret")]).status == 403
    assert request(app, "POST", "/items", [("content-length", "100")], b"x" * 100).status == 413
    streamed = request(app, "POST", "/items", [("transfer-encoding", "chunked")], chunks=[b"x" * 8, b"x" * 8])
    assert streamed.status == 413
    paused = request(app, "POST", "/items", [("transfer-encoding", "chunked")], chunks=[b"x", b"x"])
    assert paused.status == 201  # all arrived: no refusal
    assert stalled_request(app).status == 408
    found = samples(metrics.render())
    assert refusals_of(found) == {
        ("csrf", REJECT_UNTRUSTED_ORIGIN): 2,
        ("csrf", REJECT_NO_EVIDENCE): 1,
        ("cors", "origin"): 1,
        ("cors", "method"): 1,
        ("cors", "headers"): 1,
        ("body_limit", "too_large"): 2,
        ("body_limit", "timeout"): 1,
    }


def test_rate_limit_refusals_are_counted_by_policy() -> None:
    app, metrics = protected(rate_limit_enabled=True, rate_limit="2/minute", rate_limit_auth="1/minute")
    statuses = [request(app, "GET", "/items/1").status for _ in range(4)]
    statuses += [
        request(app, "POST", "/api/v1/auth/login", [("content-type", "application/json")]).status for _ in range(3)
    ]
    assert statuses == [200, 200, 429, 429, 404, 429, 429]
    assert refusals_of(samples(metrics.render())) == {("rate_limit", "general"): 2, ("rate_limit", "auth"): 2}


def test_the_layers_events_still_reach_the_audit_sink_and_the_request_record_stays_opt_in() -> None:
    events: list[AuditEvent] = []

    class Recording:
        def record(self, event: AuditEvent) -> None:
            events.append(event)

    metrics = Metrics()
    audited = protect(make_app(), production(), audit=Recording(), metrics=metrics)
    request(audited, "POST", "/items", [("cookie", "s=1"), ("origin", EVIL)])
    assert [event.action for event in events] == ["csrf_rejected", "request"]
    unaudited = protect(make_app(), production(), metrics=Metrics())
    assert protection(unaudited).request_audit is None  # metrics alone add no request record


def test_unknown_refusal_reasons_become_other() -> None:
    metrics = Metrics()
    sink = metrics.audit_sink()
    sink.record(AuditEvent(action="csrf_rejected", outcome="denied", details={"reason": "made up by a layer"}))
    sink.record(AuditEvent(action="rate_limited", outcome="denied", details={"policy": "x" * 500}))
    sink.record(AuditEvent(action="login", outcome="success"))  # not a refusal
    sink.record(AuditEvent(action="cors_rejected", outcome="denied", details=None))
    assert refusals_of(samples(metrics.render())) == {
        ("csrf", "other"): 1,
        ("rate_limit", "other"): 1,
        ("cors", "origin"): 1,
    }


# -- snapshots --------------------------------------------------------------------------------------


def test_snapshots_are_json_and_merge_into_sums() -> None:
    first, second = Metrics(), Metrics()
    route = {"route": Route("/items", create)}
    first.observe("GET", route, 200, 0.002)
    second.observe("GET", route, 201, 0.2)
    second.observe("POST", route, 500, 0.02)
    first.refused("csrf", REJECT_NO_EVIDENCE)
    second.refused("csrf", REJECT_NO_EVIDENCE)
    for metrics, depth, seq in ((first, 3.0, 10.0), (second, 4.0, 12.0)):
        metrics.gauge("queue_depth", "d", constant(depth))
        metrics.gauge("head_seq", "s", constant(seq), merge="max")
        metrics.counter("things_total", "t", lambda: {("a",): 1.0, ("b",): 2.0}, ("kind",))
    snapshots = [json.loads(json.dumps(metrics.snapshot())) for metrics in (first, second)]
    found = samples(render_snapshot(merge(snapshots)))
    get = {"method": "GET", "route": "/items", "status_class": "2xx"}
    assert of(found, "thallus_http_requests_total", **get) == 2
    assert of(found, "thallus_http_request_duration_seconds_bucket", **get, le="0.0025") == 1
    assert of(found, "thallus_http_request_duration_seconds_bucket", **get, le="0.25") == 2
    assert of(found, "thallus_http_request_duration_seconds_sum", **get) == pytest.approx(0.202)
    assert of(found, "thallus_http_requests_total", method="POST", route="/items", status_class="5xx") == 1
    assert refusals_of(found) == {("csrf", REJECT_NO_EVIDENCE): 2}
    assert of(found, "queue_depth") == 7  # summed
    assert of(found, "head_seq") == 12  # the largest
    assert of(found, "things_total", kind="a") == 2 and of(found, "things_total", kind="b") == 4


def test_a_family_of_another_type_or_other_buckets_is_left_out_of_the_sum() -> None:
    usual, odd = Metrics(), Metrics(buckets=(1.0,))
    usual.counter("x_total", "x", lambda: 1.0)
    odd.gauge("x_total", "x", lambda: 5.0)
    usual.observe("GET", {}, 200, 0.5)
    odd.observe("GET", {}, 200, 0.5)
    found = samples(render_snapshot(merge([usual.snapshot(), odd.snapshot()])))
    assert of(found, "x_total") == 1
    assert (
        of(found, "thallus_http_request_duration_seconds_count", method="GET", route="<unmatched>", status_class="2xx")
        == 1
    )
    assert of(found, "thallus_http_requests_total", method="GET", route="<unmatched>", status_class="2xx") == 2


def test_families_of_ones_own_are_checked() -> None:
    metrics = Metrics()
    metrics.counter("mine_total", "m", lambda: 1.0)
    with pytest.raises(ValueError, match="already"):
        metrics.gauge("mine_total", "m", lambda: 1.0)
    with pytest.raises(ValueError, match="already"):
        metrics.counter("thallus_http_requests_total", "m", lambda: 1.0)
    with pytest.raises(ValueError, match="buckets"):
        Metrics(buckets=(1.0, 0.5))


def test_the_collector_registers_with_a_registry_of_ones_own() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = Metrics()
    metrics.refused("csrf", REJECT_NO_EVIDENCE)
    registry = CollectorRegistry()
    registry.register(metrics.collector())
    metrics.refused("csrf", REJECT_NO_EVIDENCE)  # read at each collection
    assert refusals_of(samples(generate_latest(registry))) == {("csrf", REJECT_NO_EVIDENCE): 2}


def test_metrics_need_prometheus_client_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r'pip install "thallus\[metrics\]"'):
        Metrics()


def test_an_app_without_protect_can_be_counted_with_observed() -> None:
    metrics = Metrics()
    counted = metrics.observed(make_app())
    request(counted, "GET", "/items/5")
    request(metrics.observed(make_app(), "/fixed"), "GET", "/items/5")
    assert requests_of(samples(metrics.render())) == {
        ("GET", "/items/{item_id}", "2xx"): 1,
        ("GET", "/fixed", "2xx"): 1,
    }


# -- the endpoint -------------------------------------------------------------------------------------


@pytest.fixture
def endpoint_metrics() -> Metrics:
    metrics = Metrics()
    metrics.refused("csrf", REJECT_NO_EVIDENCE)
    return metrics


def read(
    app: Any, headers: Any = (), *, client: tuple[str, int] = ("127.0.0.1", 50000), method: str = "GET"
) -> Response:
    return request(app, method, "/metrics", headers, client=client)


def test_asgi_app_serves_the_exposition_as_a_route_of_a_protected_app(endpoint_metrics: Metrics) -> None:
    app = make_app()
    app.router.routes.append(Route("/metrics", endpoint_metrics.asgi_app))
    protect(app, production(), metrics=endpoint_metrics)
    response = read(app, client=("203.0.113.9", 1))  # open: anyone who reaches it
    assert response.status == 200
    assert response.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    assert response.header("cache-control") == "no-store"
    assert response.header("x-content-type-options") == "nosniff"  # the layers' headers, as on any answer
    assert refusals_of(samples(response.body)) == {("csrf", REJECT_NO_EVIDENCE): 1}
    assert requests_of(samples(read(app).body)) == {("GET", "/metrics", "2xx"): 1}  # the first scrape
    head = read(app, method="HEAD")
    assert (head.status, head.body) == (200, b"") and int(head.header("content-length") or 0) > 0
    refused = read(app, method="POST")
    assert (refused.status, refused.json()["error"], refused.header("allow")) == (
        405,
        "MethodNotAllowedError",
        "GET, HEAD",
    )


@pytest.mark.parametrize(
    ("peer", "headers", "status"),
    [
        ("127.0.0.1", [], 200),
        ("127.10.20.30", [], 200),
        ("::1", [], 200),
        ("::ffff:127.0.0.1", [], 200),
        ("127.0.0.1", [("x-forwarded-for", "203.0.113.9")], 200),  # the TCP peer decides
        ("127.0.0.1", [("forwarded", "for=203.0.113.9")], 200),
        ("203.0.113.9", [], 403),
        ("203.0.113.9", [("x-forwarded-for", "127.0.0.1")], 403),  # a header never grants access
        ("192.168.1.5", [("forwarded", "for=127.0.0.1")], 403),
        ("::ffff:10.0.0.1", [], 403),
        ("not-an-address", [], 403),
    ],
)
def test_loopback_access_is_decided_by_the_tcp_peer(
    endpoint_metrics: Metrics, peer: str, headers: list[tuple[str, str]], status: int
) -> None:
    app = protect(MetricsEndpoint(endpoint_metrics.render, access="loopback"), production())
    response = read(app, headers, client=(peer, 40000))
    assert response.status == status
    if status == 403:
        body = response.json()
        assert (body["error"], body["message"]) == (
            "PermissionDeniedError",
            "The metrics are readable from this host only.",
        )
        assert body["correlation_id"] == response.header("x-correlation-id")


def test_loopback_access_refuses_what_a_trusted_proxy_on_this_host_forwards(endpoint_metrics: Metrics) -> None:
    """A proxy on this host (nginx on 127.0.0.1) forwards everyone's requests from loopback: listed
    in the trusted proxies, a request it forwarded (it carries the proxy's header) is refused."""
    from thallus.ratelimit import parse_networks

    endpoint = MetricsEndpoint(
        endpoint_metrics.render, access="loopback", trusted_proxies=parse_networks(["127.0.0.1"])
    )
    app = protect(endpoint, production())
    forwarded = read(app, [("x-forwarded-for", "203.0.113.9")])
    assert (forwarded.status, forwarded.json()["message"]) == (403, "The metrics are not readable through a proxy.")
    assert read(app).status == 200  # a scraper on this host, not through the proxy
    assert read(app, [("forwarded", "for=203.0.113.9")]).status == 200  # not the configured header
    assert read(app, [("x-forwarded-for", "203.0.113.9")], client=("127.0.0.2", 1)).status == 200  # not the proxy


def test_token_access(endpoint_metrics: Metrics) -> None:
    app = protect(MetricsEndpoint(endpoint_metrics.render, access="token", token=TOKEN), production())
    missing = read(app, client=("203.0.113.9", 1))
    assert (missing.status, missing.json()["error"]) == (401, "AuthenticationError")
    assert missing.header("www-authenticate") == 'Bearer realm="metrics"'
    for wrong in (f"Bearer {TOKEN[:-1]}x", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
        refused = read(app, [("authorization", wrong)])
        assert (refused.status, refused.json()["error"]) == (403, "PermissionDeniedError"), wrong
    twice = read(app, [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")])
    assert twice.status == 403
    allowed = read(app, [("authorization", f"bearer {TOKEN}")], client=("203.0.113.9", 1))
    assert allowed.status == 200 and refusals_of(samples(allowed.body)) == {("csrf", REJECT_NO_EVIDENCE): 1}


def test_token_access_needs_a_long_token(endpoint_metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        MetricsEndpoint(endpoint_metrics.render, access="token", token="short")
    with pytest.raises(ValueError, match="at least 32"):
        MetricsEndpoint(endpoint_metrics.render, access="token")


def test_a_websocket_to_the_endpoint_is_closed(endpoint_metrics: Metrics) -> None:
    from tests.asgi import websocket_handshake, websocket_scope

    sent = websocket_handshake(MetricsEndpoint(endpoint_metrics.render), websocket_scope("/metrics"))
    assert sent == [{"type": "websocket.close", "code": 1008}]
