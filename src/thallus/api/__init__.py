"""The Thallus reference API: FastAPI routers inside the core protection layers.

``create_app(settings)`` returns the served ASGI application — the FastAPI app wrapped by
:func:`thallus.protect` with the authentication layer slotted in before CSRF — as a
:class:`Service`, which also exposes the inner FastAPI app and the identity service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from limits.aio.storage import Storage

from thallus import __version__
from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.api.docs import mount_docs
from thallus.api.routes import admin, api_keys, auth, csp_reports, health, users
from thallus.audit import AuditSink, LogAuditSink
from thallus.auth import AuthenticationMiddleware
from thallus.errors import error_body, install_error_handlers
from thallus.identity.service import Identity
from thallus.ratelimit import LoginLockout, create_storage
from thallus.settings import Settings
from thallus.stack import protect
from thallus.storage.database import DatabaseUnavailableError

logger = logging.getLogger("thallus.api")


class Service:
    """The protected ASGI application, with handles on its parts."""

    def __init__(self, app: ASGIApp, api: FastAPI, identity: Identity) -> None:
        self.app = app
        self.api = api
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_api(settings: Settings, identity: Identity) -> FastAPI:
    """The FastAPI application alone (routers, error handlers, docs), without protection layers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await identity.start()
        try:
            yield
        finally:
            await identity.stop()

    api = FastAPI(
        title="Thallus",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    api.state.identity = identity
    for router in (health.router, auth.router, users.router, api_keys.router, admin.router, csp_reports.router):
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


def login_lockout(settings: Settings, storage: Storage) -> LoginLockout:
    return LoginLockout(
        storage,
        threshold=settings.lockout_threshold,
        steps=settings.lockout_steps,
        key_prefix=settings.redis_key_prefix,
    )


def create_app(settings: Settings | None = None, *, audit: AuditSink | None = None) -> Service:
    """The reference service: :func:`create_api` inside the core layers and the authentication layer.

    One ``limits`` storage (memory, or Redis when configured) holds both the request limits and the
    login lockout state.
    """
    settings = settings or Settings.load()
    audit = audit or LogAuditSink()
    storage = create_storage(settings.redis_url, settings.redis_key_prefix)
    identity = Identity.from_settings(settings, audit, login_lockout(settings, storage))
    api = create_api(settings, identity)
    app = protect(
        api,
        settings,
        inner=[lambda inner: AuthenticationMiddleware(inner, identity)],
        audit=audit,
        rate_limit_storage=storage,
    )
    return Service(app, api, identity)
