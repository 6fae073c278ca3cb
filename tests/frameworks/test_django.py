"""docs/frameworks/django.md, served: tests/frameworks/apps/django_app.py under uvicorn.

The project keeps Django's ``CsrfViewMiddleware``, as a real one does, so two CSRF checks meet:
Thallus' origin check runs first on every cookie-carrying unsafe request; Django's token check runs
after it on every unsafe request to a view that is not ``csrf_exempt`` — cookies or not. ``/items``
(the JSON API) is exempt; ``/form`` is not. Django's refusals come out as ``403 CSRFError`` with
Django's reason (``CSRF_FAILURE_VIEW = "thallus.integrations.django.csrf_failure"``), not as its
HTML page, and its crash log line carries the client's correlation ID.
"""

from __future__ import annotations

import json

import httpx

from tests.frameworks.conformance import COOKIE, Conformance, assert_error, assert_protected, wait_for_output
from tests.frameworks.support import FOREIGN, SPA
from tests.server import Server


def csrf_token(client: httpx.Client) -> tuple[str, str]:
    """What a form page hands out: the ``csrftoken`` cookie's value and the (masked) token."""
    response = client.get("/form")
    assert response.status_code == 200
    cookie = response.cookies["csrftoken"]
    token: str = response.json()["csrf_token"]
    return cookie, token


class TestDjango(Conformance):
    target = "tests.frameworks.apps.django_app:application"

    def test_django_refusal_is_a_csrf_error_with_djangos_reason(self, client: httpx.Client) -> None:
        """An allowed origin passes Thallus; the form view still needs Django's token."""
        response = client.post("/form", headers={"Cookie": COOKIE, "Origin": SPA})
        body = assert_error(response, 403, "CSRFError", allowed_origin=True)
        assert body["details"] == {"reason": "CSRF cookie not set.", "origin": SPA}
        assert body["message"] == "Cross-site request refused: CSRF cookie not set."

    def test_token_check_applies_without_cookies_too(self, client: httpx.Client) -> None:
        """Thallus exempts a request without cookies (a script with a Bearer token); Django does not:
        why JSON API views are csrf_exempt."""
        response = client.post("/form", headers={"Authorization": "Bearer opaque"})
        body = assert_error(response, 403, "CSRFError")
        assert body["details"] == {"reason": "CSRF cookie not set.", "origin": None}

    def test_form_post_with_token_from_the_allowed_origin_passes_both(self, client: httpx.Client) -> None:
        """Django's own Origin check passes too: CSRF_TRUSTED_ORIGINS is Thallus' trusted origins."""
        cookie, token = csrf_token(client)
        headers = {"Cookie": f"csrftoken={cookie}; {COOKIE}", "X-CSRFToken": token, "Origin": SPA}
        response = client.post("/form", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"accepted": True}
        assert_protected(response, allowed_origin=True)

    def test_foreign_origin_with_a_valid_token_is_refused_by_thallus_first(self, client: httpx.Client) -> None:
        cookie, token = csrf_token(client)
        headers = {"Cookie": f"csrftoken={cookie}", "X-CSRFToken": token, "Origin": FOREIGN}
        body = assert_error(client.post("/form", headers=headers), 403, "CSRFError")
        assert body["details"] == {"reason": "Origin is not a trusted origin", "origin": FOREIGN}

    def test_djangos_headers_are_replaced_not_doubled(self, client: httpx.Client) -> None:
        """SecurityMiddleware and XFrameOptionsMiddleware set some of the same headers (Django's
        Referrer-Policy is same-origin): one value each, Thallus'."""
        response = client.get("/items")
        assert_protected(response)
        assert response.headers.get_list("referrer-policy") == ["strict-origin-when-cross-origin"]

    def test_disallowed_host_page_is_the_error_shape(self, client: httpx.Client) -> None:
        assert_error(client.get("/items", headers={"Host": "evil.example"}), 400, "BadRequestError")

    def test_crash_log_line_carries_the_correlation_id(self, client: httpx.Client, server: Server) -> None:
        correlation_id = "django-crash-7"
        response = client.get("/boom", headers={"X-Correlation-ID": correlation_id})
        assert assert_error(response, 500, "InternalServerError")["correlation_id"] == correlation_id
        entry = json.loads(
            wait_for_output(server, '"logger": "django.request"', f'"correlation_id": "{correlation_id}"')
        )
        assert entry["level"] == "ERROR"
        assert "RuntimeError: kaboom" in entry["exception"]
