"""docs/frameworks/fastapi.md, served: tests/frameworks/apps/fastapi_app.py under uvicorn.

Beyond the common checks: FastAPI's own validation errors and ``HTTPException`` details come out in
the §8 shape through the handlers ``protect`` installs (``thallus.errors.install_error_handlers``),
and the application is protected in place, so its own name serves it protected too.
"""

from __future__ import annotations

import httpx

from tests.frameworks.conformance import Conformance, assert_error, assert_protected
from tests.frameworks.support import serving


class TestFastAPI(Conformance):
    target = "tests.frameworks.apps.fastapi_app:app"

    def test_validation_error_is_a_422_with_fields(self, client: httpx.Client) -> None:
        body = assert_error(client.post("/items", json={"name": 5}), 422, "ValidationError")
        assert [item["loc"] for item in body["details"]] == [["body", "name"]]
        assert set(body["details"][0]) == {"type", "loc", "msg", "input"}

    def test_malformed_json_is_a_400(self, client: httpx.Client) -> None:
        response = client.post("/items", content=b'{"name": ', headers={"Content-Type": "application/json"})
        assert_error(response, 400, "BadRequestError")

    def test_path_parameter_validation_is_a_422(self, client: httpx.Client) -> None:
        body = assert_error(client.get("/items/seven"), 422, "ValidationError")
        assert body["details"][0]["loc"] == ["path", "item_id"]

    def test_http_exception_keeps_its_message(self, client: httpx.Client) -> None:
        body = assert_error(client.get("/items/7"), 404, "NotFoundError")
        assert body["message"] == "No item 7."


def test_the_application_object_itself_is_protected() -> None:
    with serving("tests.frameworks.apps.fastapi_app:api") as server, httpx.Client(base_url=server.url) as client:
        assert_error(client.get("/nowhere"), 404, "NotFoundError")
        assert_protected(client.get("/items"))
