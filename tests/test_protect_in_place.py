"""``protect(app)`` on a Starlette or FastAPI application protects it in place and returns it.

With the README's naming (``api = FastAPI()``, ``app = protect(api)``), every way of serving the
module — ``uvicorn main:api``, ``uvicorn main:app``, ``fastapi run`` (which picks ``app``, or
``api`` with ``--app api``) — must serve the protected application: security headers, a refused
foreign-origin cookie POST, a JSON 500 with the correlation ID. Before the change, ``main:api`` and
``fastapi run --app api`` served the bare app (no headers, the cookie POST answered 200).
"""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.asgi import call
from tests.server import free_port, serving
from thallus import Settings, protect
from thallus._asgi import Receive, Scope, Send
from thallus.stack import ProtectedApp, protection

SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"
FOREIGN = "https://evil.example"

MODULE = f'''
from fastapi import FastAPI
from thallus import Settings, protect

api = FastAPI()


@api.get("/items")
async def items() -> dict[str, list[str]]:
    return {{"items": []}}


@api.post("/items")
async def create() -> dict[str, bool]:
    return {{"created": True}}


@api.get("/boom")
async def boom() -> None:
    raise RuntimeError("the application failed")


app = protect(api, Settings(env="production", allowed_origins=("{SPA}",), public_origin="{PUBLIC}"))
'''


def settings() -> Settings:
    return Settings(env="production", allowed_origins=(SPA,), public_origin=PUBLIC, rate_limit_enabled=False)


def fastapi_app() -> FastAPI:
    api = FastAPI()

    @api.get("/items")
    async def items() -> dict[str, list[str]]:
        return {"items": []}

    @api.post("/items")
    async def create() -> dict[str, bool]:
        return {"created": True}

    @api.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="no such item")

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the application failed")

    return api


def test_a_starlette_or_fastapi_app_is_returned_itself_and_protected() -> None:
    api = fastapi_app()
    protected = protect(api, settings())
    assert protected is api
    assert isinstance(protection(api), ProtectedApp)
    response = call(api, "GET", "/items")
    assert response.status == 200
    assert response.header("x-content-type-options") == "nosniff"
    assert response.header("x-frame-options") == "DENY"
    assert response.header("x-correlation-id")


def test_any_other_asgi_app_is_wrapped() -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = protect(plain, settings())
    assert isinstance(wrapped, ProtectedApp)
    assert protection(wrapped) is wrapped
    assert call(wrapped, "GET", "/").header("x-content-type-options") == "nosniff"


def test_protecting_twice_is_refused_and_an_unprotected_app_has_no_protection() -> None:
    api = fastapi_app()
    with pytest.raises(LookupError):
        protection(api)
    protect(api, settings())
    with pytest.raises(ValueError, match="already applied"):
        protect(api, settings())


def test_a_foreign_origin_cookie_post_is_refused_in_place() -> None:
    api = protect(fastapi_app(), settings())
    refused = call(
        api, "POST", "/items", [("origin", FOREIGN), ("cookie", "session=1"), ("sec-fetch-site", "cross-site")]
    )
    assert refused.status == 403
    assert refused.json()["error"] == "CSRFError"
    assert refused.json()["correlation_id"] == refused.header("x-correlation-id")
    allowed = call(api, "POST", "/items", [("origin", SPA), ("cookie", "session=1"), ("sec-fetch-site", "same-site")])
    assert allowed.status == 200


def test_the_apps_own_errors_and_crashes_get_the_json_shape_with_the_correlation_id() -> None:
    api = protect(fastapi_app(), settings())
    for path, status in (("/missing", 404), ("/nowhere", 404), ("/boom", 500)):
        response = call(api, "GET", path)
        assert response.status == status, path
        assert (response.header("content-type") or "").startswith("application/json"), path
        assert response.json()["correlation_id"] == response.header("x-correlation-id"), path
        assert response.header("x-content-type-options") == "nosniff", path
    wrong_method = call(api, "DELETE", "/items")
    assert wrong_method.status == 405
    assert wrong_method.json()["correlation_id"] == wrong_method.header("x-correlation-id")


def test_middleware_added_after_protect_runs_inside_the_layers() -> None:
    """Ours stay outermost: a crash in middleware the app adds later still gets the JSON 500 and
    the headers, never Starlette's ServerErrorMiddleware's plain-text one."""

    class Crash(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            if request.url.path == "/crash-in-middleware":
                raise RuntimeError("middleware failed")
            response: Response = await call_next(request)
            response.headers["x-added-later"] = "1"
            return response

    api = protect(fastapi_app(), settings())
    api.add_middleware(Crash)
    assert call(api, "GET", "/items").header("x-added-later") == "1"
    crashed = call(api, "GET", "/crash-in-middleware")
    assert crashed.status == 500
    assert (crashed.header("content-type") or "").startswith("application/json")
    assert crashed.json()["correlation_id"] == crashed.header("x-correlation-id")
    assert crashed.header("x-content-type-options") == "nosniff"


def test_a_starlette_app_whose_stack_was_built_already_is_rebuilt_through_the_layers() -> None:
    async def items(request: Request) -> JSONResponse:
        return JSONResponse({"items": []})

    app = Starlette(routes=[Route("/items", items)])
    assert call(app, "GET", "/items").header("x-content-type-options") is None  # built, unprotected
    protect(app, settings())
    assert call(app, "GET", "/items").header("x-content-type-options") == "nosniff"


# -- served: every way of pointing a server at the module -------------------------------------


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("readme_app")
    (directory / "main.py").write_text(MODULE)
    return directory


COMMANDS = {
    "uvicorn main:api": lambda port: [sys.executable, "-m", "uvicorn", "main:api", "--port", str(port)],
    "uvicorn main:app": lambda port: [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)],
    "fastapi run main.py": lambda port: [
        str(Path(sys.executable).parent / "fastapi"),
        "run",
        "main.py",
        "--port",
        str(port),
    ],
    "fastapi run main.py --app api": lambda port: [
        str(Path(sys.executable).parent / "fastapi"),
        "run",
        "main.py",
        "--app",
        "api",
        "--port",
        str(port),
    ],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_way_of_serving_the_readme_module_serves_the_protected_app(command: str, module_dir: Path) -> None:
    port = free_port()
    for url in serving(COMMANDS[command](port), module_dir, f"http://127.0.0.1:{port}"):
        ok = httpx.get(url + "/items", timeout=10)
        assert ok.status_code == 200
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert ok.headers["strict-transport-security"].startswith("max-age=")
        assert ok.headers["x-correlation-id"]
        refused = httpx.post(
            url + "/items",
            headers={"Origin": FOREIGN, "Cookie": "session=1", "Sec-Fetch-Site": "cross-site"},
            timeout=10,
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "CSRFError"
        crashed = httpx.get(url + "/boom", timeout=10)
        assert crashed.status_code == 500
        assert crashed.json()["correlation_id"] == crashed.headers["x-correlation-id"]


def test_a_wrapped_app_is_not_wrapped_again() -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")

    wrapped = protect(plain, settings())
    with pytest.raises(ValueError, match="already applied"):
        protect(wrapped, settings())


def test_a_protected_application_is_freed_like_any_other() -> None:
    """Nothing global keeps a protected application (or its layers) alive."""
    api = protect(fastapi_app(), settings())
    assert call(api, "GET", "/items").status == 200
    alive = weakref.ref(api)
    del api
    gc.collect()
    assert alive() is None
