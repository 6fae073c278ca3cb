"""docs/frameworks/quart.md, served: tests/frameworks/apps/quart_app.py under uvicorn.

Quart answers its errors with HTML pages, which the error boundary rewrites to the §8 shape (the
common checks). Beyond them, through ``thallus.integrations.quart.install_error_handlers``:
``abort()``'s description is the message, and, in process, a raised ``ThallusError`` keeps its status
while a handler the application registered itself is kept.
"""

from __future__ import annotations

from typing import Any

import httpx
from quart import Quart
from werkzeug.exceptions import HTTPException

from tests.asgi import call
from tests.frameworks.conformance import Conformance, assert_error
from thallus import Settings, protect
from thallus.errors import ConflictError
from thallus.integrations.quart import install_error_handlers


class TestQuart(Conformance):
    target = "tests.frameworks.apps.quart_app:app"

    def test_abort_keeps_its_description(self, client: httpx.Client) -> None:
        body = assert_error(client.get("/items/7"), 404, "NotFoundError")
        assert body["message"] == "No item 7."

    def test_abort_400_keeps_its_description(self, client: httpx.Client) -> None:
        body = assert_error(client.post("/items", json=["widget"]), 400, "BadRequestError")
        assert body["message"] == "The body must be a JSON object with a string 'name'."

    def test_malformed_json_is_a_400(self, client: httpx.Client) -> None:
        response = client.post("/items", content=b'{"name": ', headers={"Content-Type": "application/json"})
        assert_error(response, 400, "BadRequestError")


def test_raised_thallus_error_keeps_its_status_and_shape() -> None:
    api = Quart(__name__)
    install_error_handlers(api)

    @api.get("/conflict")
    async def conflict() -> dict[str, Any]:
        raise ConflictError("That name is taken.", details={"name": "widget"})

    response = call(protect(api, Settings(env="development")), "GET", "/conflict")
    assert response.status == 409
    assert response.json() == {
        "error": "ConflictError",
        "message": "That name is taken.",
        "details": {"name": "widget"},
        "correlation_id": response.header("x-correlation-id"),
    }


def test_the_applications_own_handler_is_kept() -> None:
    api = Quart(__name__)

    @api.errorhandler(HTTPException)
    async def mine(exc: HTTPException) -> tuple[dict[str, Any], int]:
        return {"error": "Mine", "message": "mine", "details": None, "correlation_id": None}, exc.code or 500

    install_error_handlers(api)
    response = call(protect(api, Settings(env="development")), "GET", "/nowhere")
    assert response.status == 404
    assert response.json()["error"] == "Mine"
