"""docs/frameworks/litestar.md, served: tests/frameworks/apps/litestar_app.py under uvicorn.

Litestar answers its own errors as JSON of its own shape, which the error boundary keeps: the common
checks (404, 405, 500 in the §8 shape) pass only through ``thallus.integrations.litestar``'s
handlers. Beyond them: validation and decoding errors, an ``HTTPException``'s detail, the crash
logged (Litestar logs exceptions only in debug mode), and, in process, a raised ``ThallusError`` and
the development profile's details.
"""

from __future__ import annotations

import httpx
from litestar import Litestar, get
from litestar.exceptions import ValidationException

from tests.asgi import call
from tests.frameworks.conformance import Conformance, assert_error, wait_for_output
from tests.server import Server
from thallus import Settings, protect
from thallus._asgi import ASGIApp
from thallus.errors import ConflictError
from thallus.integrations.litestar import exception_handlers


class TestLitestar(Conformance):
    target = "tests.frameworks.apps.litestar_app:app"

    def test_validation_error_is_a_422_with_fields(self, client: httpx.Client) -> None:
        body = assert_error(client.post("/items", json={"name": 5}), 422, "ValidationError")
        assert body["message"] == "The request is invalid."
        assert body["details"] == [
            {"type": "value_error", "loc": ["body", "name"], "msg": "Expected `str`, got `int`", "input": None}
        ]

    def test_validation_message_never_echoes_the_query(self, client: httpx.Client) -> None:
        response = client.post("/items?token=secret-in-query", json={"name": 5})
        assert_error(response, 422, "ValidationError")
        assert "secret-in-query" not in response.text  # Litestar's own detail names the path and query

    def test_malformed_json_is_a_400(self, client: httpx.Client) -> None:
        response = client.post("/items", content=b'{"name": ', headers={"Content-Type": "application/json"})
        body = assert_error(response, 400, "BadRequestError")
        assert body["details"][0]["type"] == "json_invalid"

    def test_http_exception_keeps_its_detail(self, client: httpx.Client) -> None:
        body = assert_error(client.get("/items/7"), 404, "NotFoundError")
        assert body["message"] == "No item 7."

    def test_crash_is_logged_with_its_traceback(self, client: httpx.Client, server: Server) -> None:
        assert_error(client.get("/boom"), 500, "InternalServerError")
        wait_for_output(server, "unhandled exception: RuntimeError")
        wait_for_output(server, "RuntimeError: kaboom")


def in_process(settings: Settings) -> ASGIApp:
    @get("/conflict")
    async def conflict() -> None:
        raise ConflictError("That name is taken.", details={"name": "widget"})

    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    api = Litestar([conflict, boom], exception_handlers=exception_handlers(settings))
    protected: ASGIApp = protect(api, settings)
    return protected


def test_raised_thallus_error_keeps_its_status_and_shape() -> None:
    response = call(in_process(Settings(env="development")), "GET", "/conflict")
    assert response.status == 409
    assert response.json() == {
        "error": "ConflictError",
        "message": "That name is taken.",
        "details": {"name": "widget"},
        "correlation_id": response.header("x-correlation-id"),
    }


def test_development_500_names_the_exception() -> None:
    response = call(in_process(Settings(env="development")), "GET", "/boom")
    assert response.status == 500
    assert response.json()["details"] == {"exception": "RuntimeError", "message": "kaboom"}


def test_an_applications_validation_exception_keeps_its_message() -> None:
    @get("/check")
    async def check() -> None:
        raise ValidationException("That name is reserved.", extra=[{"message": "reserved", "key": "name"}])

    settings = Settings(env="development")
    api = Litestar([check], exception_handlers=exception_handlers(settings))
    response = call(protect(api, settings), "GET", "/check")
    assert response.status == 422
    body = response.json()
    assert body["message"] == "That name is reserved."
    assert body["details"] == [{"type": "value_error", "loc": ["name"], "msg": "reserved", "input": None}]
