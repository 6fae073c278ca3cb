"""Apps for the browser tests besides ``thallus serve``: the misconfigured control, and small HTML apps.

:func:`naive_api` is the negative control of every scenario: the reference API's endpoints with the
classic mistakes, so each browser check is shown to flip —

* CORS reflects any origin with credentials (Starlette's ``allow_origin_regex=".*"``) and exposes
  no response header, so a page cannot read ``X-Correlation-ID``;
* no CSRF check at all;
* no X-Frame-Options and no Content-Security-Policy;
* the refresh cookie ``Path=/; SameSite=None; Secure`` and not HttpOnly: readable by scripts, sent
  to every path and on cross-site requests.

It logs every request into a :class:`~tests.browser.support.ServerLog` in the shape of
``thallus serve``'s access log, plus whether a ``Cookie`` header came along.

:func:`xss_app` renders HTML with a reflected-XSS bug (scenario 4); :func:`docs_app` is
``/docs`` of the reference API on its own, and :class:`ReplaceCsp` a misconfigured proxy in front of
it that sets one CSP for every path, dropping the page's nonce.
"""

from __future__ import annotations

import html
import secrets
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.browser.support import ACCESS, ServerLog
from thallus._asgi import ASGIApp, Message, Receive, Scope, Send
from thallus.server.api.docs import mount_docs

REFRESH_COOKIE = "thallus_refresh"
NAIVE_COOKIE_ATTRIBUTES = "Path=/; SameSite=None; Secure"  # Secure is allowed on http://localhost
NAIVE_DOCS_MARKER = "Naive API documentation"


def _error(request: Request, status: int, error: str, message: str) -> JSONResponse:
    body = {"error": error, "message": message, "details": None, "correlation_id": request.state.correlation_id}
    return JSONResponse(body, status_code=status)


def _session(token: str, status: int = 200) -> JSONResponse:
    body = {"access_token": token, "user": {"id": "1", "email": "naive@example.com", "name": ""}, "expires_in": 900}
    response = JSONResponse(body, status_code=status)
    response.headers.append("set-cookie", f"{REFRESH_COOKIE}={secrets.token_urlsafe(16)}; {NAIVE_COOKIE_ATTRIBUTES}")
    return response


async def login(request: Request) -> Response:
    await request.json()
    return _session("naive-access-" + secrets.token_hex(8))


async def refresh(request: Request) -> Response:
    if REFRESH_COOKIE not in request.cookies:
        return _error(request, 401, "AuthenticationError", "No refresh token: sign in first.")
    return _session("naive-access-" + secrets.token_hex(8))


async def logout(request: Request) -> Response:
    response = Response(status_code=204)
    response.headers.append("set-cookie", f"{REFRESH_COOKIE}=; Max-Age=0; {NAIVE_COOKIE_ATTRIBUTES}")
    return response


def _authenticated(request: Request) -> bool:
    return request.headers.get("authorization", "").startswith("Bearer ") or "x-api-key" in request.headers


async def me(request: Request) -> Response:
    if not _authenticated(request):
        return _error(request, 401, "AuthenticationError", "Authentication is required.")
    return JSONResponse({"id": "1", "email": "naive@example.com", "name": ""})


async def create_key(request: Request) -> Response:
    if not _authenticated(request):
        return _error(request, 401, "AuthenticationError", "Authentication is required.")
    return JSONResponse({"id": "k1", "name": "key", "key": "thal_naive" + secrets.token_hex(8)}, status_code=201)


async def docs(request: Request) -> Response:
    return HTMLResponse(f"<!doctype html><title>docs</title><h1 id='docs'>{NAIVE_DOCS_MARKER}</h1>")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def not_found(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code != 404:
        return PlainTextResponse(exc.detail, status_code=exc.status_code)
    return _error(request, 404, "NotFoundError", "The requested resource was not found.")


class Recorder:
    """Outermost layer: a correlation ID per request and one access-log entry in ``log``."""

    def __init__(self, app: ASGIApp, log: ServerLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        correlation_id = str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        status = 0

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-correlation-id", correlation_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            self.log.add(
                {
                    "logger": ACCESS,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "correlation_id": correlation_id,
                    "origin": headers.get("origin"),
                    "cookie": bool(headers.get("cookie", "").strip()),
                }
            )


def naive_api(log: ServerLog) -> ASGIApp:
    app = Starlette(
        routes=[
            Route("/api/v1/auth/login", login, methods=["POST"]),
            Route("/api/v1/auth/refresh", refresh, methods=["POST"]),
            Route("/api/v1/auth/logout", logout, methods=["POST"]),
            Route("/api/v1/users/me", me, methods=["GET"]),
            Route("/api/v1/api-keys", create_key, methods=["POST"]),
            Route("/docs", docs, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,  # the misconfiguration: any origin, with credentials
                allow_origin_regex=".*",
                allow_credentials=True,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        ],
        exception_handlers={HTTPException: not_found},
    )
    return Recorder(app, log)


# -- scenario 4: HTML served by an application --------------------------------------------------

INJECTED_TEXT = "INJECTED SCRIPT RAN"
PAYLOAD = f'<script>window.injected = "ran"; document.write("<p style=color:red>{INJECTED_TEXT}</p>");</script>'


async def greet(request: Request) -> Response:
    """A reflected-XSS bug on purpose: ``name`` goes into the HTML unescaped."""
    name = request.query_params.get("name", "world")
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>greeting</title>"
        "<script src='/static/app.js'></script></head>"
        f"<body><h1>Hello {name}</h1><p>escaped, for the screenshot: <code>{html.escape(name)}</code></p></body></html>"
    )
    return HTMLResponse(page)


async def app_js(request: Request) -> Response:
    """The page's own script, same-origin: proves scripts run at all (so a blocked one means CSP)."""
    script = (
        'window.appScript = "ran"; document.addEventListener("DOMContentLoaded", () => '
        '{ document.body.insertAdjacentHTML("beforeend", "<p>(the page\'s own script ran)</p>"); });'
    )
    return Response(script, media_type="text/javascript")


def xss_app() -> Starlette:
    return Starlette(routes=[Route("/greet", greet), Route("/static/app.js", app_js)])


def docs_app() -> FastAPI:
    """The reference API's ``/docs`` (Swagger UI from the package, nonce'd) on a bare FastAPI app."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/api/v1/widgets", summary="List widgets")
    async def widgets() -> list[dict[str, Any]]:
        return []

    mount_docs(api)
    return api


class ReplaceCsp:
    """A misconfigured proxy: one ``Content-Security-Policy`` for every response, nonce or not."""

    def __init__(self, app: ASGIApp, policy: str) -> None:
        self.app = app
        self.policy = policy.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_replaced(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != b"content-security-policy"]
                message["headers"] = [*headers, (b"content-security-policy", self.policy)]
            await send(message)

        await self.app(scope, receive, send_replaced)
