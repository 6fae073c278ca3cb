"""Prometheus metrics for the layers: requests, their durations, and refusals by layer and reason.

One call wires them::

    from starlette.routing import Route
    from thallus import protect
    from thallus.metrics import Metrics

    metrics = Metrics()
    app = protect(app, settings, metrics=metrics)
    app.router.routes.append(Route("/metrics", metrics.asgi_app))  # Starlette, FastAPI
    # any other framework: serve metrics.asgi_app, or answer with metrics.render()

``pip install "thallus[metrics]"`` brings ``prometheus-client``, which renders the text exposition
through its public API (a collector yielding metric families, ``generate_latest``). It is imported
when a :class:`Metrics` is made, never by importing this module, so ``pip install thallus`` alone
still imports every layer.

What is counted (``protect`` drives it; the reference service adds families of its own,
:mod:`thallus.server.metrics`):

* ``thallus_http_requests_total`` (counter) and ``thallus_http_request_duration_seconds``
  (histogram), by ``method``, ``route`` and ``status_class`` — every HTTP request the protection
  answers, preflights included, timed from its first layer to the end of its response;
* ``thallus_refusals_total`` (counter), by ``layer`` and ``reason``: ``csrf`` (the ``REJECT_*``
  reasons of :mod:`thallus.csrf`), ``cors`` (a refused preflight's ``origin``, ``method`` or
  ``headers``), ``rate_limit`` (the policy: ``general`` or ``auth``) and ``body_limit``
  (``too_large``, ``timeout``, ``too_slow``).

Rules, each for a reason:

* **Counting is plain Python.** A request costs a dict lookup and two increments on this process's
  own tables; prometheus-client's own metric objects take a lock per update and cost several
  times that (benchmarks/bench_core.py, table 5). Families are built only when something renders.
* **Label values are bounded**, or a client could grow the tables without end: ``route`` is the
  template of the route that answered (``scope["route"].path``, which Starlette and FastAPI set;
  a mounted application's own routes are named without the mount's prefix), ``<unmatched>`` when
  no route did (a 404, or a refusal before routing), ``<preflight>`` for a CORS preflight; never the
  raw path. ``method`` is one of the standard methods, anything else ``OTHER``; ``status_class``
  is ``1xx``–``5xx``, or ``none`` when no response was sent. Refusal reasons outside the known sets
  become ``other``.
* **Several processes add up**: :meth:`Metrics.snapshot` is this process's counts as JSON-safe
  data, :func:`merge` sums snapshots (counters and histograms; gauges by their own rule, sum or
  max), :func:`render_snapshot` renders one. The service publishes a snapshot per worker and sums
  them on every scrape (:mod:`thallus.server.metrics`).
* **No global state**: each :class:`Metrics` holds its own tables, so several protected apps in
  one process (tests) count apart.

:attr:`Metrics.asgi_app` answers anyone who reaches it: serve it where only the scraper does, or
serve a :class:`MetricsEndpoint` with ``access="loopback"`` or ``"token"`` instead — the rules of
the service's ``THALLUS_METRICS_ACCESS``.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send, collect_headers
from thallus.audit import AuditEvent, AuditSink
from thallus.csrf import (
    REJECT_CROSS_SITE_NO_ORIGIN,
    REJECT_NO_EVIDENCE,
    REJECT_NULL_ORIGIN,
    REJECT_UNTRUSTED_ORIGIN,
    REJECT_UNTRUSTED_REFERER,
)
from thallus.errors import AuthenticationError, MethodNotAllowedError, PermissionDeniedError, send_thallus_error

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

#: Upper bounds (seconds) of the duration histogram's buckets: from a fast in-process answer to a
#: slow sign-in (Argon2id); ``+Inf`` is added.
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"
PREFLIGHT = "<preflight>"
OTHER = "other"
OTHER_METHOD = "OTHER"
NO_RESPONSE = "none"
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
_METHOD_LABELS = {method: method for method in STANDARD_METHODS}
_STATUS_CLASSES = {status: f"{status // 100}xx" for status in range(100, 600)}

REQUESTS = "thallus_http_requests_total"
DURATIONS = "thallus_http_request_duration_seconds"
REFUSALS = "thallus_refusals_total"
REQUEST_LABELS = ("method", "route", "status_class")

LAYER_CSRF = "csrf"
LAYER_CORS = "cors"
LAYER_RATE_LIMIT = "rate_limit"
LAYER_BODY_LIMIT = "body_limit"
CSRF_REASONS = frozenset(
    {
        REJECT_NULL_ORIGIN,
        REJECT_UNTRUSTED_ORIGIN,
        REJECT_UNTRUSTED_REFERER,
        REJECT_CROSS_SITE_NO_ORIGIN,
        REJECT_NO_EVIDENCE,
    }
)
RATE_LIMIT_POLICIES = frozenset({"general", "auth"})
CORS_ORIGIN, CORS_METHOD, CORS_HEADERS = "origin", "method", "headers"

#: A family's value(s) read when a snapshot is taken: one number, or numbers by label values.
Reading = Callable[[], "float | Mapping[tuple[str, ...], float]"]
Kind = Literal["counter", "gauge"]
GaugeMerge = Literal["sum", "max"]
#: :class:`MetricsEndpoint`'s readers: anyone, peers on loopback, or holders of a bearer token.
Access = Literal["open", "loopback", "token"]
MIN_TOKEN_LENGTH = 32


@dataclass(frozen=True, slots=True)
class RouteLabel:
    """Stands in ``scope["route"]`` for an answer no router made (a layer's own endpoint): its
    ``path`` is the ``route`` label, as a Starlette route's is."""

    path: str


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    kind: Kind
    documentation: str
    labels: tuple[str, ...]
    read: Reading
    merge: GaugeMerge


class Metrics:
    """One process's counts: the layers' (fed by :func:`thallus.protect`) and any added with
    :meth:`counter` and :meth:`gauge`. See the module docstring for the families and rules."""

    def __init__(self, *, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        try:
            import prometheus_client  # noqa: F401 - only to fail here, at start-up, not at the first scrape
        except ImportError:
            raise ImportError('thallus.metrics needs prometheus-client: pip install "thallus[metrics]"') from None
        bounds = tuple(float(bound) for bound in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError("buckets must be finite, increasing upper bounds")
        self.buckets = bounds
        self._width = len(bounds) + 2  # a count per bucket, +Inf's, then the sum of seconds
        #: (method, route template, status) → [count per bucket…, +Inf's, sum of seconds]: the
        #: request path's one lookup (:meth:`observe`). Keys hold standard methods only (a request
        #: of another method finds no cell and is handed OTHER's by :meth:`cell`); status codes
        #: become classes at snapshot time, not per request.
        self.cells: dict[tuple[str, str, int], list[float]] = {}
        self._refusals: dict[tuple[str, ...], int] = {}
        self._families: list[_Family] = [
            _Family(
                REFUSALS,
                "counter",
                "Requests a layer refused, by layer and reason.",
                ("layer", "reason"),
                self._refusals.copy,
                "sum",
            )
        ]

    # -- counting (the request path) --------------------------------------------------------------

    def observe(self, method: str, scope: Scope, status: int, seconds: float) -> None:
        """Count one answered HTTP request, labelled by the route that matched it (module doc).

        ``ProtectedApp`` does the same inline (a call costs as much again on its path)."""
        key = (method, getattr(scope.get("route"), "path", UNMATCHED), status)
        cell = self.cells.get(key) or self.cell(key)
        cell[bisect_left(self.buckets, seconds)] += 1
        cell[-1] += seconds

    def cell(self, key: tuple[str, str, int]) -> list[float]:
        """The cell of a (method, route, status) that has none yet: made, under labels bounded as
        the module doc says — a method outside the standard ones counts as OTHER and is not kept."""
        method, route, status = key
        bounded = (_METHOD_LABELS.get(method, OTHER_METHOD), route if type(route) is str else str(route), status)
        cell = self.cells.get(bounded)
        if cell is None:
            cell = self.cells[bounded] = [0.0] * self._width
        return cell

    def observed(self, app: ASGIApp, route: str | None = None) -> ASGIApp:
        """``app`` with its HTTP requests counted (``route``, when given, labels every one of them).
        :func:`~thallus.protect` counts its own; this is for what it hands to the composed layers
        (preflights), or for an application served without it."""
        label: Scope | None = None if route is None else {"route": RouteLabel(route)}

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 0

            async def send_counted(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            started = time.perf_counter()
            try:
                await app(scope, receive, send_counted)
            finally:
                self.observe(scope["method"], label or scope, status, time.perf_counter() - started)

        return counted

    def refused(self, layer: str, reason: str) -> None:
        """Count one refusal by ``layer`` (keep both to small, fixed sets: they are labels)."""
        key = (layer, reason)
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def body_refused(self, reason: str) -> None:
        """The body limit's refusal hook (:class:`~thallus.bodies.BodyLimitMiddleware`)."""
        self.refused(LAYER_BODY_LIMIT, reason)

    def audit_sink(self, forward: AuditSink | None = None) -> AuditSink:
        """A sink for the layers' audit events that counts their refusals (``csrf_rejected``,
        ``cors_rejected``, ``rate_limited``) and hands every event on to ``forward``, if any."""
        return _RefusalCountingSink(self, forward)

    def count_event(self, event: AuditEvent) -> None:
        """Count ``event`` when it is a layer's refusal; the reason is read from its details, as
        the layers write them, and bounded to the known values."""
        details = event.details or {}
        if event.action == "csrf_rejected":
            reason = details.get("reason")
            self.refused(LAYER_CSRF, reason if reason in CSRF_REASONS else OTHER)
        elif event.action == "cors_rejected":
            cause = CORS_HEADERS if "headers" in details else CORS_METHOD if "method" in details else CORS_ORIGIN
            self.refused(LAYER_CORS, cause)
        elif event.action == "rate_limited":
            policy = details.get("policy")
            self.refused(LAYER_RATE_LIMIT, policy if policy in RATE_LIMIT_POLICIES else OTHER)

    # -- families of the application's own --------------------------------------------------------

    def counter(self, name: str, documentation: str, read: Reading, labels: Sequence[str] = ()) -> None:
        """Add a counter whose value is read from ``read`` at each snapshot: a number that never goes
        down, or such numbers by label values (tuples as long as ``labels``)."""
        self._add(_Family(name, "counter", documentation, tuple(labels), read, "sum"))

    def gauge(
        self, name: str, documentation: str, read: Reading, labels: Sequence[str] = (), *, merge: GaugeMerge = "sum"
    ) -> None:
        """Add a gauge read from ``read`` at each snapshot; ``merge`` says how several processes'
        values combine (``sum``: queue depths; ``max``: a position such as a sequence number)."""
        self._add(_Family(name, "gauge", documentation, tuple(labels), read, merge))

    def _add(self, family: _Family) -> None:
        if family.name in (REQUESTS, DURATIONS) or any(known.name == family.name for known in self._families):
            raise ValueError(f"{family.name} is already a metric of this Metrics")
        self._families.append(family)

    # -- snapshots and rendering ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's counts as JSON-safe data: what :func:`merge` and :func:`render_snapshot`
        take. Status codes become classes here, not per request."""
        width = self._width
        by_class: dict[tuple[str, str, str], list[float]] = {}
        for (method, route, status), cell in list(self.cells.items()):  # a copy: never torn by a request
            key = (method, route, _STATUS_CLASSES.get(status, NO_RESPONSE))
            total = by_class.get(key)
            if total is None:
                total = by_class[key] = [0.0] * width
            for index, value in enumerate(tuple(cell)):
                total[index] += value
        histogram = [(list(key), [int(count) for count in cell[:-1]], cell[-1]) for key, cell in by_class.items()]
        families: list[dict[str, Any]] = [
            {
                "name": REQUESTS,
                "type": "counter",
                "help": "HTTP requests answered, by method, route template and status class.",
                "labels": list(REQUEST_LABELS),
                "samples": [[labels, sum(counts)] for labels, counts, _ in histogram],
            },
            {
                "name": DURATIONS,
                "type": "histogram",
                "help": "Seconds from a request's arrival at the first layer to the end of its response.",
                "labels": list(REQUEST_LABELS),
                "buckets": list(self.buckets),
                "samples": histogram,
            },
        ]
        for family in self._families:
            families.append(
                {
                    "name": family.name,
                    "type": family.kind,
                    "help": family.documentation,
                    "labels": list(family.labels),
                    "merge": family.merge,
                    "samples": _samples(family),
                }
            )
        return {"families": families}

    def render(self) -> bytes:
        """The text exposition of this process's counts."""
        return render_snapshot(self.snapshot())

    def collector(self) -> Collector:
        """A prometheus-client collector of this process's counts, to register with a registry of
        your own (``REGISTRY.register(metrics.collector())``)."""
        return snapshot_collector(self.snapshot)

    @property
    def asgi_app(self) -> ASGIApp:
        """An ASGI application answering ``GET``/``HEAD`` with :meth:`render` — to anyone (module doc)."""
        return MetricsEndpoint(self.render)

    content_type = "text/plain; version=0.0.4; charset=utf-8"


def _samples(family: _Family) -> list[list[Any]]:
    value = family.read()
    if isinstance(value, Mapping):
        return [[[str(part) for part in labels], float(number)] for labels, number in value.items()]
    return [[[], float(value)]]


class _RefusalCountingSink:
    __slots__ = ("forward", "metrics")

    def __init__(self, metrics: Metrics, forward: AuditSink | None) -> None:
        self.metrics = metrics
        self.forward = forward

    def record(self, event: AuditEvent) -> None:
        with contextlib.suppress(Exception):  # a sink never raises (thallus.audit)
            self.metrics.count_event(event)
        if self.forward is not None:
            self.forward.record(event)


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One snapshot summing ``snapshots``: counters and histograms add up by label values, gauges
    add up or take the largest, as each family says. A family whose type or buckets differ from the
    first seen of its name is left out of that snapshot's share (a mixed deployment)."""
    merged: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[tuple[str, ...], Any]] = {}
    for snapshot in snapshots:
        for family in snapshot.get("families", ()):
            name = family["name"]
            known = merged.get(name)
            if known is None:
                merged[name] = known = {key: value for key, value in family.items() if key != "samples"}
                values[name] = {}
            elif known["type"] != family["type"] or known.get("buckets") != family.get("buckets"):
                continue
            table = values[name]
            for sample in family["samples"]:
                labels = tuple(sample[0])
                if family["type"] == "histogram":
                    counts, total = list(sample[1]), float(sample[2])
                    previous = table.get(labels)
                    if previous is not None:
                        counts = [a + b for a, b in zip(previous[0], counts, strict=True)]
                        total += previous[1]
                    table[labels] = (counts, total)
                elif family["type"] == "gauge" and family.get("merge") == "max":
                    table[labels] = max(table.get(labels, -math.inf), float(sample[1]))
                else:
                    table[labels] = table.get(labels, 0.0) + float(sample[1])
    families = []
    for name, family in merged.items():
        if family["type"] == "histogram":
            samples = [[list(labels), counts, total] for labels, (counts, total) in values[name].items()]
        else:
            samples = [[list(labels), value] for labels, value in values[name].items()]
        families.append({**family, "samples": samples})
    return {"families": families}


def render_snapshot(snapshot: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of ``snapshot`` (prometheus-client's ``generate_latest``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(snapshot_collector(lambda: snapshot))
    return generate_latest(registry)


def snapshot_collector(source: Callable[[], Mapping[str, Any]]) -> Collector:
    """A prometheus-client collector yielding the families of ``source()`` at each collection."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    class SnapshotCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            for family in source().get("families", ()):
                labels = family["labels"]
                metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
                if family["type"] == "histogram":
                    metric = HistogramMetricFamily(family["name"], family["help"], labels=labels)
                    bounds = [*(str(float(bound)) for bound in family["buckets"]), "+Inf"]
                    for values, counts, total in family["samples"]:
                        cumulative, running = [], 0.0
                        for bound, count in zip(bounds, counts, strict=True):
                            running += count
                            cumulative.append((bound, running))
                        metric.add_metric(values, cumulative, total)
                else:
                    kind = CounterMetricFamily if family["type"] == "counter" else GaugeMetricFamily
                    metric = kind(family["name"], family["help"], labels=labels)
                    for values, value in family["samples"]:
                        metric.add_metric(values, value)
                yield metric

    return SnapshotCollector()


# -- the endpoint -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address in 127.0.0.0/8 or ``::1`` (an IPv4-mapped one included)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


_AUTHORIZATION = b"authorization"
_ALLOW = (b"allow", b"GET, HEAD")
_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="metrics"')


class MetricsEndpoint:
    """An ASGI application answering ``GET`` and ``HEAD`` with the exposition ``render()`` returns,
    to the readers ``access`` allows; any other method is a 405.

    * ``open``: anyone who reaches it;
    * ``loopback``: a TCP peer in 127.0.0.0/8 or ``::1`` (``scope["client"]``), never an address a
      forwarding header names — a header is the client's to write. A peer that is one of
      ``trusted_proxies`` and sent ``proxy_header`` is a proxy on this host forwarding someone
      else's request: refused too (a header can only take access away here, never grant it);
    * ``token``: ``Authorization: Bearer <token>``, compared in constant time; ``token`` must have
      at least 32 characters.

    A refused reader gets the §8 JSON shape: 403 ``PermissionDeniedError``, or 401 with
    ``WWW-Authenticate`` when a token is needed and none was sent.
    """

    def __init__(
        self,
        render: Callable[[], bytes],
        *,
        access: Access = "open",
        token: str | None = None,
        trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        proxy_header: str = "x-forwarded-for",
    ) -> None:
        if access not in ("open", "loopback", "token"):
            raise ValueError("access must be open, loopback or token")
        if access == "token" and (token is None or len(token) < MIN_TOKEN_LENGTH):
            raise ValueError(f"access=token needs a token of at least {MIN_TOKEN_LENGTH} characters")
        self.render = render
        self.access = access
        self._token = (token or "").encode()
        self._trusted_proxies = tuple(trusted_proxies)
        self._proxy_header = proxy_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})  # refused before it is accepted
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await send_thallus_error(send, refusal)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_thallus_error(send, MethodNotAllowedError(headers=[_ALLOW]))
            return
        body = self.render()
        headers = [
            (b"content-type", Metrics.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def refusal(self, scope: Scope) -> AuthenticationError | PermissionDeniedError | None:
        """Why this request may not read the metrics, or ``None`` (the class docstring's rules)."""
        if self.access == "open":
            return None
        if self.access == "loopback":
            client = scope.get("client")
            peer = str(client[0]) if client else ""
            if not is_loopback(peer):
                return PermissionDeniedError("The metrics are readable from this host only.")
            if self._trusted_proxies and self._forwarded(scope, peer):
                return PermissionDeniedError("The metrics are not readable through a proxy.")
            return None
        values = collect_headers(scope, frozenset({_AUTHORIZATION})).get(_AUTHORIZATION, [])
        if not values:
            return AuthenticationError("Reading the metrics needs a bearer token.", headers=[_WWW_AUTHENTICATE])
        scheme, _, given = values[0].strip().partition(" ")
        matches = hmac.compare_digest(given.strip().encode("latin-1"), self._token)
        if len(values) != 1 or scheme.lower() != "bearer" or not matches:
            return PermissionDeniedError("The metrics token is not valid.")
        return None

    def _forwarded(self, scope: Scope, peer: str) -> bool:
        address = ipaddress.ip_address(peer)
        if not any(address in network for network in self._trusted_proxies):
            return False
        return any(name.lower() == self._proxy_header for name, _ in scope["headers"])
