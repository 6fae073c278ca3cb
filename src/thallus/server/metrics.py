"""The service's ``/metrics``: the layers' families (:mod:`thallus.metrics`) and the service's own,
summed over every worker of ``thallus serve --workers N``.

The service's families, each read from the plain counters of the part it describes when a
snapshot is taken (those parts know nothing of metrics; nothing is global, so several services in
one process count apart):

* ``thallus_logins_total{outcome}`` — sign-ins: ``success``, ``failure`` (wrong or unknown
  credentials), ``locked``, ``concurrent_attempts`` (refused by the lockout, §10);
* ``thallus_lockouts_total`` — locks begun by a failed sign-in;
* ``thallus_password_hash_queue_depth`` — sign-ins waiting for a hashing slot (gauge);
* ``thallus_audit_queue_depth`` (gauge), ``thallus_audit_batches_written_total``,
  ``thallus_audit_records_written_total``, ``thallus_audit_journal_spilled_records_total{cause}``
  (``store``: the database was away or slow; ``queue_full``), ``thallus_audit_journal_replayed_records_total``,
  ``thallus_audit_chain_head_seq`` (gauge: the highest ``seq`` a worker has appended; max over workers);
* ``thallus_refusals_total{layer="login_csrf"}`` — the login-CSRF check's refusals (§5.4).

**Who may read it** is ``THALLUS_METRICS_ACCESS``: ``off`` (no endpoint, no counting: a 404 as for
any unknown path), ``loopback`` (the default: TCP peers in 127.0.0.0/8 and ``::1``, never an
address a forwarding header names) or ``token`` (``Authorization: Bearer <THALLUS_METRICS_TOKEN>``,
compared in constant time). The rules are :class:`~thallus.metrics.MetricsEndpoint`'s. It is
answered by a layer placed before authentication, since its bearer token is no access token.

**Workers.** uvicorn's workers are separate processes, each counting its own requests. Every worker
writes a snapshot of its counts to ``THALLUS_DATA_DIR/metrics/<run>/<pid>.json`` every second and at
shutdown (a temporary file renamed over the last: 0600 in 0700 directories). The worker a scrape
reaches takes a fresh snapshot of its own and sums it with every other snapshot of its run:

* counters and histograms of every worker that wrote one, alive or not — a counter never goes
  down, so a worker that exited (or died and was replaced) keeps counting what it counted, up to its
  last snapshot (at most a second's worth is lost with a killed worker);
* gauges of live workers only: a dead worker's queue is no queue.

So a scrape lags the other workers by up to a second. ``<run>`` names one ``thallus serve``: a hash
of the ``multiprocessing`` authentication key, which uvicorn's workers inherit from the process
that spawned them and no other run shares (the key itself is never written). At start-up, snapshots
of other runs whose writer is gone are deleted, so the directory holds one run's worth.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.metrics import CSRF_REASONS, OTHER, Metrics, MetricsEndpoint, RouteLabel, merge, render_snapshot
from thallus.ratelimit import parse_networks
from thallus.server.audit.writer import AuditWriter
from thallus.server.identity.service import LOGIN_OUTCOMES, Identity
from thallus.server.settings import ServiceSettings
from thallus.server.storage.private import private_directory, replace_private_file

logger = logging.getLogger("thallus.server.metrics")

PATH = "/metrics"
LAYER_LOGIN_CSRF = "login_csrf"
PUBLISH_INTERVAL = 1.0
ERROR_LOG_INTERVAL = 60.0


def add_service_families(metrics: Metrics, identity: Identity, writer: AuditWriter | None) -> None:
    """Register the service's families (module doc) on ``metrics``, read from ``identity`` and ``writer``."""
    metrics.counter(
        "thallus_logins_total",
        "Sign-ins by outcome.",
        lambda: {(outcome,): identity.logins[outcome] for outcome in LOGIN_OUTCOMES},
        ("outcome",),
    )
    metrics.counter("thallus_lockouts_total", "Sign-in locks begun by a failed sign-in.", lambda: identity.lockouts)
    metrics.gauge(
        "thallus_password_hash_queue_depth",
        "Sign-ins waiting for a password-hashing slot.",
        lambda: identity.hasher.slots.waiting,
    )
    if writer is None:
        return
    stats = writer.stats
    metrics.gauge("thallus_audit_queue_depth", "Audit records waiting in the queue.", lambda: writer.queue_depth)
    metrics.counter("thallus_audit_batches_written_total", "Audit batches stored.", lambda: stats["batches"])
    metrics.counter("thallus_audit_records_written_total", "Audit records stored.", lambda: stats["written"])
    metrics.counter(
        "thallus_audit_journal_spilled_records_total",
        "Audit records spilled to the journal: the store away or slow, or the queue full.",
        lambda: {("store",): stats["spilled"], ("queue_full",): stats["overflowed"]},
        ("cause",),
    )
    metrics.counter(
        "thallus_audit_journal_replayed_records_total",
        "Journalled audit records replayed into the store.",
        lambda: stats["replayed"],
    )
    metrics.gauge(
        "thallus_audit_chain_head_seq",
        "The audit chain head's seq after this service's last append.",
        lambda: writer.head_seq,
        merge="max",
    )


def count_login_csrf_refusal(metrics: Metrics | None, reason: str) -> None:
    """Count a refusal of the login-CSRF check (``thallus.server.api.deps``), reason bounded."""
    if metrics is not None:
        metrics.refused(LAYER_LOGIN_CSRF, reason if reason in CSRF_REASONS else OTHER)


# -- one snapshot per worker --------------------------------------------------------------------


def run_id() -> str:
    """What names this run of ``thallus serve`` (module doc): shared by its workers, no other run's."""
    key = bytes(multiprocessing.current_process().authkey)
    return hashlib.sha256(b"thallus metrics run\x00" + key).hexdigest()[:16]


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True


def without_gauges(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    return {"families": [family for family in snapshot.get("families", ()) if family.get("type") != "gauge"]}


class WorkerSnapshots:
    """This worker's snapshot file, and the sum of its run's (module doc)."""

    def __init__(self, metrics: Metrics, directory: Path, *, interval: float = PUBLISH_INTERVAL) -> None:
        self.metrics = metrics
        self.root = directory
        self.directory = directory / run_id()
        self.pid = os.getpid()
        self.path = self.directory / f"{self.pid}.json"
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._last_error_log = -math.inf

    async def start(self) -> None:
        """Publish now and every ``interval``. A directory that cannot be written never stops the
        service: the error is logged and a scrape answers for the worker it reaches."""
        try:
            private_directory(self.directory)
            self._forget_finished_runs()
            self.publish()
        except OSError as exc:
            self._log_error(exc)
        self._task = asyncio.create_task(self._publish_periodically(), name="thallus-metrics-snapshots")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._publish_logged()

    def publish(self) -> None:
        """Write this worker's snapshot now."""
        self._write(self.metrics.snapshot())

    async def _publish_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                snapshot = self.metrics.snapshot()  # on the loop: the tables are the loop's
                await asyncio.to_thread(self._write, snapshot)
            except Exception as exc:  # the next turn tries again; the task must outlive any error
                self._log_error(exc)

    def _publish_logged(self) -> None:
        try:
            self.publish()
        except OSError as exc:
            self._log_error(exc)

    def _write(self, snapshot: Mapping[str, Any]) -> None:
        document = {"pid": self.pid, "snapshot": snapshot}
        replace_private_file(self.path, json.dumps(document, separators=(",", ":")).encode())

    def _log_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.error("could not write the metrics snapshot %s: %s", self.path, exc)

    def merged(self) -> dict[str, Any]:
        """This worker's fresh snapshot summed with the other snapshots of its run."""
        snapshots = [self.metrics.snapshot()]
        for path in sorted(self.directory.glob("*.json")):
            if path == self.path:
                continue
            try:
                document = json.loads(path.read_bytes())
                pid, snapshot = int(document["pid"]), document["snapshot"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # gone meanwhile, or not ours to read
            snapshots.append(snapshot if is_alive(pid) else without_gauges(snapshot))
        return merge(snapshots)

    def render(self) -> bytes:
        return render_snapshot(self.merged())

    def _forget_finished_runs(self) -> None:
        """Delete snapshots of other runs whose writer is gone, then their empty directories."""
        for run in self.root.iterdir():
            if run == self.directory or not run.is_dir():
                continue
            for path in run.glob("*.json"):
                with contextlib.suppress(ValueError, OSError):
                    if not is_alive(int(path.stem)):
                        path.unlink()
            with contextlib.suppress(OSError):
                run.rmdir()  # only once empty


# -- the endpoint ----------------------------------------------------------------------------------

ROUTE = RouteLabel(PATH)


class MetricsRoute:
    """A pure-ASGI layer answering ``/metrics`` with ``endpoint`` and handing every other path on;
    it runs before authentication, which would take the metrics token for an access token."""

    def __init__(self, app: ASGIApp, endpoint: ASGIApp) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH:
            scope["route"] = ROUTE  # the requests' label: no router answers it
            await self.endpoint(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ServiceMetrics:
    """Everything ``/metrics`` needs: the counts, the workers' snapshots and the endpoint."""

    def __init__(self, settings: ServiceSettings, identity: Identity, writer: AuditWriter | None) -> None:
        if settings.metrics_access == "off":
            raise ValueError("metrics are off (THALLUS_METRICS_ACCESS=off)")
        self.metrics = Metrics()
        add_service_families(self.metrics, identity, writer)
        self.snapshots = WorkerSnapshots(self.metrics, settings.data_dir / "metrics")
        self.endpoint = MetricsEndpoint(
            self.snapshots.render,
            access=settings.metrics_access,
            token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            proxy_header=settings.proxy_header,
        )

    def layer(self, app: ASGIApp) -> ASGIApp:
        return MetricsRoute(app, self.endpoint)

    async def start(self) -> None:
        await self.snapshots.start()

    async def stop(self) -> None:
        await self.snapshots.stop()
