"""docs/frameworks/starlette.md, served: tests/frameworks/apps/starlette_app.py under uvicorn.

Beyond the common checks: Starlette's ``HTTPException`` keeps its detail as the §8 message through
the handlers ``protect`` installs (``thallus.errors.install_error_handlers``).
"""

from __future__ import annotations

import httpx

from tests.frameworks.conformance import Conformance, assert_error


class TestStarlette(Conformance):
    target = "tests.frameworks.apps.starlette_app:app"

    def test_http_exception_keeps_its_message(self, client: httpx.Client) -> None:
        body = assert_error(client.get("/items/7"), 404, "NotFoundError")
        assert body["message"] == "No item 7."

    def test_405_names_every_method_of_the_route(self, client: httpx.Client) -> None:
        body = assert_error(client.delete("/items"), 405, "MethodNotAllowedError")
        assert {"GET", "POST"} <= set(body["details"]["allowed_methods"])
