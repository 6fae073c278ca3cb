"""CORS (docs/design.md §4): allowlist, preflights, decoration, Vary, refusals."""

from __future__ import annotations

import pytest

from tests.apps import ok_app, status_app
from tests.asgi import Response, call, websocket_handshake, websocket_scope
from thallus._asgi import Receive, Scope, Send
from thallus.cors import CORSMiddleware

SPA = "https://app.example.com"
DEV = "http://localhost:3000"
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def cors(app: object = ok_app, **options: object) -> CORSMiddleware:
    return CORSMiddleware(app, [SPA, DEV], **options)  # type: ignore[arg-type]


def preflight(origin: str | bytes, method: str = "PUT", headers: str | None = None, **options: object) -> Response:
    request = [("origin", origin), ("access-control-request-method", method)]
    if headers is not None:
        request.append(("access-control-request-headers", headers))
    return call(cors(**options), "OPTIONS", "/anything", request)


def cors_headers(response: Response) -> list[str]:
    return [name for name in response.names() if name.startswith("access-control-")]


# -- preflights -------------------------------------------------------------------------------


def test_allowed_preflight() -> None:
    response = preflight(SPA, "PUT", "Content-Type, X-API-Key, Authorization, X-Correlation-ID")
    assert response.status == 204
    assert response.body == b""
    assert response.header("access-control-allow-origin") == SPA
    assert response.header("access-control-allow-credentials") == "true"
    assert response.header("access-control-allow-methods") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert response.header("access-control-allow-headers") == "Authorization, Content-Type, X-API-Key, X-Correlation-ID"
    assert response.header("access-control-max-age") == "600"
    assert response.header("vary") == PREFLIGHT_VARY


def test_preflight_is_answered_before_the_app() -> None:
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])

    response = call(cors(app), "OPTIONS", "/no/such/route", [("origin", SPA), ("access-control-request-method", "GET")])
    assert response.status == 204
    assert reached == []


@pytest.mark.parametrize(
    "origin",
    ["https://evil.com", "null", "https://app.example.com.evil.com", "https://evilapp.example.com", "http://app.example.com",
     "https://app.example.com:443", "https://app.example.com/", "", b"https://\xff", "https://app.example.com, https://evil.com"],
)  # fmt: skip
def test_preflight_from_other_origins_is_a_json_403_without_cors_headers(origin: str | bytes) -> None:
    response = preflight(origin)
    assert response.status == 403
    assert cors_headers(response) == []
    body = response.json()
    assert body["error"] == "CORSError"
    assert set(body) == {"error", "message", "details", "correlation_id"}
    assert response.header("vary") == PREFLIGHT_VARY


def test_preflight_origin_is_case_insensitive() -> None:
    response = preflight("HTTPS://APP.EXAMPLE.COM")
    assert response.status == 204
    assert response.header("access-control-allow-origin") == SPA


def test_preflight_asking_for_an_unlisted_header_is_refused() -> None:
    response = preflight(SPA, "POST", "content-type, x-secret-header")
    assert response.status == 403
    assert cors_headers(response) == []
    assert response.json()["details"]["headers"] == ["x-secret-header"]


def test_safelisted_headers_may_be_requested() -> None:
    assert preflight(SPA, "POST", "accept, accept-language, content-language").status == 204


def test_extra_allowed_headers() -> None:
    response = preflight(SPA, "POST", "x-tenant", extra_allowed_headers=["X-Tenant"])
    assert response.status == 204
    assert response.header("access-control-allow-headers") == (
        "Authorization, Content-Type, X-API-Key, X-Correlation-ID, X-Tenant"
    )


@pytest.mark.parametrize("requested", ["", " , ,", "Authorization", "AUTHORIZATION,content-type"])
def test_requested_header_lists_parse_leniently(requested: str) -> None:
    assert preflight(SPA, "POST", requested).status == 204


def test_preflight_with_an_unknown_method_is_refused() -> None:
    response = preflight(SPA, "PROPFIND")
    assert response.status == 403
    assert response.json()["details"]["method"] == "PROPFIND"
    assert preflight(SPA, "").status == 403


def test_lower_case_patch_is_named_as_sent() -> None:
    response = preflight(SPA, "patch")
    assert response.status == 204
    assert response.header("access-control-allow-methods") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, patch"


def test_max_age_zero_omits_the_header() -> None:
    assert preflight(SPA, max_age=0).header("access-control-max-age") is None


def test_options_without_request_method_is_not_a_preflight() -> None:
    response = call(cors(), "OPTIONS", "/", [("origin", SPA)])
    assert response.status == 200
    assert response.json()["method"] == "OPTIONS"
    assert response.header("access-control-allow-origin") == SPA


# -- actual requests ------------------------------------------------------------------------


def test_allowed_origin_is_decorated() -> None:
    response = call(cors(), "GET", "/", [("origin", DEV)])
    assert response.header("access-control-allow-origin") == DEV
    assert response.header("access-control-allow-credentials") == "true"
    assert (
        response.header("access-control-expose-headers") == "X-Correlation-ID, Retry-After, RateLimit, RateLimit-Policy"
    )
    assert response.header("vary") == "Origin"
    assert response.header("access-control-allow-methods") is None, "preflight-only headers stay on preflights"


@pytest.mark.parametrize("origin", ["https://evil.com", "null", "https://app.example.com.evil.com"])
def test_other_origins_run_but_get_no_cors_headers(origin: str) -> None:
    response = call(cors(), "POST", "/", [("origin", origin)])
    assert response.status == 200, "CORS is enforced by the browser; the request itself runs"
    assert cors_headers(response) == []
    assert response.header("vary") == "Origin"


def test_no_origin_still_varies() -> None:
    response = call(cors(), "GET", "/")
    assert cors_headers(response) == []
    assert response.header("vary") == "Origin"


def test_repeated_origin_headers_are_not_allowed() -> None:
    response = call(cors(), "GET", "/", [("origin", SPA), ("origin", SPA)])
    assert cors_headers(response) == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 429, 500])
def test_error_responses_are_readable_by_an_allowed_origin(status: int) -> None:
    response = call(cors(status_app(status, b"application/json", b"{}")), "GET", "/", [("origin", SPA)])
    assert response.status == status
    assert response.header("access-control-allow-origin") == SPA
    assert response.header("access-control-allow-credentials") == "true"


def _with_headers(headers: list[tuple[bytes, bytes]]) -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize(
    ("app_vary", "expected"),
    [
        ([b"Accept-Encoding"], "Accept-Encoding, Origin"),
        ([b"origin"], "origin"),
        ([b"Accept, Origin"], "Accept, Origin"),
        ([b"*"], "*"),
        ([b"Accept", b"Cookie"], "Accept, Cookie, Origin"),
    ],
)
def test_existing_vary_values_are_kept(app_vary: list[bytes], expected: str) -> None:
    app = _with_headers([(b"vary", value) for value in app_vary])
    assert call(cors(app), "GET", "/", [("origin", SPA)]).header("vary") == expected


def test_app_set_cors_headers_never_leak() -> None:
    app = _with_headers([(b"access-control-allow-origin", b"*"), (b"Access-Control-Allow-Credentials", b"true")])
    assert cors_headers(call(cors(app), "GET", "/", [("origin", "https://evil.com")])) == []
    allowed = call(cors(app), "GET", "/", [("origin", SPA)])
    assert allowed.values("access-control-allow-origin") == [SPA]


def test_streaming_body_passes_untouched() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    response = call(cors(app), "GET", "/", [("origin", SPA)])
    assert response.body == b"abc"
    assert len(response.messages) == 5


def test_configuration_is_validated() -> None:
    for bad in ("*", "null", "https://app.example.com/", "app.example.com"):
        with pytest.raises(ValueError, match=r"."):
            CORSMiddleware(ok_app, [bad])


def test_websockets_pass_untouched() -> None:
    scope = websocket_scope(headers=[("origin", "https://evil.com")])
    assert websocket_handshake(cors(), scope)[0]["type"] == "websocket.accept"
