"""The Thallus reference API: FastAPI routers inside the core protection layers.

``create_app(settings)`` returns the served ASGI application — the FastAPI app wrapped by
:func:`thallus.protect` with the authentication layer slotted in before CSRF — as a
:class:`Service`, which also exposes the inner FastAPI app and the identity service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from thallus import __version__
from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.audit import AuditSink, FanOutSink, LogAuditSink
from thallus.errors import error_body, install_error_handlers
from thallus.ratelimit import create_storage
from thallus.server.api.docs import mount_docs
from thallus.server.api.routes import admin, api_keys, audit_logs, auth, csp_reports, health, users
from thallus.server.api.text import RefuseNulInUrl
from thallus.server.audit.coalesce import CoalescingSink
from thallus.server.audit.store import AuditStore
from thallus.server.audit.writer import AuditWriter
from thallus.server.auth import AuthenticationMiddleware
from thallus.server.identity.keys import KeyRing
from thallus.server.identity.lockout import LoginLockout, lockout_store
from thallus.server.identity.service import Identity
from thallus.server.metrics import ServiceMetrics
from thallus.server.readiness import Readiness
from thallus.server.settings import ServiceSettings
from thallus.server.storage.database import Database, DatabaseUnavailableError
from thallus.stack import protect

logger = logging.getLogger("thallus.server.api")


class Service:
    """The protected ASGI application, with handles on its parts."""

    def __init__(
        self,
        app: ASGIApp,
        api: FastAPI,
        identity: Identity,
        audit: AuditWriter | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.app = app
        self.api = api
        self.identity = identity
        self.audit = audit
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_api(
    settings: ServiceSettings,
    identity: Identity,
    writer: AuditWriter | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The FastAPI application alone (routers, error handlers, docs), without protection layers.

    Its lifespan migrates the database, starts the identity service, the audit writer and the
    metrics snapshots, and on shutdown flushes them (queued audit records are written or
    journalled, then the last snapshot written) before closing the pool.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await identity.start()
        if writer is not None:
            await writer.start()
        if metrics is not None:
            await metrics.start()
        try:
            yield
        finally:
            await identity.stop(dispose=False)
            if writer is not None:
                await writer.stop()
            if metrics is not None:
                await metrics.stop()
            await identity.database.dispose()

    api = FastAPI(
        title="Thallus",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # A path that does not exist is a 404. Starlette's automatic slash redirect builds its
        # Location from the request's Host header (and scheme), so `POST /login/` with
        # `Host: evil.example` would send a client, credentials and all, to another host.
        redirect_slashes=False,
    )
    api.state.identity = identity
    api.state.readiness = Readiness(identity.database, settings.redis_url)
    api.state.audit_store = writer.store if writer is not None else None
    api.state.metrics = metrics.metrics if metrics is not None else None
    routers = (health.router, auth.router, users.router, api_keys.router, admin.router, audit_logs.router)
    for router in (*routers, csp_reports.router):
        api.include_router(router)
    if settings.docs_enabled:
        mount_docs(api)
    install_error_handlers(api)

    @api.exception_handler(DatabaseUnavailableError)
    async def database_unavailable(request: Request, exc: Exception) -> Response:
        logger.error("database unavailable while serving %s %s", request.method, request.url.path)
        body = error_body("ServiceUnavailableError", "The service is temporarily unavailable; try again shortly.")
        return Response(body, status_code=503, media_type="application/json", headers={"Retry-After": "5"})

    return api


def login_lockout(settings: ServiceSettings) -> LoginLockout:
    """The login lockout on its own store: memory, or Redis when ``THALLUS_REDIS_URL`` is set."""
    keys = KeyRing.from_settings(settings)
    return LoginLockout(
        lockout_store(settings.redis_url),
        threshold=settings.lockout_threshold,
        steps=settings.lockout_steps,
        key_prefix=settings.redis_key_prefix,
        subject_hash=lambda subject: keys.hash("lockout", subject),
    )


def create_app(settings: ServiceSettings | None = None, *, audit: AuditSink | None = None) -> Service:
    """The reference service: :func:`create_api` inside the core layers and the authentication layer.

    One database serves identity and the audit log; the request limits and the login lockout state
    live in memory, or both in Redis when configured. The persistent log receives denials coalesced
    per client (:mod:`thallus.server.audit.coalesce`, driven and flushed by the writer); ``audit`` receives
    every audit event as it happened, besides the persistent log (or instead of it, with
    ``THALLUS_AUDIT_ENABLED=false``). Unless ``THALLUS_METRICS_ACCESS=off``, requests, refusals,
    sign-ins and the audit writer are counted and served at ``/metrics``
    (:mod:`thallus.server.metrics`).
    """
    settings = settings or ServiceSettings.load()
    database = Database(settings.effective_database_url)
    writer = audit_writer(settings, database) if settings.audit_enabled else None
    persistent: AuditSink | None = None
    if writer is not None:
        coalescer = CoalescingSink(writer)
        writer.add_source(coalescer)
        persistent = coalescer
    sinks = [sink for sink in (persistent, audit) if sink is not None]
    sink: AuditSink = FanOutSink(*sinks) if sinks else LogAuditSink()
    storage = create_storage(settings.redis_url, settings.redis_key_prefix)
    identity = Identity.from_settings(settings, sink, login_lockout(settings), database)
    metrics = ServiceMetrics(settings, identity, writer) if settings.metrics_access != "off" else None
    api = create_api(settings, identity, writer, metrics)
    inner: list[Callable[[ASGIApp], ASGIApp]] = [RefuseNulInUrl]
    if metrics is not None:
        inner.append(metrics.layer)  # before authentication: /metrics has a bearer token of its own
    inner.append(lambda app: AuthenticationMiddleware(app, identity))
    app = protect(
        api,
        settings,
        inner=inner,
        audit=sink,
        rate_limit_storage=storage,
        metrics=metrics.metrics if metrics is not None else None,
    )
    return Service(app, api, identity, writer, metrics)


def audit_writer(settings: ServiceSettings, database: Database) -> AuditWriter:
    return AuditWriter(
        AuditStore(database),
        settings.effective_audit_journal_dir,
        queue_size=settings.audit_queue_size,
        batch_size=settings.audit_batch_size,
        write_timeout=settings.audit_write_timeout,
    )
