"""What every framework behind ``protect()`` must show a client, over a real socket (docs/frameworks/).

A test module subclasses :class:`Conformance` with the ``module:attribute`` of its app in
tests/frameworks/apps; the app is started once per class (:func:`tests.frameworks.support.serving`).
Each app answers ``GET /items`` (200 JSON), ``POST /items`` (``{"name"}`` → ``{"created": name}``),
``GET /boom`` (raises); an unknown path is the framework's own 404 and ``DELETE /items`` its own 405.
Every response carries the security headers (each exactly once) and a valid correlation ID; every
error is the §8 JSON whose ``correlation_id`` equals the header; a cookie POST is refused from a
foreign origin and served from the allowlisted one; an allowlisted preflight is answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from tests.frameworks.support import FOREIGN, SPA, serving
from tests.server import Server
from thallus.correlation import is_valid_correlation_id

#: The test profile's header set (no HSTS outside production), each value exact.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "1; mode=block",
    "referrer-policy": "strict-origin-when-cross-origin",
    "content-security-policy": "default-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; "
    "form-action 'self'",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-site",
    "x-permitted-cross-domain-policies": "none",
}
ERROR_KEYS = {"error", "message", "details", "correlation_id"}
COOKIE = "session=opaque-session-id"
CLIENT_ID = "ticket-42.retry:1"


def assert_protected(response: httpx.Response, *, allowed_origin: bool = False) -> str:
    """The security headers, each once, no ``Server`` header, one valid correlation ID (returned),
    and the CORS headers exactly when the request came from the allowlisted origin."""
    headers = response.headers
    for name, value in SECURITY_HEADERS.items():
        assert headers.get_list(name) == [value], f"{name} on a {response.status_code}: {headers.get_list(name)}"
    assert len(headers.get_list("permissions-policy")) == 1
    assert "strict-transport-security" not in headers, "HSTS is for production only"
    assert "server" not in headers
    assert "x-powered-by" not in headers
    correlation_ids = headers.get_list("x-correlation-id")
    assert len(correlation_ids) == 1, correlation_ids
    assert is_valid_correlation_id(correlation_ids[0])
    if allowed_origin:
        assert headers.get_list("access-control-allow-origin") == [SPA]
        assert headers.get("access-control-allow-credentials") == "true"
    else:
        assert "access-control-allow-origin" not in headers
    return correlation_ids[0]


def assert_error(response: httpx.Response, status: int, error: str, *, allowed_origin: bool = False) -> dict[str, Any]:
    """A §8 error: the status, JSON of exactly the four keys, ``error`` as named, the header's
    correlation ID in the body, ``Cache-Control: no-store``; the body is returned."""
    assert response.status_code == status, response.text
    correlation_id = assert_protected(response, allowed_origin=allowed_origin)
    assert response.headers["content-type"].split(";")[0].strip() == "application/json"
    assert response.headers.get("cache-control") == "no-store"
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"], body
    assert body["correlation_id"] == correlation_id, body
    return body


class Conformance:
    """The checks every framework page promises; subclasses name the app with :attr:`target`."""

    target: ClassVar[str]

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls) -> Iterator[Server]:
        with serving(cls.target) as server:
            yield server

    @pytest.fixture
    def client(self, server: Server) -> Iterator[httpx.Client]:
        """A fresh client per test: no cookie a response set reaches the next test."""
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client

    # -- every status carries the headers; every error is the §8 shape -------------------------

    def test_200(self, client: httpx.Client) -> None:
        response = client.get("/items")
        assert response.status_code == 200
        assert response.json() == {"items": []}
        assert_protected(response)
        assert "no-store" not in response.headers.get("cache-control", "")

    def test_404_is_the_error_shape(self, client: httpx.Client) -> None:
        assert_error(client.get("/nowhere"), 404, "NotFoundError")

    def test_405_is_the_error_shape_and_keeps_allow(self, client: httpx.Client) -> None:
        response = client.delete("/items")
        body = assert_error(response, 405, "MethodNotAllowedError")
        allow = [method.strip() for method in response.headers["allow"].split(",")]
        assert "GET" in allow  # Starlette names only the first route of a path: not always POST too
        assert body["details"] == {"allowed_methods": allow}

    def test_500_is_the_error_shape_and_hides_the_exception(self, client: httpx.Client) -> None:
        response = client.get("/boom")
        body = assert_error(response, 500, "InternalServerError")
        assert body["details"] is None
        assert "kaboom" not in response.text and "Traceback" not in response.text

    @pytest.mark.parametrize(("path", "status"), [("/nowhere", 404), ("/boom", 500)])
    def test_errors_are_readable_by_the_allowed_origin(self, client: httpx.Client, path: str, status: int) -> None:
        response = client.get(path, headers={"Origin": SPA})
        assert_error(response, status, "NotFoundError" if status == 404 else "InternalServerError", allowed_origin=True)
        assert "X-Correlation-ID" in response.headers["access-control-expose-headers"]

    # -- CSRF: cookie-carrying unsafe requests need a trusted origin ----------------------------

    def test_cookie_post_from_a_foreign_origin_is_refused(self, client: httpx.Client) -> None:
        response = client.post("/items", json={"name": "widget"}, headers={"Cookie": COOKIE, "Origin": FOREIGN})
        body = assert_error(response, 403, "CSRFError")
        assert body["details"] == {"reason": "Origin is not a trusted origin", "origin": FOREIGN}

    def test_cookie_post_without_origin_evidence_is_refused(self, client: httpx.Client) -> None:
        response = client.post("/items", json={"name": "widget"}, headers={"Cookie": COOKIE})
        body = assert_error(response, 403, "CSRFError")
        assert body["details"]["reason"] == "no Sec-Fetch-Site, Origin or Referer header"

    def test_cookie_post_from_the_allowed_origin_is_served(self, client: httpx.Client) -> None:
        response = client.post("/items", json={"name": "widget"}, headers={"Cookie": COOKIE, "Origin": SPA})
        assert response.status_code == 200, response.text
        assert response.json() == {"created": "widget"}
        assert_protected(response, allowed_origin=True)
        assert "X-Correlation-ID" in response.headers["access-control-expose-headers"]

    # -- CORS preflights are answered before the framework routes them --------------------------

    def test_allowed_preflight(self, client: httpx.Client) -> None:
        response = client.options(
            "/items",
            headers={
                "Origin": SPA,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-correlation-id",
            },
        )
        assert response.status_code == 204, response.text
        assert_protected(response, allowed_origin=True)
        assert "POST" in {method.strip() for method in response.headers["access-control-allow-methods"].split(",")}
        allowed_headers = {name.strip().lower() for name in response.headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "x-correlation-id"} <= allowed_headers
        assert response.content == b""

    def test_foreign_preflight_is_refused_without_cors_headers(self, client: httpx.Client) -> None:
        response = client.options("/items", headers={"Origin": FOREIGN, "Access-Control-Request-Method": "POST"})
        assert_error(response, 403, "CORSError")
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]

    # -- correlation IDs --------------------------------------------------------------------

    @pytest.mark.parametrize("path", ["/items", "/nowhere", "/boom"])
    def test_client_correlation_id_is_echoed(self, client: httpx.Client, path: str) -> None:
        response = client.get(path, headers={"X-Correlation-ID": CLIENT_ID})
        assert assert_protected(response) == CLIENT_ID
        if response.status_code >= 400:
            assert response.json()["correlation_id"] == CLIENT_ID

    def test_invalid_correlation_id_is_replaced(self, client: httpx.Client) -> None:
        response = client.get("/items", headers={"X-Correlation-ID": "not valid!"})
        assert assert_protected(response) != "not valid!"

    def test_every_response_gets_its_own_correlation_id(self, client: httpx.Client) -> None:
        first, second = client.get("/items"), client.get("/items")
        assert first.headers["x-correlation-id"] != second.headers["x-correlation-id"]


def wait_for_output(server: Server, *needles: str, timeout: float = 10.0) -> str:
    """The first line the server wrote (so far or within ``timeout``) containing every needle;
    its output is read by a thread, so a line logged before a response may arrive just after it."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(server.lines):
            if all(needle in line for needle in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no output line with {needles!r}; output:\n{''.join(server.lines)[-4000:]}")
        time.sleep(0.02)
