"""Security headers (docs/design.md §3): builders, the policy per environment, per-route overrides."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tests.apps import ok_app, starlette_app, status_app
from tests.asgi import call
from thallus.headers import (
    ContentSecurityPolicy,
    HeaderPolicy,
    SecurityHeadersMiddleware,
    build_hsts,
    build_permissions_policy,
    csp_nonce,
    override_header,
    parse_csp_sources,
    validate_csp_source,
    validate_permissions_policy,
)
from thallus.settings import Settings

BASELINE = "default-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
SECRET = "s" * 40


def production(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "production",
        "allowed_origins": "https://app.example.com",
        "public_origin": "https://api.example.com",
    }
    values.update(overrides)
    return Settings(**values)


def layer(settings: Settings, app: object = ok_app) -> SecurityHeadersMiddleware:
    return SecurityHeadersMiddleware(app, HeaderPolicy.from_settings(settings))  # type: ignore[arg-type]


# -- builders ---------------------------------------------------------------------------------


def test_baseline_csp() -> None:
    assert ContentSecurityPolicy().render() == BASELINE


def test_csp_extra_sources() -> None:
    extra = parse_csp_sources(
        "img-src data: https://img.example.com; connect-src wss://rt.example.com; frame-ancestors https://partner.example"
    )
    rendered = ContentSecurityPolicy().with_sources(extra).render()
    assert rendered == (
        BASELINE.replace("frame-ancestors 'none'", "frame-ancestors https://partner.example")
        + "; img-src 'self' data: https://img.example.com; connect-src 'self' wss://rt.example.com"
    )


def test_csp_report_uri_adds_both_reporting_directives() -> None:
    assert ContentSecurityPolicy().render("/csp-report").endswith("; report-uri /csp-report; report-to thallus-csp")


@pytest.mark.parametrize(
    "source",
    ["'self'", "'none'", "'unsafe-inline'", "'strict-dynamic'", "https:", "data:", "blob:", "https://cdn.example.com",
     "*.example.com", "https://*.example.com:443", "cdn.example.com/path/", "'sha256-abc+/=='", "*"],
)  # fmt: skip
def test_valid_csp_sources(source: str) -> None:
    assert validate_csp_source(source) == source


@pytest.mark.parametrize(
    ("source", "reason"),
    [("self", "must be quoted"), ("none", "must be quoted"), ("unsafe-inline", "must be quoted"),
     ("'nonce-abc'", "minted per response"), ("'selfish'", "not a CSP source"), ("https://a.com;", "not a CSP source"),
     ("https://a,b", "not a CSP source")],
)  # fmt: skip
def test_invalid_csp_sources(source: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_csp_source(source)


def test_permissions_policy_starts_with_camera_and_microphone() -> None:
    value = build_permissions_policy()
    assert value.startswith("camera=(), microphone=(), geolocation=(), payment=(), usb=()")
    assert validate_permissions_policy(value) == value


@pytest.mark.parametrize(
    "value", ["camera=(), fullscreen=(self)", 'geolocation=(self "https://maps.example")', "", "x=*"]
)
def test_custom_permissions_policy(value: str) -> None:
    assert validate_permissions_policy(value) == value


def test_hsts_builder() -> None:
    assert build_hsts(31536000) == "max-age=31536000"
    assert build_hsts(63072000, True, True) == "max-age=63072000; includeSubDomains; preload"


# -- the policy per environment ---------------------------------------------------------------

EXPECTED_EVERYWHERE = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "1; mode=block",
    "referrer-policy": "strict-origin-when-cross-origin",
    "content-security-policy": BASELINE,
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-site",
    "x-permitted-cross-domain-policies": "none",
}


@pytest.mark.parametrize("env", ["development", "test", "production"])
def test_headers_per_environment(env: str) -> None:
    settings = production(env=env)
    response = call(layer(settings), "GET", "/")
    for name, value in EXPECTED_EVERYWHERE.items():
        assert response.header(name) == value, name
    assert (response.header("permissions-policy") or "").startswith("camera=(), microphone=()")
    hsts = response.header("strict-transport-security")
    assert hsts == ("max-age=31536000" if env == "production" else None)


def test_hsts_opt_ins() -> None:
    settings = production(hsts_include_subdomains=True, hsts_preload=True)
    response = call(layer(settings), "GET", "/")
    assert response.header("strict-transport-security") == "max-age=31536000; includeSubDomains; preload"


def test_modern_xss_protection_value() -> None:
    assert call(layer(production(xss_protection="0")), "GET", "/").header("x-xss-protection") == "0"


def test_isolation_headers_can_be_turned_off() -> None:
    settings = production(
        cross_origin_opener_policy="off", cross_origin_resource_policy="", x_permitted_cross_domain_policies="off"
    )
    names = call(layer(settings), "GET", "/").names()
    assert "cross-origin-opener-policy" not in names
    assert "cross-origin-resource-policy" not in names
    assert "x-permitted-cross-domain-policies" not in names


def test_report_only_csp_with_reporting_endpoint() -> None:
    response = call(layer(production(csp_report_only=True, csp_report_uri="https://r.example.com/csp")), "GET", "/")
    assert response.header("content-security-policy") is None
    assert response.header("content-security-policy-report-only") == (
        BASELINE + "; report-uri https://r.example.com/csp; report-to thallus-csp"
    )
    assert response.header("reporting-endpoints") == 'thallus-csp="https://r.example.com/csp"'


def test_csp_can_be_disabled() -> None:
    assert call(layer(production(csp_enabled=False)), "GET", "/").header("content-security-policy") is None


def test_permissions_policy_can_be_replaced_or_disabled() -> None:
    custom = call(layer(production(permissions_policy="camera=(), fullscreen=(self)")), "GET", "/")
    assert custom.header("permissions-policy") == "camera=(), fullscreen=(self)"
    assert call(layer(production(permissions_policy="")), "GET", "/").header("permissions-policy") is None


# -- on every response ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 401, 403, 404, 405, 429, 500, 503])
def test_headers_on_every_status(status: int) -> None:
    response = call(layer(production(), status_app(status)), "GET", "/")
    for name, value in EXPECTED_EVERYWHERE.items():
        assert response.header(name) == value


@pytest.mark.parametrize(("status", "no_store"), [(200, False), (302, False), (400, True), (404, True), (500, True)])
def test_no_store_on_errors(status: int, no_store: bool) -> None:
    response = call(layer(production(), status_app(status)), "GET", "/")
    assert (response.header("cache-control") == "no-store") is no_store


def test_no_store_on_auth_paths_replaces_app_value() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"cache-control", b"public, max-age=600")]}
        )  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    assert call(layer(production(), app), "POST", "/api/v1/auth/login").values("cache-control") == ["no-store"]
    assert call(layer(production(), app), "GET", "/api/v1/items").values("cache-control") == ["public, max-age=600"]


def test_app_headers_of_the_same_name_are_replaced_and_leaky_ones_removed() -> None:
    response = call(layer(production(), starlette_app()), "GET", "/framed")
    assert response.values("x-frame-options") == ["DENY"]
    assert response.header("server") is None
    assert response.header("x-powered-by") is None
    assert response.header("vary") == "Accept", "other app headers are kept"
    assert response.body == b"hello"


def test_mixed_case_app_header_names_are_replaced() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"X-Frame-Options", b"ALLOWALL")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    assert call(layer(production(), app), "GET", "/").values("x-frame-options") == ["DENY"]


def test_streaming_response_gets_headers_once() -> None:
    response = call(layer(production(), starlette_app()), "GET", "/stream")
    assert response.header("x-frame-options") == "DENY"
    assert response.body == b"chunk 0\nchunk 1\nchunk 2\n"


def test_head_request() -> None:
    response = call(layer(production(), starlette_app()), "HEAD", "/items")
    assert response.status == 200  # the server drops a HEAD body; test_serve checks that over the wire
    assert response.header("content-security-policy") == BASELINE


# -- per-route API ----------------------------------------------------------------------------


async def _embeddable(request: Request) -> Response:
    override_header(request.scope, "X-Frame-Options", "SAMEORIGIN")
    override_header(request.scope, "Content-Security-Policy", None)
    return Response("framed", headers={"X-Frame-Options": "ignored"})


async def _page(request: Request) -> Response:
    nonce = csp_nonce(request.scope)
    assert csp_nonce(request.scope) == nonce, "one nonce per response"
    return HTMLResponse(f'<script nonce="{nonce}">1</script>')


def test_route_override() -> None:
    app = Starlette(routes=[Route("/embed", _embeddable)])
    response = call(layer(production(), app), "GET", "/embed")
    assert response.values("x-frame-options") == ["SAMEORIGIN"]
    assert response.header("content-security-policy") is None
    assert response.header("x-content-type-options") == "nosniff"


def test_override_refuses_header_injection() -> None:
    with pytest.raises(ValueError, match="CR, LF"):
        override_header({}, "X-Frame-Options", "DENY\r\nSet-Cookie: a=b")


def test_csp_nonce_for_html() -> None:
    app = Starlette(routes=[Route("/page", _page)])
    first = call(layer(production(), app), "GET", "/page")
    second = call(layer(production(), app), "GET", "/page")
    nonce = first.body.decode().split('nonce="')[1].split('"')[0]
    csp = first.header("content-security-policy")
    assert csp == BASELINE + f"; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'"
    assert first.header("content-security-policy") != second.header("content-security-policy"), "fresh per response"
    assert len(nonce) >= 22


def test_nonce_extends_configured_script_sources() -> None:
    app = Starlette(routes=[Route("/page", _page)])
    response = call(layer(production(csp_extra_sources="script-src https://cdn.example.com"), app), "GET", "/page")
    assert "script-src 'self' https://cdn.example.com 'nonce-" in (response.header("content-security-policy") or "")


def test_standalone_default_policy() -> None:
    response = call(SecurityHeadersMiddleware(ok_app), "GET", "/")
    assert response.header("content-security-policy") == BASELINE
    assert response.header("strict-transport-security") is None
