"""docs/frameworks/asgi.md, served: tests/frameworks/apps/asgi_app.py under uvicorn.

A plain ASGI application answers its errors in plain text (and crashes on ``/boom``); the common
checks show the error boundary turning each into the §8 shape, the ``Allow`` header kept.
"""

from __future__ import annotations

import httpx

from tests.frameworks.conformance import Conformance, assert_error


class TestPlainASGI(Conformance):
    target = "tests.frameworks.apps.asgi_app:app"

    def test_405_names_every_allowed_method(self, client: httpx.Client) -> None:
        body = assert_error(client.put("/items"), 405, "MethodNotAllowedError")
        assert body["details"] == {"allowed_methods": ["GET", "POST"]}
