"""Hostile input ends in a 4xx in the §8 shape, never a 500, on SQLite and PostgreSQL.

Lone surrogates and NUL characters in JSON strings, URLs and queries; JSON nested a thousand levels
deep or a megabyte wide; each answer is valid UTF-8 JSON whose echo of the input is bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.service import PASSWORD, SAME_ORIGIN, Api, running_api, settings_for
from thallus.errors import ECHO_CHARS

SHAPE = {"error", "message", "details", "correlation_id"}
JSON = {"Content-Type": "application/json", **SAME_ORIGIN}


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    with running_api(
        settings_for(database_url, rate_limit="100000/minute", rate_limit_auth="100000/minute")
    ) as running:
        running.create_user(api_access=True)
        yield running


def refused(response: Any, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    response.content.decode("utf-8")  # strict: valid UTF-8
    body: dict[str, Any] = json.loads(response.content)
    assert set(body) == SHAPE
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["x-content-type-options"] == "nosniff"
    return body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"email": "\\ud800", "password": "x"}',
        b'{"email": "ada@example.com", "password": "\\udfff"}',
        b'{"email": "ada\\u0000@example.com", "password": "x"}',
        b'{"email": "ada@example.com", "password": "a\\u0000b"}',
        b'{"email": ["\\ud800"], "password": "x"}',
    ],
)
def test_login_refuses_surrogates_and_nul(api: Api, raw: bytes) -> None:
    body = refused(api.client.post("/api/v1/auth/login", content=raw, headers=JSON), 422)
    assert body["error"] == "ValidationError"


@pytest.mark.parametrize(
    "document",
    [
        {"email": "grace@example.com", "password": PASSWORD, "name": "Gra\x00ce"},
        {"email": "gra\x00ce@example.com", "password": PASSWORD, "name": "Grace"},
        {"email": "grace@example.com", "password": PASSWORD, "name": "Gra\ud800ce"},
        {"email": "grace@example.com", "password": PASSWORD + "\ud800", "name": "Grace"},
    ],
)
def test_register_refuses_surrogates_and_nul(api: Api, document: dict[str, str]) -> None:
    raw = json.dumps(document).encode()  # ensure_ascii: the surrogate travels as \\ud800
    body = refused(api.client.post("/api/v1/auth/register", content=raw, headers=JSON), 422)
    assert PASSWORD not in json.dumps(body), "never the password"


def test_key_names_refuse_nul(api: Api) -> None:
    headers = api.bearer() | JSON
    raw = json.dumps({"name": "laptop\x00"}).encode()
    refused(api.client.post("/api/v1/api-keys", content=raw, headers=headers), 422)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/api-keys/%00"),
        ("GET", "/api/v1/users/me?x=%00"),
        ("GET", "/api/v1/audit-logs?action=login%00"),
        ("GET", "/api/v1/audit-logs?user_id=%00"),
        ("POST", "/api/v1/admin/users/%00/unlock"),
    ],
)
def test_nul_in_the_url_is_a_400(api: Api, method: str, path: str) -> None:
    api.create_user("root@example.com", role="admin")
    headers = api.bearer("root@example.com") | SAME_ORIGIN
    body = refused(api.client.request(method, path, headers=headers), 400)
    assert body["error"] == "BadRequestError"


def test_json_nested_a_thousand_deep_is_refused(api: Api) -> None:
    deep = b'{"email": ' + b"[" * 990 + b"]" * 990 + b', "password": "x"}'
    refused(api.client.post("/api/v1/auth/login", content=deep, headers=JSON), 400, 422)
    report = b'{"csp-report": ' + b'{"a": ' * 950 + b"1" + b"}" * 950 + b"}"
    headers = {"Content-Type": "application/csp-report", **SAME_ORIGIN}
    refused(api.client.post("/csp-report", content=report, headers=headers), 400)


def test_a_wide_input_is_echoed_bounded(api: Api) -> None:
    wide = json.dumps({"email": ["x" * 1000] * 5000, "password": "x"}).encode()
    response = api.client.post("/api/v1/auth/login", content=wide, headers=JSON)
    body = refused(response, 413, 422)
    assert len(response.content) < 8 * 1024
    if response.status_code == 422:
        echoed = body["details"][0]["input"]
        assert len(echoed) <= 21 and all(len(item) <= ECHO_CHARS + 1 for item in echoed[:20])
