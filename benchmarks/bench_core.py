"""Per-request cost of ``thallus.protect`` against a bare Starlette app and a stack of peer libraries.

The ASGI applications are called directly, in process, on one asyncio event loop: hand-built
``scope``, a ``receive`` that hands over the request body, a ``send`` that drops every message. No
sockets, no server, no test client, so what is measured is the application and its layers alone.

Three stacks, built on three separate but identical Starlette applications (``protect`` installs
error handlers on the application it wraps, so the bare one must not be shared):

* ``bare``    — Starlette with ``GET /items`` and ``POST /items``;
* ``thallus`` — the same app wrapped by ``thallus.protect`` with production settings: the core
  layers (correlation, headers, CORS, error boundary, CSRF); the rate limiter is measured by
  ``bench_ratelimit.py``;
* ``peer``    — the same app wrapped, outermost first, by asgi-correlation-id, secure.py, Starlette's
  ``CORSMiddleware`` and starlette-csrf, configured to match Thallus as closely as they allow.

Seven scenarios, each one fixed request sent unchanged to every stack (see ``SCENARIOS``). Then
two more tables: each Thallus layer alone on the bare app, and how the cost grows with the number
of allowed origins and of request headers. Run ``.venv/bin/python benchmarks/bench_core.py --help``
for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import statistics
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from asgi_correlation_id import CorrelationIdMiddleware as PeerCorrelationIdMiddleware
from itsdangerous.url_safe import URLSafeSerializer
from secure import (
    ContentSecurityPolicy,
    CrossOriginOpenerPolicy,
    CrossOriginResourcePolicy,
    CustomHeader,
    PermissionsPolicy,
    ReferrerPolicy,
    Secure,
    Server,
    StrictTransportSecurity,
    XContentTypeOptions,
    XFrameOptions,
    XPermittedCrossDomainPolicies,
)
from secure.middleware import SecureASGIMiddleware
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette_csrf.middleware import CSRFMiddleware as StarletteCSRFMiddleware

# src/thallus has no py.typed marker: checked on its own, this file sees thallus as untyped (the
# project-wide `mypy` run reads it from src/ and needs no ignore, hence `unused-ignore`).
from common import describe, environment, progress, text_table
from thallus import HeaderPolicy, Settings, protect
from thallus.correlation import CorrelationIdMiddleware, accept_or_mint, correlation_id_var, uuid7
from thallus.cors import ALLOWED_HEADERS, ALLOWED_METHODS, EXPOSED_HEADERS, CORSMiddleware, decorate
from thallus.csrf import CSRFMiddleware
from thallus.errors import ErrorBoundaryMiddleware
from thallus.headers import SecurityHeadersMiddleware
from thallus.metrics import Metrics
from thallus.stack import protection

SECRET = "x" * 40
APP_ORIGIN = "https://app.example.com"
REFUSED_ORIGIN = "https://evil.example"
PUBLIC_ORIGIN = "https://api.example.com"
SESSION_COOKIE = "session"
PEER_CSRF_COOKIE = "csrftoken"
PEER_CSRF_HEADER = "x-csrftoken"

STACKS = ("bare", "thallus", "peer")
#: Requests timed between two clock reads; the same for every stack, so the per-request share of
#: the clock read and loop is identical (and below a nanosecond).
BATCH = 100
PACKAGES = ("thallus", "starlette", "secure", "asgi-correlation-id", "starlette-csrf", "itsdangerous", "pydantic")


# -- the application ---------------------------------------------------------------------------

ITEMS = {"items": [{"id": 1, "name": "widget", "price": 9.5}, {"id": 2, "name": "gadget", "price": 12.0}]}


async def list_items(request: Request) -> JSONResponse:
    return JSONResponse(ITEMS)


async def create_item(request: Request) -> JSONResponse:
    payload = await request.json()
    return JSONResponse({"id": 3, **payload}, status_code=201)


def make_app() -> Starlette:
    """A fresh Starlette app; each stack gets its own so no stack changes another's app."""
    return Starlette(
        routes=[Route("/items", list_items, methods=["GET"]), Route("/items", create_item, methods=["POST"])]
    )


# -- the stacks --------------------------------------------------------------------------------


def thallus_settings(origins: Sequence[str] = (APP_ORIGIN,)) -> Settings:
    """Production settings; the rate limiter off (``bench_ratelimit.py`` measures it)."""
    return Settings(
        env="production",
        allowed_origins=tuple(origins),
        public_origin=PUBLIC_ORIGIN,
        rate_limit_enabled=False,
    )


def build_thallus() -> ASGIApp:
    app: ASGIApp = protect(make_app(), thallus_settings())
    return app


def build_thallus_with_metrics() -> ASGIApp:
    """``build_thallus`` counting every request (thallus.metrics): table 5."""
    app: ASGIApp = protect(make_app(), thallus_settings(), metrics=Metrics())
    return app


def many_origins(count: int) -> list[str]:
    """``count`` allowed origins with the SPA's in the middle, so no lookup finds it first."""
    origins = [f"https://tenant-{index}.example.org" for index in range(count - 1)]
    origins.insert(len(origins) // 2, APP_ORIGIN)
    return origins


#: Each Thallus layer alone on the bare app, then the layers composed, then ``protect`` (fast path).
LAYERS: dict[str, Callable[[], ASGIApp]] = {
    "correlation": lambda: CorrelationIdMiddleware(make_app()),
    "headers": lambda: SecurityHeadersMiddleware(make_app(), HeaderPolicy.from_settings(thallus_settings())),
    "cors": lambda: CORSMiddleware(make_app(), (APP_ORIGIN,)),
    "csrf": lambda: CSRFMiddleware(make_app(), (APP_ORIGIN, PUBLIC_ORIGIN), environment="production"),
    "errors": lambda: ErrorBoundaryMiddleware(make_app()),
    "composed": lambda: protection(protect(make_app(), thallus_settings())).composed,
    "thallus": build_thallus,
}


def peer_secure() -> Secure:
    """secure.py configured for the header set Thallus sends on a 2xx in production.

    Same values, header for header. Thallus removes ``Server``; secure.py can only overwrite it,
    so it is set to an empty value (secure.py's own presets do the same).
    """
    rendered = dict(HeaderPolicy.from_settings(thallus_settings()).headers)
    return Secure(
        xcto=XContentTypeOptions().nosniff(),
        xfo=XFrameOptions().deny(),
        referrer=ReferrerPolicy().strict_origin_when_cross_origin(),
        hsts=StrictTransportSecurity().max_age(31536000),
        permissions=PermissionsPolicy().value(rendered[b"permissions-policy"].decode()),
        csp=(
            ContentSecurityPolicy()
            .default_src("'self'")
            .object_src("'none'")
            .base_uri("'self'")
            .frame_ancestors("'none'")
            .form_action("'self'")
        ),
        coop=CrossOriginOpenerPolicy().same_origin(),
        corp=CrossOriginResourcePolicy().same_site(),
        xpcdp=XPermittedCrossDomainPolicies().none(),
        server=Server().set(""),
        custom=[CustomHeader("X-XSS-Protection", "1; mode=block")],
    )


def build_peer() -> ASGIApp:
    """The peer stack in Thallus's order: correlation → headers → CORS → CSRF → app.

    Starlette's own ``ServerErrorMiddleware`` plays the error boundary, as in the bare app.
    """
    app: ASGIApp = StarletteCSRFMiddleware(make_app(), secret=SECRET, sensitive_cookies={SESSION_COOKIE})
    app = StarletteCORSMiddleware(
        app,
        allow_origins=[APP_ORIGIN],
        allow_credentials=True,
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=600,
    )
    # secure.py types scope and messages as `object`, narrower than Starlette's ASGIApp accepts
    app = cast(ASGIApp, SecureASGIMiddleware(app, secure=peer_secure()))
    return PeerCorrelationIdMiddleware(app, header_name="X-Correlation-ID")


BUILDERS: dict[str, Callable[[], ASGIApp]] = {"bare": make_app, "thallus": build_thallus, "peer": build_peer}


# -- the requests ------------------------------------------------------------------------------

#: starlette-csrf's double-submit token: signed the way the middleware signs it, sent as its cookie
#: and echoed in its header. Thallus ignores both.
PEER_CSRF_TOKEN: str = URLSafeSerializer(SECRET, "csrftoken").dumps("benchmark-token")
COOKIES = f"{SESSION_COOKIE}=3q2-7w; {PEER_CSRF_COOKIE}={PEER_CSRF_TOKEN}".encode()

BROWSER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"host", b"api.example.com"),
    (b"connection", b"keep-alive"),
    (
        b"user-agent",
        b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    ),
    (b"accept", b"application/json, text/plain, */*"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-GB,en;q=0.9"),
)
CROSS_ORIGIN_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"origin", APP_ORIGIN.encode()),
    (b"referer", APP_ORIGIN.encode() + b"/"),
    (b"sec-fetch-site", b"same-site"),
    (b"sec-fetch-mode", b"cors"),
    (b"sec-fetch-dest", b"empty"),
)
BODY = b'{"name":"sprocket","price":3.25}'


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    method: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    #: expected status per stack, checked once before timing (layers alone: the bare app's)
    expected: dict[str, int] = field(default_factory=dict)
    path: str = "/items"
    #: whether Thallus and the peer must answer with Access-Control-Allow-Origin
    cors: bool = False

    def status_for(self, stack: str) -> int:
        return self.expected.get(stack, self.expected["thallus" if stack.startswith("thallus") else "bare"])

    def with_extra_headers(self, count: int) -> Scenario:
        """The same request with ``count`` more (unread) headers, e.g. tracing and proxy headers."""
        extra = tuple((f"x-extra-header-{index}".encode(), b"value-%d" % index) for index in range(count))
        return replace(self, name=f"{self.name}+{count}h", headers=(*self.headers, *extra))

    def template(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 51234),
            "scheme": "https",
            "method": self.method,
            "root_path": "",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": list(self.headers),
        }


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "get",
        "GET /items, no Origin, no cookie (API client or same-origin fetch)",
        "GET",
        BROWSER_HEADERS,
        expected={"bare": 200, "thallus": 200, "peer": 200},
    ),
    Scenario(
        "get_cors",
        "GET /items from the allowed Origin, credentialed (cookies), CORS-decorated",
        "GET",
        (*BROWSER_HEADERS, *CROSS_ORIGIN_HEADERS, (b"cookie", COOKIES)),
        expected={"bare": 200, "thallus": 200, "peer": 200},
        cors=True,
    ),
    Scenario(
        "get_refused",
        "GET /items from an origin not allowed, credentialed: answered, but without CORS headers",
        "GET",
        (
            *BROWSER_HEADERS,
            (b"origin", REFUSED_ORIGIN.encode()),
            (b"referer", REFUSED_ORIGIN.encode() + b"/"),
            (b"sec-fetch-site", b"cross-site"),
            (b"sec-fetch-mode", b"cors"),
            (b"sec-fetch-dest", b"empty"),
            (b"cookie", COOKIES),
        ),
        expected={"bare": 200, "thallus": 200, "peer": 200},
    ),
    Scenario(
        "preflight",
        "OPTIONS /items preflight for POST + content-type from the allowed Origin",
        "OPTIONS",
        (
            *BROWSER_HEADERS[:3],
            (b"accept", b"*/*"),
            *BROWSER_HEADERS[4:],
            (b"origin", APP_ORIGIN.encode()),
            (b"access-control-request-method", b"POST"),
            (b"access-control-request-headers", b"content-type"),
            (b"sec-fetch-site", b"same-site"),
            (b"sec-fetch-mode", b"cors"),
            (b"sec-fetch-dest", b"empty"),
        ),
        # bare Starlette has no CORS: its router answers 405; Starlette's CORS answers 200
        expected={"bare": 405, "thallus": 204, "peer": 200},
        cors=True,
    ),
    Scenario(
        "post_csrf",
        "POST /items JSON, session cookie, trusted Origin: CSRF checked and passing",
        "POST",
        (
            *BROWSER_HEADERS,
            *CROSS_ORIGIN_HEADERS,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"cookie", COOKIES),
            (PEER_CSRF_HEADER.encode(), PEER_CSRF_TOKEN.encode()),
        ),
        body=BODY,
        expected={"bare": 201, "thallus": 201, "peer": 201},
        cors=True,
    ),
    Scenario(
        "post_api_key",
        "POST /items JSON with X-API-Key, no cookie (a script): CSRF exempt, nothing to check",
        "POST",
        (
            (b"host", b"api.example.com"),
            (b"user-agent", b"python-httpx/0.28.1"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"connection", b"keep-alive"),
            (b"x-api-key", b"thal_" + b"k" * 43),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ),
        body=BODY,
        expected={"bare": 201, "thallus": 201, "peer": 201},
    ),
    Scenario(
        "not_found",
        "GET /nowhere: the router's 404 (JSON from Thallus, plain text from the others)",
        "GET",
        BROWSER_HEADERS,
        path="/nowhere",
        expected={"bare": 404, "thallus": 404, "peer": 404},
    ),
)
SCENARIO_NAMES = tuple(scenario.name for scenario in SCENARIOS)


# -- the harness -------------------------------------------------------------------------------


class ReplayedRequest:
    """One scenario's request, replayable: a fresh scope per call and a constant receive/send.

    The same object drives every stack, so the harness's own work is identical for all of them.
    """

    def __init__(self, scenario: Scenario) -> None:
        self._template = scenario.template()
        self._headers: list[tuple[bytes, bytes]] = list(scenario.headers)
        self._body = scenario.body

    def scope(self) -> Scope:
        scope = self._template.copy()
        scope["headers"] = self._headers.copy()  # layers may rewrite the list in place
        scope["state"] = {}  # as uvicorn gives every request a copy of the lifespan state
        return scope

    async def receive(self) -> Message:
        return {"type": "http.request", "body": self._body, "more_body": False}

    @staticmethod
    async def send(message: Message) -> None:
        return None


async def _null_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The floor: an ASGI app that answers without looking at anything."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _timed_run(app: ASGIApp, request: ReplayedRequest, seconds: float) -> tuple[int, int]:
    """Call ``app`` in batches until ``seconds`` of this thread's CPU time have passed; return
    (requests, nanoseconds). CPU time, not wall time: on a shared machine, time the benchmark spends
    descheduled is not its own (every request is pure CPU work on this thread)."""
    receive, send, make_scope = request.receive, request.send, request.scope
    clock = time.thread_time_ns
    count = 0
    start = clock()
    deadline = start + int(seconds * 1e9)
    while True:
        for _ in range(BATCH):
            await app(make_scope(), receive, send)
        count += BATCH
        now = clock()
        if now >= deadline:
            return count, now - start


@dataclass
class Cell:
    """One stack × scenario: nanoseconds per request of each repetition."""

    runs_ns: list[float] = field(default_factory=list)
    requests: int = 0

    @property
    def median_us(self) -> float:
        return statistics.median(self.runs_ns) / 1000

    @property
    def best_us(self) -> float:
        """The fastest repetition: on a shared machine other work only ever adds time (timeit's rule)."""
        return min(self.runs_ns) / 1000

    @property
    def spread(self) -> float:
        """(max − min) / median of the repetitions."""
        return (max(self.runs_ns) - min(self.runs_ns)) / statistics.median(self.runs_ns)


async def _check(stacks: dict[str, ASGIApp], scenarios: Sequence[Scenario]) -> None:
    """Send each request once and check every stack answers as configured; a misconfigured peer
    (a CSRF 403, a CORS 400) would otherwise be timed as a fast refusal."""
    problems: list[str] = []
    for scenario in scenarios:
        request = ReplayedRequest(scenario)
        for stack_name, app in stacks.items():
            messages: list[Message] = []

            async def collect(message: Message, messages: list[Message] = messages) -> None:
                messages.append(message)

            await app(request.scope(), request.receive, collect)
            start = messages[0] if messages else {}
            status = start.get("status")
            headers = {name.lower() for name, _ in start.get("headers", ())}
            expected = scenario.status_for(stack_name)
            if status != expected:
                problems.append(f"{stack_name}/{scenario.name}: status {status}, expected {expected}")
            if stack_name not in ("thallus", "peer"):
                continue
            wanted = {b"x-correlation-id", b"content-security-policy", b"x-frame-options"}
            if scenario.cors:
                wanted.add(b"access-control-allow-origin")
            elif b"access-control-allow-origin" in headers:
                problems.append(f"{stack_name}/{scenario.name}: Access-Control-Allow-Origin on a refused origin")
            if missing := wanted - headers:
                problems.append(f"{stack_name}/{scenario.name}: missing {sorted(m.decode() for m in missing)}")
    if problems:
        raise SystemExit("benchmark requests are not answered as intended:\n  " + "\n  ".join(problems))


async def measure(
    stacks: dict[str, ASGIApp], scenarios: Sequence[Scenario], *, seconds: float, warmup: float, repeat: int
) -> dict[str, dict[str, Cell]]:
    """Every stack on every scenario, ``repeat`` times, interleaved in rotating order."""
    await _check(stacks, scenarios)
    requests = {scenario.name: ReplayedRequest(scenario) for scenario in scenarios}
    cells = {scenario.name: {stack: Cell() for stack in stacks} for scenario in scenarios}
    for scenario in scenarios:
        for app in stacks.values():
            await _timed_run(app, requests[scenario.name], warmup)
    order = list(stacks)
    for repetition in range(repeat):
        progress(f"  repetition {repetition + 1}/{repeat}")
        for scenario in scenarios:
            # rotate the order each repetition so no stack always runs first (or last)
            for stack_name in order[repetition % len(order) :] + order[: repetition % len(order)]:
                gc.collect()
                count, elapsed = await _timed_run(stacks[stack_name], requests[scenario.name], seconds)
                cell = cells[scenario.name][stack_name]
                cell.runs_ns.append(elapsed / count)
                cell.requests += count
    return cells


async def measure_floor(scenario: Scenario, *, seconds: float, repeat: int) -> Cell:
    """The harness's own cost: a null ASGI app driven the same way."""
    request = ReplayedRequest(scenario)
    floor = Cell()
    for _ in range(repeat):
        count, elapsed = await _timed_run(_null_app, request, seconds)
        floor.runs_ns.append(elapsed / count)
        floor.requests += count
    return floor


async def profile(app: ASGIApp, scenario: Scenario, seconds: float, top: int) -> str:
    request = ReplayedRequest(scenario)
    await _timed_run(app, request, 0.1)
    profiler = cProfile.Profile()
    profiler.enable()
    count, _ = await _timed_run(app, request, seconds)
    profiler.disable()
    out = io.StringIO()
    out.write(f"--- {scenario.name}: {count} requests under cProfile, top {top} by own time ---\n")
    pstats.Stats(profiler, stream=out).sort_stats(pstats.SortKey.TIME).print_stats(top)
    return out.getvalue()


# -- where the fast path's time goes -------------------------------------------------------------


def _pass_through(app: ASGIApp) -> ASGIApp:
    """The least a layer that sees the response start can cost: a frame and a send wrapper."""

    async def layer(scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = message["headers"]
            await send(message)

        await app(scope, receive, wrapped_send)

    return layer


async def breakdown(options: argparse.Namespace) -> list[dict[str, Any]]:
    """The steps of ``ProtectedApp``'s HTTP path for ``post_csrf``, each timed on its own with the
    real functions (timeit, best of ``--repeat``), and the plumbing floor of one ASGI layer."""
    protected = protection(protect(make_app(), thallus_settings()))
    csrf = protected.csrf
    assert csrf is not None, "with no limiter and no inner layer, protect() checks CSRF in its fast path"
    scenario = {s.name: s for s in SCENARIOS}["post_csrf"]
    request = ReplayedRequest(scenario)
    scope = request.scope()
    read = {b"cookie", b"sec-fetch-site", b"origin", b"referer", b"x-correlation-id", b"access-control-request-method"}
    evidence: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        if name.lower() in read:
            evidence.setdefault(name.lower(), []).append(value)
    app_headers = [(b"content-length", b"35"), (b"content-type", b"application/json")]
    allowed = protected.cors.allowed_origin(APP_ORIGIN.encode())
    correlation_header = (b"x-correlation-id", uuid7().encode())

    def scan() -> None:  # ProtectedApp.__call__'s loop, which is inline there (a call would cost more)
        found: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            key = name.lower()
            if key in read:
                values = found.get(key)
                if values is None:
                    found[key] = [value]
                else:
                    values.append(value)

    def mint() -> None:
        accept_or_mint({"headers": scope["headers"], "state": {}}, ())

    def context() -> None:
        correlation_id_var.reset(correlation_id_var.set("x"))

    steps: dict[str, Callable[[], object]] = {
        f"read the {len(scope['headers'])} request headers (one pass)": scan,
        "mint the correlation ID (uuid7), bind it to the scope (+ a 2-key dict)": mint,
        "  of which uuid7()": uuid7,
        "set and reset the contextvar": context,
        "CSRF verdict (cookie, Origin, Sec-Fetch-Site, Referer)": lambda: csrf.verdict_from(
            "POST", evidence, scope["state"]
        ),
        "response headers: policy + CORS + correlation, one pass": lambda: protected._response_headers(
            app_headers, 201, scope, allowed, correlation_header
        ),
        "  of which HeaderPolicy.select": lambda: protected.policy.select(201, scope),
        "  of which cors.decorate (2 app headers)": lambda: decorate(
            app_headers, protected._plain_tails[allowed], protected._plain_drop
        ),
    }
    rows: list[dict[str, Any]] = []
    number = 20000
    for label, step in steps.items():
        best = min(timeit.repeat(step, number=number, repeat=max(options.repeat, 3)))
        rows.append({"step": label, "us": round(best / number * 1e6, 3)})
    floor_stacks: dict[str, ASGIApp] = {"bare": make_app(), "pass-through layer": _pass_through(make_app())}
    timing = {"seconds": options.seconds, "warmup": options.warmup, "repeat": options.repeat}
    cells = await measure(floor_stacks, [scenario], **timing)
    plumbing = cells[scenario.name]["pass-through layer"].best_us - cells[scenario.name]["bare"].best_us
    rows.append({"step": "one pure-ASGI layer with a send wrapper (frame, closure, 2 sends)", "us": round(plumbing, 3)})
    return rows


# -- what metrics add ----------------------------------------------------------------------------

#: prometheus-client's own metric objects, one update of a request count and a duration: the
#: alternative to thallus.metrics' plain tables (run in a fresh process: its multiprocess mode is
#: chosen when it is first imported).
PROMETHEUS_UPDATE = """
import os, sys, tempfile, timeit
if sys.argv[1] == "multiprocess":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from prometheus_client import CollectorRegistry, Counter, Histogram
registry = CollectorRegistry()
count = Counter("requests", "r", ["method", "route", "status_class"], registry=registry)
duration = Histogram("duration", "d", ["method", "route", "status_class"], registry=registry)
def by_labels():
    count.labels("GET", "/items", "2xx").inc()
    duration.labels("GET", "/items", "2xx").observe(0.0003)
child_count, child_duration = count.labels("GET", "/items", "2xx"), duration.labels("GET", "/items", "2xx")
def by_child():
    child_count.inc()
    child_duration.observe(0.0003)
for step in (by_labels, by_child):
    print(min(timeit.repeat(step, number=20000, repeat=int(sys.argv[2]))) / 20000 * 1e6)
"""


async def metrics_cost(options: argparse.Namespace, scenarios: Sequence[Scenario]) -> dict[str, Any]:
    """Table 5: ``protect`` with and without metrics on every scenario, and one update's cost in
    thallus.metrics against prometheus-client's own objects (plain and multiprocess mode)."""
    import subprocess
    import sys

    timing = {"seconds": options.seconds, "warmup": options.warmup, "repeat": options.repeat}
    stacks: dict[str, ASGIApp] = {"thallus": build_thallus(), "thallus+metrics": build_thallus_with_metrics()}
    cells = await measure(stacks, scenarios, **timing)
    rows = added_rows(cells, "thallus")
    for row in rows:
        cell = cells[row["scenario"]]
        pairs = zip(cell["thallus+metrics"].runs_ns, cell["thallus"].runs_ns, strict=True)
        row["added_runs_us"] = [round((with_ - without) / 1000, 3) for with_, without in pairs]
    metrics = Metrics()
    scope = {"route": Route("/items", list_items)}
    repeat = max(options.repeat, 3)
    updates = [
        {
            "step": "thallus.metrics: Metrics.observe (labels, histogram, count)",
            "us": round(
                min(timeit.repeat(lambda: metrics.observe("GET", scope, 200, 0.0003), number=20000, repeat=repeat))
                / 20000
                * 1e6,
                3,
            ),
        }
    ]
    for mode in ("plain", "multiprocess"):
        result = subprocess.run(
            [sys.executable, "-c", PROMETHEUS_UPDATE, mode, str(repeat)], capture_output=True, text=True, check=True
        )
        by_labels, by_child = (float(line) for line in result.stdout.split())
        updates.append(
            {
                "step": f"prometheus-client ({mode}): .labels(...).inc() + .labels(...).observe()",
                "us": round(by_labels, 3),
            }
        )
        updates.append(
            {"step": f"prometheus-client ({mode}): the same on children looked up once", "us": round(by_child, 3)}
        )
    return {"rows": rows, "updates": updates}


# -- reporting ---------------------------------------------------------------------------------


def _stack_cells(cells: dict[str, Cell], statuses: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        stack: {
            "best_us": round(cell.best_us, 3),
            "median_us": round(cell.median_us, 3),
            "runs_us": [round(ns / 1000, 3) for ns in cell.runs_ns],
            "spread": round(cell.spread, 4),
            "requests": cell.requests,
            **({"status": statuses[stack]} if statuses else {}),
        }
        for stack, cell in cells.items()
    }


def comparison_rows(cells: dict[str, dict[str, Cell]], scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    rows = []
    for scenario in scenarios:
        row: dict[str, Any] = {"scenario": scenario.name, "description": scenario.description}
        row |= _stack_cells(cells[scenario.name], {stack: scenario.status_for(stack) for stack in STACKS})
        bare, ours, peer = (cells[scenario.name][s].best_us for s in STACKS)
        row["thallus_over_bare"] = round(ours / bare, 3)
        row["thallus_over_peer"] = round(ours / peer, 3)
        row["thallus_added_us"] = round(ours - bare, 3)
        row["peer_added_us"] = round(peer - bare, 3)
        # how many times less the Thallus layers add than the peer layers (the "x faster" of issue 7)
        row["peer_added_over_thallus_added"] = round((peer - bare) / (ours - bare), 2) if ours > bare else None
        rows.append(row)
    return rows


def added_rows(cells: dict[str, dict[str, Cell]], baseline: str) -> list[dict[str, Any]]:
    """Each stack's fastest repetition and what it adds over ``baseline``'s (same scenario)."""
    rows = []
    for scenario_name, stacks in cells.items():
        base = stacks[baseline].best_us
        row: dict[str, Any] = {"scenario": scenario_name, **_stack_cells(stacks)}
        row["added_us"] = {stack: round(cell.best_us - base, 3) for stack, cell in stacks.items() if stack != baseline}
        rows.append(row)
    return rows


def render_table(document: dict[str, Any]) -> str:
    env = document["environment"]
    options = document["options"]
    lines = [
        *describe(env),
        f"{options['repeat']} repetitions x {options['seconds']} s of CPU time per stack and scenario "
        f"(warm-up {options['warmup']} s); µs per request of the fastest repetition; in-process ASGI calls, "
        f"one event loop; thallus access log {'ON' if options['access_log'] else 'off (logger below INFO)'}",
        f"harness floor (null ASGI app, same scope/receive/send): {document['harness_floor_us']:.2f} µs",
        "",
        "1. Thallus (protect, core layers) against the bare app and the peer stack",
        "",
    ]
    rows = []
    for row in document["results"]:
        spread = max(row[stack]["spread"] for stack in STACKS)
        times_less = row["peer_added_over_thallus_added"]
        rows.append(
            (
                row["scenario"],
                f"{row['bare']['best_us']:.2f}",
                f"{row['thallus']['best_us']:.2f}",
                f"{row['peer']['best_us']:.2f}",
                f"{row['thallus_over_bare']:.2f}x",
                f"{row['thallus_over_peer']:.2f}x",
                f"{row['thallus_added_us']:+.2f}",
                f"{row['peer_added_us']:+.2f}",
                f"{times_less:.1f}x" if times_less is not None else "-",
                f"{spread:.1%}",
            )
        )
    lines += text_table(
        (
            "scenario",
            "bare µs",
            "thallus µs",
            "peer µs",
            "thallus/bare",
            "thallus/peer",
            "+thallus µs",
            "+peer µs",
            "+peer/+thallus",
            "spread",
        ),
        rows,
    )
    lines += [
        "",
        "+thallus / +peer: µs added over bare by each stack's layers; +peer/+thallus: how many times less",
        "Thallus adds. spread: largest (max-min)/median of the repetitions among the three stacks.",
        "Preflight statuses: bare 405 (no CORS; the router refuses OPTIONS), thallus 204, peer 200.",
        "",
        *(f"{row['scenario']:<12} {row['description']}" for row in document["results"]),
    ]
    if document.get("layers"):
        layer_names = list(document["layers"][0]["added_us"])
        lines += ["", "2. Each Thallus layer alone on the bare app: µs added over bare", ""]
        lines += text_table(
            ("scenario", "bare µs", *layer_names),
            [
                (
                    row["scenario"],
                    f"{row['bare']['best_us']:.2f}",
                    *(f"{row['added_us'][n]:+.2f}" for n in layer_names),
                )
                for row in document["layers"]
            ],
        )
        lines += [
            "",
            "composed: the same layers as protect() as separate ASGI layers (its WebSocket path); thallus:",
            "protect()'s HTTP fast path through the same layer objects.",
        ]
    if document.get("scaling"):
        lines += ["", "3. How the cost grows: allowed origins, request headers (thallus µs; +µs over bare)", ""]
        scaling_rows = []
        for row in document["scaling"]:
            scaling_rows.append(
                (
                    row["case"],
                    row["scenario"],
                    f"{row['bare_us']:.2f}",
                    f"{row['thallus_us']:.2f}",
                    f"{row['thallus_us'] - row['bare_us']:+.2f}",
                )
            )
        lines += text_table(("case", "scenario", "bare µs", "thallus µs", "+thallus µs"), scaling_rows)
    if document.get("breakdown"):
        lines += ["", "4. Where the fast path's time goes (post_csrf; each step alone, best of the repetitions)", ""]
        lines += text_table(("step", "µs"), [(row["step"], f"{row['us']:.2f}") for row in document["breakdown"]])
    if document.get("metrics"):
        metrics = document["metrics"]
        lines += ["", "5. What metrics add: protect() with and without metrics=Metrics() (µs per request)", ""]
        lines += text_table(
            ("scenario", "thallus µs", "+metrics µs", "added µs", "added, each repetition", "spread"),
            [
                (
                    row["scenario"],
                    f"{row['thallus']['best_us']:.2f}",
                    f"{row['thallus+metrics']['best_us']:.2f}",
                    f"{row['added_us']['thallus+metrics']:+.2f}",
                    " ".join(f"{value:+.2f}" for value in row["added_runs_us"]),
                    f"{max(row['thallus']['spread'], row['thallus+metrics']['spread']):.1%}",
                )
                for row in metrics["rows"]
            ],
        )
        lines += [
            "",
            "added, each repetition: +metrics minus thallus in each repetition (the two run back to back).",
            "One update of the counts, each alone (timeit, best of the repetitions):",
            "",
        ]
        lines += text_table(("update", "µs"), [(row["step"], f"{row['us']:.3f}") for row in metrics["updates"]])
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------

LAYER_SCENARIOS = ("get", "get_cors", "post_csrf", "not_found")
ORIGIN_COUNTS = (1, 10, 1000)
EXTRA_HEADER_COUNTS = (0, 20, 60)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds of each timed run (default 1.0)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per stack and scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up per stack and scenario (default 0.3)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIO_NAMES), help=f"comma-separated subset of {', '.join(SCENARIO_NAMES)}"
    )
    parser.add_argument("--no-layers", action="store_true", help="skip table 2 (each layer alone)")
    parser.add_argument("--no-scaling", action="store_true", help="skip table 3 (origins and header counts)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip table 4 (the fast path's steps)")
    parser.add_argument("--no-metrics", action="store_true", help="skip table 5 (what metrics add)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="let thallus build its access-log record per request (INFO, to a NullHandler); off by default, "
        "as the peer stack writes none",
    )
    parser.add_argument(
        "--profile", choices=STACKS, help="instead of timing, run each scenario of this stack under cProfile"
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed per profile (default 25)")
    options = parser.parse_args(argv)
    unknown = set(options.scenarios.split(",")) - set(SCENARIO_NAMES)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if options.seconds <= 0 or options.warmup < 0 or options.repeat < 1:
        parser.error("--seconds must be > 0, --warmup >= 0 and --repeat >= 1")
    return options


def configure_logging(access_log: bool) -> None:
    access = logging.getLogger("thallus.access")
    access.propagate = False
    if access_log:
        access.setLevel(logging.INFO)
        access.addHandler(logging.NullHandler())
    else:
        access.setLevel(logging.WARNING)


def isolate_environment(names: Iterable[str]) -> None:
    """Drop THALLUS_* variables so the settings are exactly the benchmark's on every machine."""
    for name in list(names):
        if name.startswith("THALLUS_"):
            del os.environ[name]


async def scaling(options: argparse.Namespace) -> list[dict[str, Any]]:
    """Allowed-origin lookups must stay O(1); request headers are read in one pass (O(n))."""
    timing = {"seconds": options.seconds, "warmup": options.warmup, "repeat": options.repeat}
    by_name = {scenario.name: scenario for scenario in SCENARIOS}
    rows: list[dict[str, Any]] = []
    origin_scenarios = [by_name["get_cors"], by_name["get_refused"]]
    for count in ORIGIN_COUNTS:
        progress(f"scaling: {count} allowed origins")
        stacks: dict[str, ASGIApp] = {
            "bare": make_app(),
            "thallus": protect(make_app(), thallus_settings(many_origins(count))),
        }
        cells = await measure(stacks, origin_scenarios, **timing)
        for scenario in origin_scenarios:
            row_cells = cells[scenario.name]
            rows.append(
                {
                    "case": f"{count} allowed origins",
                    "scenario": scenario.name,
                    "bare_us": round(row_cells["bare"].best_us, 3),
                    "thallus_us": round(row_cells["thallus"].best_us, 3),
                }
            )
    header_scenarios = [by_name["get"].with_extra_headers(count) for count in EXTRA_HEADER_COUNTS]
    progress("scaling: request header counts")
    stacks = {"bare": make_app(), "thallus": build_thallus()}
    cells = await measure(stacks, header_scenarios, **timing)
    for count, scenario in zip(EXTRA_HEADER_COUNTS, header_scenarios, strict=True):
        rows.append(
            {
                "case": f"{len(scenario.headers)} request headers",
                "scenario": scenario.name,
                "bare_us": round(cells[scenario.name]["bare"].best_us, 3),
                "thallus_us": round(cells[scenario.name]["thallus"].best_us, 3),
                "extra_headers": count,
            }
        )
    return rows


async def run(options: argparse.Namespace) -> dict[str, Any] | None:
    selected = set(options.scenarios.split(","))
    scenarios = [scenario for scenario in SCENARIOS if scenario.name in selected]
    stacks = {name: BUILDERS[name]() for name in STACKS}
    # as a server does after start-up (thallus serve): what lives for the whole process is left out of
    # full collections, so a collection during a timed run costs every stack alike and little
    gc.collect()
    gc.freeze()
    if options.profile:
        await _check(stacks, scenarios)
        for scenario in scenarios:
            print(await profile(stacks[options.profile], scenario, options.seconds, options.top))
        return None
    timing = {"seconds": options.seconds, "warmup": options.warmup, "repeat": options.repeat}
    progress(f"1. {len(stacks)} stacks x {len(scenarios)} scenarios")
    cells = await measure(stacks, scenarios, **timing)
    floor = await measure_floor(scenarios[0], seconds=options.seconds / 4, repeat=options.repeat)
    document: dict[str, Any] = {
        "benchmark": "thallus bench_core",
        "environment": environment(PACKAGES),
        "options": {
            "seconds": options.seconds,
            "warmup": options.warmup,
            "repeat": options.repeat,
            "batch": BATCH,
            "access_log": options.access_log,
            "clock": "thread CPU time",
        },
        "harness_floor_us": round(floor.best_us, 3),
        "results": comparison_rows(cells, scenarios),
    }
    if not options.no_layers:
        layer_scenarios = [scenario for scenario in scenarios if scenario.name in LAYER_SCENARIOS]
        if layer_scenarios:
            progress(f"2. {len(LAYERS)} layers alone x {len(layer_scenarios)} scenarios")
            layer_stacks: dict[str, ASGIApp] = {"bare": make_app(), **{name: build() for name, build in LAYERS.items()}}
            document["layers"] = added_rows(await measure(layer_stacks, layer_scenarios, **timing), "bare")
    if not options.no_scaling:
        progress("3. scaling")
        document["scaling"] = await scaling(options)
    if not options.no_breakdown:
        progress("4. breakdown")
        document["breakdown"] = await breakdown(options)
    if not options.no_metrics:
        progress("5. metrics")
        document["metrics"] = await metrics_cost(options, scenarios)
    print(json.dumps(document, indent=2) if options.json else render_table(document))
    return document


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    isolate_environment(os.environ)
    configure_logging(options.access_log)
    asyncio.run(run(options))


if __name__ == "__main__":
    main()
