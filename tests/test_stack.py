"""The whole core stack, ``protect(app, settings)``: every header/status pair, on three kinds of app.

Every response — 2xx, 404, 405, 401, 403 (app, CSRF, CORS), 500 from a crash, preflights, streaming,
HEAD — carries every security header exactly once and the correlation ID, and every error is the §8
JSON shape whose ``correlation_id`` equals the header; an allowed origin can read all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from tests.apps import ok_app, starlette_app
from tests.asgi import Response, call, websocket_handshake, websocket_scope
from thallus import Settings, protect
from thallus._asgi import ASGIApp, Receive, Scope, Send

SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"
SECRET = "k" * 48

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "1; mode=block",
    "referrer-policy": "strict-origin-when-cross-origin",
    "strict-transport-security": "max-age=31536000",
    "content-security-policy": "default-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; "
    "form-action 'self'",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-site",
    "x-permitted-cross-domain-policies": "none",
}


def production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "production",
        "allowed_origins": SPA,
        "public_origin": PUBLIC,
    }
    values.update(overrides)
    return Settings(**values)


class Widget(BaseModel):
    name: str
    password: str


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.api_route("/items", methods=["GET", "HEAD"])  # FastAPI answers HEAD only when asked to
    async def items() -> dict[str, Any]:
        return {"items": []}

    @app.post("/items", status_code=201)
    async def create(widget: Widget) -> dict[str, Any]:
        return {"created": widget.name}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    return app


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Plain ASGI: /items answers, anything else is a text 404, /boom crashes."""
    if scope["type"] != "http":
        await ok_app(scope, receive, send)
        return
    if scope["path"] == "/boom":
        raise RuntimeError("kaboom")
    if scope["path"] == "/items":
        await ok_app(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"Not Found"})


APPS: dict[str, Callable[[], ASGIApp]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "plain": lambda: plain_app,
}


def assert_protected(response: Response, *, origin_allowed: bool = False, preflight: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.values(name) == [value], f"{name} on {response.status}"
    assert response.header("permissions-policy") is not None
    correlation_id = response.header("x-correlation-id")
    assert correlation_id
    assert response.header("server") is None
    names = response.names()
    assert len(names) == len(set(names)), f"duplicated headers: {names}"
    if response.status >= 400:
        assert response.header("content-type") == "application/json"
        body = response.json()
        assert set(body) == {"error", "message", "details", "correlation_id"}
        assert body["correlation_id"] == correlation_id
        assert response.header("cache-control") == "no-store"
    if origin_allowed:
        assert response.header("access-control-allow-origin") == SPA
        assert response.header("access-control-allow-credentials") == "true"
        if not preflight:
            assert "X-Correlation-ID" in (response.header("access-control-expose-headers") or "")
    else:
        assert response.header("access-control-allow-origin") is None


@pytest.fixture(params=list(APPS))
def protected(request: pytest.FixtureRequest) -> ASGIApp:
    return protect(APPS[request.param](), production())


CASES: list[tuple[str, str, str, list[tuple[str, str]], int, str | None]] = [
    # id, method, path, headers, status, error
    ("2xx", "GET", "/items", [], 200, None),
    ("HEAD", "HEAD", "/items", [], 200, None),
    ("404", "GET", "/nowhere", [], 404, "NotFoundError"),
    ("500", "GET", "/boom", [], 500, "InternalServerError"),
    ("CSRF 403", "POST", "/items", [("cookie", "refresh=1"), ("origin", "https://evil.com")], 403, "CSRFError"),
    ("CSRF 403 no evidence", "DELETE", "/items", [("cookie", "refresh=1")], 403, "CSRFError"),
    ("CORS preflight 403", "OPTIONS", "/items", [("origin", "https://evil.com"), ("access-control-request-method", "POST")], 403, "CORSError"),
    ("CORS preflight 204", "OPTIONS", "/items", [("origin", SPA), ("access-control-request-method", "POST")], 204, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_path_is_protected(
    protected: ASGIApp, method: str, path: str, headers: list[tuple[str, str]], status: int, error: str | None
) -> None:
    response = call(protected, method, path, headers)
    assert response.status == status
    assert response.exception is None
    allowed = any(value == SPA for name, value in headers if name == "origin")
    assert_protected(response, origin_allowed=allowed and status != 403, preflight=method == "OPTIONS")
    if error:
        assert response.json()["error"] == error


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/items", [], 200),
        ("GET", "/nowhere", [], 404),
        ("GET", "/boom", [], 500),
        ("POST", "/items", [("cookie", "r=1"), ("content-type", "application/json")], None),
    ],
)
def test_allowed_origin_can_read_every_response(
    protected: ASGIApp, method: str, path: str, headers: list[tuple[str, str]], status: int | None
) -> None:
    response = call(protected, method, path, [("origin", SPA), *headers], body=b'{"name": "w", "password": "p"}')
    if status is not None:
        assert response.status == status
    assert_protected(response, origin_allowed=True)


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_405_from_routing(kind: str) -> None:
    response = call(protect(APPS[kind](), production()), "TRACE", "/items", [("origin", SPA)])
    assert response.status == 405
    assert_protected(response, origin_allowed=True)
    assert response.json()["error"] == "MethodNotAllowedError"
    assert "GET" in response.json()["details"]["allowed_methods"]
    assert response.header("allow") is not None


def test_streaming_response_is_protected() -> None:
    response = call(protect(starlette_app(), production()), "GET", "/stream", [("origin", SPA)])
    assert response.body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert_protected(response, origin_allowed=True)


@pytest.mark.parametrize("path", ["/unauthorized", "/forbidden"])
def test_app_401_and_403_are_protected(path: str) -> None:
    response = call(protect(starlette_app(), production()), "GET", path)
    assert response.status in {401, 403}
    for name, value in SECURITY_HEADERS.items():
        assert response.values(name) == [value]
    assert response.header("cache-control") == "no-store"


def test_client_correlation_id_reaches_the_error_body(protected: ASGIApp) -> None:
    response = call(protected, "GET", "/boom", [("x-correlation-id", "support-ticket-42")])
    assert response.header("x-correlation-id") == "support-ticket-42"
    assert response.json()["correlation_id"] == "support-ticket-42"


def test_production_500_hides_the_exception(protected: ASGIApp) -> None:
    body = call(protected, "GET", "/boom").json()
    assert body["details"] is None and "kaboom" not in str(body)


def test_development_500_names_it() -> None:
    body = call(protect(plain_app, Settings(env="development")), "GET", "/boom").json()
    assert body["details"] == {"exception": "RuntimeError", "message": "kaboom"}


def test_development_profile_has_no_hsts_and_lets_tools_post() -> None:
    app = protect(plain_app, Settings())
    response = call(app, "POST", "/items", [("cookie", "r=1")])
    assert response.status == 200
    assert response.header("strict-transport-security") is None
    assert call(app, "POST", "/items", [("cookie", "r=1"), ("origin", "https://evil.com")]).status == 403


def test_same_origin_browser_post_passes(protected: ASGIApp) -> None:
    headers = [
        ("cookie", "r=1"),
        ("sec-fetch-site", "same-origin"),
        ("origin", PUBLIC),
        ("content-type", "application/json"),
    ]
    response = call(protected, "POST", "/items", headers, body=b'{"name": "w", "password": "p"}')
    assert response.status in {200, 201}


def test_fastapi_validation_error_is_shaped_and_redacted() -> None:
    app = protect(fastapi_app(), production())
    body = b'{"name": 5, "password": "hunter2-secret"}'
    response = call(app, "POST", "/items", [("content-type", "application/json")], body=body)
    assert response.status == 422
    assert_protected(response)
    payload = response.json()
    assert payload["error"] == "ValidationError"
    assert payload["details"][0]["loc"] == ["body", "name"]
    assert set(payload["details"][0]) == {"type", "loc", "msg", "input"}
    assert "hunter2" not in response.body.decode()


def test_fastapi_missing_password_field_never_echoes_the_body() -> None:
    app = protect(fastapi_app(), production())
    response = call(app, "POST", "/items", [("content-type", "application/json")], body=b'{"password": "hunter2-x"}')
    assert response.status == 422
    assert "hunter2" not in response.body.decode()


def test_fastapi_bad_json_is_a_400() -> None:
    app = protect(fastapi_app(), production())
    response = call(app, "POST", "/items", [("content-type", "application/json")], body=b'{"password": "hunter2-x", ')
    assert response.status == 400
    assert_protected(response)
    assert response.json()["error"] == "BadRequestError"
    assert response.json()["details"][0]["type"] == "json_invalid"
    assert "hunter2" not in response.body.decode()


def test_api_key_layer_plugs_in_before_csrf() -> None:
    """The hand-off: an inner layer that verified a key marks the scope; CSRF then exempts it."""
    from thallus.csrf import mark_api_key_authenticated

    def verify_keys(app: ASGIApp) -> ASGIApp:
        async def layer(scope: Scope, receive: Receive, send: Send) -> None:
            if (b"x-api-key", b"thal_valid") in scope["headers"]:
                mark_api_key_authenticated(scope)
            await app(scope, receive, send)

        return layer

    app = protect(plain_app, production(), inner=[verify_keys])
    cross_site = [("cookie", "r=1"), ("origin", "https://evil.com")]
    assert call(app, "POST", "/items", [*cross_site, ("x-api-key", "thal_valid")]).status == 200
    assert call(app, "POST", "/items", [*cross_site, ("x-api-key", "thal_forged")]).status == 403


def test_websocket_through_the_stack() -> None:
    app = protect(plain_app, production())
    refused = websocket_handshake(app, websocket_scope(headers=[("cookie", "r=1"), ("origin", "https://evil.com")]))
    start = refused[0]
    assert start["type"] == "websocket.http.response.start" and start["status"] == 403
    names = [name for name, _ in start["headers"]]
    assert b"x-correlation-id" in names and b"x-frame-options" in names
    accepted = websocket_handshake(app, websocket_scope(headers=[("cookie", "r=1"), ("origin", SPA)]))
    assert accepted[0]["type"] == "websocket.accept"
    assert any(name == b"x-correlation-id" for name, _ in accepted[0]["headers"])


def test_protect_reads_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THALLUS_ENV", "production")
    monkeypatch.setenv("THALLUS_SECRET_KEY", SECRET)
    monkeypatch.setenv("THALLUS_ALLOWED_ORIGINS", SPA)
    monkeypatch.setenv("THALLUS_PUBLIC_ORIGIN", PUBLIC)
    response = call(protect(plain_app), "GET", "/items")
    assert response.header("strict-transport-security") == "max-age=31536000"
