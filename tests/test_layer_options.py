"""The layers' options ("Options like the peers'"): each through ``protect(app, Settings(...))``, each
checked at start-up.

CORS ``allow_methods``/``expose_headers`` and ``https://*.example.com`` patterns (trusted alike by
CSRF), CSRF exempt paths and the refusal hook, the correlation header/generator/validator,
``X-Frame-Options: SAMEORIGIN`` with a matching ``frame-ancestors``, opt-in COEP, and the rate
limiter's one warning about forwarding headers from an untrusted peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest

from tests.apps import ok_app
from tests.asgi import Response, acall, call, http_scope, websocket_handshake, websocket_scope
from thallus import Settings, protect, ratelimit
from thallus._asgi import ASGIApp, Receive, Scope, Send
from thallus.correlation import CorrelationIdMiddleware, is_valid_correlation_id
from thallus.cors import ALLOWED_METHODS, EXPOSED_HEADERS, CORSMiddleware
from thallus.csrf import REJECT_UNTRUSTED_ORIGIN, CSRFMiddleware, csrf_verdict
from thallus.headers import HeaderPolicy, validate_isolation_value
from thallus.origins import InvalidOriginError, OriginMatcher, parse_origin, parse_origins
from thallus.settings import ConfigurationError

SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"
PATTERN = "https://*.example.com"
COOKIE = ("cookie", "session=1")


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"env": "test", "allowed_origins": SPA, "public_origin": PUBLIC}
    values.update(overrides)
    return Settings(**values)


def problems(**overrides: Any) -> list[str]:
    with pytest.raises(ConfigurationError) as caught:
        settings(**overrides)
    return caught.value.problems


def preflight(app: ASGIApp, origin: str, method: str = "PUT", headers: str | None = None) -> Response:
    request = [("origin", origin), ("access-control-request-method", method)]
    if headers is not None:
        request.append(("access-control-request-headers", headers))
    return call(app, "OPTIONS", "/items", request)


def vary(response: Response) -> set[str]:
    return {token.strip().lower() for value in response.values("vary") for token in value.split(",")}


# -- CORS: allow_methods and expose_headers -------------------------------------------------------


def test_cors_defaults_are_unchanged() -> None:
    app = protect(ok_app, settings())
    allowed = preflight(app, SPA, "PATCH")
    assert allowed.header("access-control-allow-methods") == ", ".join(ALLOWED_METHODS)
    actual = call(app, "GET", "/", [("origin", SPA)])
    assert actual.header("access-control-expose-headers") == ", ".join(EXPOSED_HEADERS)


def test_cors_allow_methods_from_settings() -> None:
    app = protect(ok_app, settings(cors_allow_methods="get, post"))
    allowed = preflight(app, SPA, "POST", "Content-Type")
    assert allowed.status == 204
    assert allowed.header("access-control-allow-methods") == "GET, POST"
    refused = preflight(app, SPA, "DELETE")
    assert refused.status == 403
    assert refused.json()["error"] == "CORSError"
    assert refused.json()["details"]["method"] == "DELETE"
    assert not [name for name in refused.names() if name.startswith("access-control-")]


def test_cors_expose_headers_from_settings() -> None:
    app = protect(ok_app, settings(cors_expose_headers="X-Total-Count, Retry-After"))
    response = call(app, "GET", "/", [("origin", SPA)])
    assert response.header("access-control-expose-headers") == "X-Total-Count, Retry-After"
    error = call(app, "POST", "/", [("origin", "https://evil.example"), COOKIE])  # a CSRF 403: no CORS header
    assert error.status == 403
    assert error.header("access-control-expose-headers") is None


def test_cors_empty_expose_list_sends_no_expose_header() -> None:
    response = call(CORSMiddleware(ok_app, [SPA], expose_headers=()), "GET", "/", [("origin", SPA)])
    assert response.header("access-control-allow-origin") == SPA
    assert response.header("access-control-expose-headers") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allow_methods": ["*"]}, "'*' is not allowed with credentials"),
        ({"allow_methods": ["GET", "TRACE"]}, "browsers never send TRACE"),
        ({"allow_methods": ["CONNECT"]}, "browsers never send CONNECT"),
        ({"allow_methods": ["GET POST"]}, "'GET POST' is not a method"),
        ({"allow_methods": []}, "at least one method"),
        ({"expose_headers": ["*"]}, "'*' is a literal name"),
        ({"expose_headers": ["Set-Cookie"]}, "browsers never expose Set-Cookie"),
        ({"expose_headers": ["X-Ok", "bad header"]}, "'bad header' is not a header name"),
        ({"extra_allowed_headers": ["bad:header"]}, "'bad:header' is not a header name"),
        ({"correlation_header": "bad header"}, "'bad header' is not a header name"),
    ],
)
def test_cors_options_are_checked_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CORSMiddleware(ok_app, [SPA], **options)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"cors_allow_methods": "GET, *"}, "cors_allow_methods: '*' is not allowed"),
        ({"cors_allow_methods": "GET, P O"}, "cors_allow_methods:"),
        ({"cors_expose_headers": "X-Ok, bad header"}, "cors_expose_headers: 'bad header' is not a valid header name"),
    ],
)
def test_cors_settings_are_validated(overrides: dict[str, Any], expected: str) -> None:
    lines = problems(**overrides)
    assert len(lines) == 1
    assert lines[0].startswith(expected), lines[0]


def test_cors_options_settings_accept_fail_protect_at_start_up() -> None:
    with pytest.raises(ValueError, match="browsers never expose Set-Cookie"):
        protect(ok_app, settings(cors_expose_headers="Set-Cookie"))
    with pytest.raises(ValueError, match="browsers never send TRACE"):
        protect(ok_app, settings(cors_allow_methods="GET, TRACE"))


# -- origin patterns -------------------------------------------------------------------------------

#: (request Origin, allowed by ``https://*.example.com``)
PATTERN_CASES = [
    ("https://app.example.com", True),
    ("https://admin.example.com", True),
    ("https://APP.Example.COM", True),  # compared after lower-casing, like exact origins
    ("https://xn--bcher-kva.example.com", True),  # an IDNA A-label is one LDH label
    ("https://a1-b2.example.com", True),
    ("https://a.b.example.com", False),  # exactly one label
    ("https://example.com", False),
    ("https://.example.com", False),
    ("https://evilexample.com", False),
    ("https://app.example.com.evil.net", False),
    ("https://app-example.com", False),
    ("https://app.example.co", False),
    ("http://app.example.com", False),  # the scheme must match
    ("https://app.example.com:443", False),  # the port must match as written: none
    ("https://app.example.com:8443", False),
    ("https://-app.example.com", False),  # not an LDH label
    ("https://app-.example.com", False),
    ("https://a_b.example.com", False),
    ("https://*.example.com", False),  # the pattern itself, sent literally
    ("https://x@app.example.com", False),
    ("https://app.example.com.", False),
    ("https://bücher.example.com", False),  # browsers send A-labels, never Unicode
    ("https://" + "a" * 64 + ".example.com", False),  # a label is at most 63 characters
    ("null", False),
]


def pattern_settings(**overrides: Any) -> Settings:
    return settings(allowed_origins=f"{PATTERN}, https://exact.example.org", **overrides)


def _settings_accept_patterns() -> bool:
    try:
        settings(allowed_origins=PATTERN)
    except ConfigurationError:
        return False
    return True


#: Until settings.py's ``_parse_allowed_origins`` calls ``parse_origins(..., patterns=True)``, the
#: Settings route to a pattern is closed; then this marker is inert and the tests run as written.
needs_pattern_settings = pytest.mark.xfail(
    not _settings_accept_patterns(),
    reason="Settings(allowed_origins=...) does not accept patterns yet (settings.py change pending)",
    raises=ConfigurationError,
    strict=True,
)


@pytest.mark.parametrize(("origin", "allowed"), PATTERN_CASES)
def test_pattern_allows_one_label_in_cors_and_csrf_alike(origin: str, allowed: bool) -> None:
    cors = CORSMiddleware(ok_app, [PATTERN])
    csrf = CSRFMiddleware(ok_app, [PATTERN])
    allowed_origin = cors.allowed_origin(origin.encode("utf-8"))
    assert (allowed_origin is not None) is allowed
    verdict = csrf.verdict(http_scope("POST", "/", [COOKIE, ("origin", origin)]), "POST")
    assert verdict.allowed is allowed, verdict.reason


@needs_pattern_settings
@pytest.mark.parametrize(("origin", "allowed"), PATTERN_CASES)
def test_pattern_through_protect(origin: str, allowed: bool) -> None:
    app = protect(ok_app, pattern_settings())
    actual = call(app, "GET", "/", [("origin", origin)])
    assert actual.status == 200
    if allowed:
        assert actual.header("access-control-allow-origin") == origin.lower()
        assert actual.header("access-control-allow-credentials") == "true"
    else:
        assert actual.header("access-control-allow-origin") is None
    assert "origin" in vary(actual)
    answer = preflight(app, origin, "PUT", "Content-Type")
    assert answer.status == (204 if allowed else 403)
    assert answer.header("access-control-allow-origin") == (origin.lower() if allowed else None)
    state_changing = call(app, "POST", "/", [("origin", origin), COOKIE])
    assert state_changing.status == (200 if allowed else 403)


@needs_pattern_settings
def test_pattern_origin_is_echoed_never_star() -> None:
    for rate_limit_enabled in (True, False):  # the composed CORS layer, and the fast path
        app = protect(ok_app, pattern_settings(rate_limit_enabled=rate_limit_enabled))
        for origin in ("https://app.example.com", "https://admin.example.com", "https://app.example.com"):
            response = call(app, "GET", "/", [("origin", origin)])
            assert response.header("access-control-allow-origin") == origin
            assert "origin" in vary(response)
        error = call(app, "GET", "/missing", [("origin", "https://shop.example.com")])
        assert error.header("access-control-allow-origin") == "https://shop.example.com"


@needs_pattern_settings
def test_pattern_keeps_exact_origins_exact() -> None:
    app = protect(ok_app, pattern_settings())
    assert call(app, "GET", "/", [("origin", "https://exact.example.org")]).header("access-control-allow-origin") == (
        "https://exact.example.org"
    )
    assert (
        call(app, "GET", "/", [("origin", "https://sub.exact.example.org")]).header("access-control-allow-origin")
        is None
    )


def test_pattern_port_must_match_as_written() -> None:
    cors = CORSMiddleware(ok_app, ["https://*.example.com:8443"])
    assert cors.allowed_origin(b"https://app.example.com:8443") == b"https://app.example.com:8443"
    assert cors.allowed_origin(b"https://app.example.com") is None
    assert cors.allowed_origin(b"https://app.example.com:443") is None


def test_pattern_over_an_internationalised_name() -> None:
    (pattern,) = parse_origins(["https://*.bücher.example"], patterns=True)
    assert pattern == "https://*.xn--bcher-kva.example"
    assert "https://shop.xn--bcher-kva.example" in OriginMatcher([pattern])


def test_patterns_are_canonical_and_deduplicated() -> None:
    assert parse_origins(["HTTPS://*.Example.COM", "https://*.example.com", SPA], patterns=True) == (PATTERN, SPA)


def test_csrf_verdict_trusts_patterns_given_as_a_frozenset() -> None:
    """The login check (server/api/deps.py) passes ``frozenset(settings.trusted_origins)``."""

    def verdict(origin: str) -> bool:
        return csrf_verdict(
            "POST",
            has_cookies=True,
            api_key_authenticated=False,
            sec_fetch_site="cross-site",
            origin=origin,
            referer=None,
            environment="production",
            trusted_origins=frozenset({PATTERN}),
        ).allowed

    assert verdict("https://app.example.com")
    assert not verdict("https://a.b.example.com")
    assert not verdict(PATTERN)


def test_pattern_trusts_referer_origins_alike() -> None:
    layer = CSRFMiddleware(ok_app, [PATTERN], environment="production")
    good = call(layer, "POST", "/", [COOKIE, ("referer", "https://app.example.com/page?x=1")])
    bad = call(layer, "POST", "/", [COOKIE, ("referer", "https://app.example.com.evil.net/page")])
    assert (good.status, bad.status) == (200, 403)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("*", "'*' is a wildcard; list every origin explicitly"),
        ("https://*", "'https://*' is a wildcard"),
        ("https://a*.example.com", "'https://a*.example.com' is a wildcard"),
        ("https://*a.example.com", "'https://*a.example.com' is a wildcard"),
        ("https://*.*.example.com", "'https://*.*.example.com' is a wildcard"),
        ("https://app.*.example.com", "'https://app.*.example.com' is a wildcard"),
        ("https://example.*", "'https://example.*' is a wildcard"),
        ("https://*.com", "'https://*.com' is a wildcard over the single-label name 'com'"),
        ("https://*.example", "'https://*.example' is a wildcard"),
        ("*.example.com", "'*.example.com' is a wildcard"),
        ("https://*.0.0.1", "is a wildcard over an IP address"),
        ("https://*.[::1]", "is a wildcard over an IP address"),
        ("https://*.example.com/", "has a path"),
        ("https://*.example.com:0", "invalid port"),
        ("ftp://*.example.com", "only http and https"),
        ("https://*.exa mple.com", "whitespace"),
    ],
)
def test_other_wildcards_are_refused(value: str, message: str) -> None:
    with pytest.raises(InvalidOriginError, match=re.escape(message)):
        parse_origins([value], patterns=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        CORSMiddleware(ok_app, [value])
    with pytest.raises(ValueError, match=re.escape(message)):
        CSRFMiddleware(ok_app, [value])


def test_patterns_are_refused_where_not_asked_for() -> None:
    with pytest.raises(InvalidOriginError, match="is a wildcard; list every origin explicitly"):
        parse_origins([PATTERN])
    with pytest.raises(InvalidOriginError, match="is a wildcard"):
        parse_origin(PATTERN)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*", "allowed_origins: '*' is a wildcard; list every origin explicitly"),
        ("https://a.example, https://*.example", "allowed_origins: 'https://*.example' is a wildcard"),
        ("https://*.*.example.com", "allowed_origins: 'https://*.*.example.com' is a wildcard"),
        ("https://a*.example.com", "allowed_origins: 'https://a*.example.com' is a wildcard"),
        ("https://*.com", "allowed_origins: 'https://*.com' is a wildcard"),
    ],
)
def test_refused_patterns_in_settings(value: str, expected: str) -> None:
    lines = problems(allowed_origins=value)
    assert len(lines) == 1
    assert lines[0].startswith(expected), lines[0]


@needs_pattern_settings
def test_http_pattern_is_refused_in_production_only() -> None:
    assert settings(allowed_origins="http://*.example.com").origins == ("http://*.example.com",)
    lines = problems(env="production", allowed_origins="http://*.example.com")
    assert any(line.startswith("allowed_origins: 'http://*.example.com' is not https") for line in lines), lines
    production = settings(env="production", allowed_origins=PATTERN)
    assert production.origins == (PATTERN,)


# -- CSRF: exempt paths and the refusal hook ------------------------------------------------------


@pytest.mark.parametrize("rate_limit_enabled", [False, True])  # CSRF on the fast path, and as its own layer
def test_csrf_exempt_paths_match_exactly(rate_limit_enabled: bool) -> None:
    app = protect(
        ok_app,
        settings(csrf_exempt_paths="/webhooks/stripe, /hooks/github", rate_limit_enabled=rate_limit_enabled),
    )
    hostile = [COOKIE, ("origin", "https://evil.example"), ("sec-fetch-site", "cross-site")]
    assert call(app, "POST", "/webhooks/stripe", hostile).status == 200
    assert call(app, "PUT", "/hooks/github", [COOKIE]).status == 200
    for path in ("/webhooks/stripe/", "/webhooks/stripe2", "/webhooks", "/webhooks/stripe/x", "/Webhooks/stripe", "/"):
        response = call(app, "POST", path, hostile)
        assert response.status == 403, path
        assert response.json()["error"] == "CSRFError"


def test_csrf_exempt_path_covers_a_websocket_handshake() -> None:
    layer = CSRFMiddleware(ok_app, [SPA], exempt_paths=["/ws/hook"])
    hostile = [COOKIE, ("origin", "https://evil.example")]
    accepted = websocket_handshake(layer, websocket_scope("/ws/hook", hostile))
    refused = websocket_handshake(layer, websocket_scope("/ws/other", hostile))
    assert accepted[0]["type"] == "websocket.accept"
    assert refused[0]["type"] == "websocket.http.response.start"
    assert refused[0]["status"] == 403


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["webhook"], "must start with '/'"),
        (["/hooks/*"], "exact paths only"),
        (["/hook?x=1"], "exact paths only"),
        (["/hook#a"], "exact paths only"),
    ],
)
def test_csrf_exempt_paths_are_checked_at_construction(paths: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CSRFMiddleware(ok_app, [SPA], exempt_paths=paths)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/hooks/*", "csrf_exempt_paths: '/hooks/*': exact paths only"),
        ("hooks", "csrf_exempt_paths: 'hooks' must start with '/'"),
    ],
)
def test_csrf_exempt_paths_settings_are_validated(value: str, expected: str) -> None:
    lines = problems(csrf_exempt_paths=value)
    assert len(lines) == 1
    assert lines[0].startswith(expected), lines[0]


def _json_response(status: int, payload: dict[str, Any]) -> ASGIApp:
    body = json.dumps(payload).encode()

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return respond


def test_csrf_refusal_hook_sync(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []

    def on_refusal(scope: Scope, reason: str) -> ASGIApp:
        seen.append((scope["path"], reason))
        return _json_response(403, {"error": "CSRFError", "message": "Reload the page and try again."})

    layer = CSRFMiddleware(ok_app, [SPA], on_refusal=on_refusal)
    with caplog.at_level(logging.WARNING, logger="thallus.csrf"):
        response = call(layer, "POST", "/orders", [COOKIE, ("origin", "https://evil.example")])
    assert response.status == 403
    assert response.json()["message"] == "Reload the page and try again."
    assert seen == [("/orders", REJECT_UNTRUSTED_ORIGIN)]
    assert len([record for record in caplog.records if record.name == "thallus.csrf"]) == 1  # still logged


def test_csrf_refusal_hook_async_and_none_for_the_default() -> None:
    async def on_refusal(scope: Scope, reason: str) -> ASGIApp | None:
        await asyncio.sleep(0)
        if scope["path"] == "/default":
            return None
        return _json_response(303 if scope["path"] == "/redirect" else 403, {"reason": reason})

    layer = CSRFMiddleware(ok_app, [SPA], on_refusal=on_refusal)
    hostile = [COOKIE, ("origin", "https://evil.example")]
    custom = call(layer, "POST", "/custom", hostile)
    assert (custom.status, custom.json()) == (403, {"reason": REJECT_UNTRUSTED_ORIGIN})
    assert call(layer, "POST", "/redirect", hostile).status == 303
    default = call(layer, "POST", "/default", hostile)
    assert default.status == 403
    assert default.json()["error"] == "CSRFError"
    assert default.json()["details"]["reason"] == REJECT_UNTRUSTED_ORIGIN
    assert call(layer, "POST", "/custom", [COOKIE, ("origin", SPA)]).status == 200  # passes: hook not called


def test_csrf_refusal_hook_is_not_used_for_websockets() -> None:
    def on_refusal(scope: Scope, reason: str) -> ASGIApp:
        raise AssertionError("not for a WebSocket handshake")

    layer = CSRFMiddleware(ok_app, [SPA], on_refusal=on_refusal)
    sent = websocket_handshake(layer, websocket_scope("/ws", [COOKIE, ("origin", "https://evil.example")]))
    assert sent[0]["status"] == 403


def test_csrf_refusal_hook_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_refusal must be a callable"):
        CSRFMiddleware(ok_app, [SPA], on_refusal="deny")  # type: ignore[arg-type]


# -- correlation header, generator, validator -----------------------------------------------------


@pytest.mark.parametrize("rate_limit_enabled", [False, True])
def test_correlation_header_from_settings(rate_limit_enabled: bool) -> None:
    app = protect(ok_app, settings(correlation_header="X-Request-ID", rate_limit_enabled=rate_limit_enabled))
    response = call(app, "GET", "/", [("x-request-id", "req-42"), ("x-correlation-id", "other-1")])
    assert response.header("x-request-id") == "req-42"
    assert response.header("x-correlation-id") is None
    assert response.json()["correlation_id"] == "req-42"
    minted = call(app, "GET", "/")
    assert is_valid_correlation_id(minted.header("x-request-id") or "")
    assert minted.json()["correlation_id"] == minted.header("x-request-id")


def test_correlation_header_names_error_bodies_correlation_id() -> None:
    app = protect(ok_app, settings(correlation_header="X-Request-ID"))
    refused = call(app, "POST", "/", [COOKIE, ("x-request-id", "req-7")])  # no origin evidence in test: 403
    assert refused.status == 403
    assert refused.header("x-request-id") == "req-7"
    assert refused.json()["correlation_id"] == "req-7"
    cors_refusal = preflight(app, "https://evil.example")
    assert cors_refusal.json()["correlation_id"] == cors_refusal.header("x-request-id")


def test_correlation_header_is_what_cors_allows_and_exposes() -> None:
    app = protect(ok_app, settings(correlation_header="X-Request-ID"))
    allowed = preflight(app, SPA, "PUT", "X-Request-ID, Content-Type")
    assert allowed.status == 204
    assert allowed.header("access-control-allow-headers") == "Authorization, Content-Type, X-API-Key, X-Request-ID"
    assert preflight(app, SPA, "PUT", "X-Correlation-ID").status == 403
    actual = call(app, "GET", "/", [("origin", SPA)])
    assert actual.header("access-control-expose-headers") == "X-Request-ID, Retry-After, RateLimit, RateLimit-Policy"


def test_correlation_header_with_an_explicit_expose_list() -> None:
    app = protect(ok_app, settings(correlation_header="X-Request-ID", cors_expose_headers="X-Request-ID, X-Total"))
    assert call(app, "GET", "/", [("origin", SPA)]).header("access-control-expose-headers") == "X-Request-ID, X-Total"


def test_correlation_generator_and_validator() -> None:
    counter = iter(range(1, 100))

    def generator() -> str:
        return f"req_{next(counter):04d}"

    def validator(value: str) -> bool:
        return value.startswith("req_") and value[4:].isdigit()

    layer = CorrelationIdMiddleware(ok_app, header="X-Request-ID", generator=generator, validator=validator)
    minted = call(layer, "GET", "/")
    assert minted.header("x-request-id") == "req_0002"  # req_0001 was the start-up sample
    assert call(layer, "GET", "/", [("x-request-id", "req_77")]).header("x-request-id") == "req_77"
    refused = call(layer, "GET", "/", [("x-request-id", "client-abc")])
    assert refused.header("x-request-id") == "req_0003"
    assert refused.json()["correlation_id"] == "req_0003"


def test_correlation_validator_narrows_never_widens() -> None:
    layer = CorrelationIdMiddleware(ok_app, validator=lambda value: True)
    assert call(layer, "GET", "/", [("x-correlation-id", "any/thing=ok")]).header("x-correlation-id") == "any/thing=ok"
    for hostile in (b"two words", b"tab\there", b"\x1b[31mred", "caf\u00e9".encode("latin-1"), b"x" * 257):
        response = call(layer, "GET", "/", [(b"x-correlation-id", hostile)])
        assert response.header("x-correlation-id") != hostile.decode("latin-1")
        assert is_valid_correlation_id(response.header("x-correlation-id") or "")


def test_correlation_validator_that_raises_refuses() -> None:
    def validator(value: str) -> bool:
        raise RuntimeError("broken")

    layer = CorrelationIdMiddleware(ok_app, validator=validator)
    response = call(layer, "GET", "/", [("x-correlation-id", "client-1")])
    assert response.status == 200
    assert response.header("x-correlation-id") != "client-1"


def test_correlation_generator_going_bad_later_falls_back_to_uuid7() -> None:
    values = iter(["req-1", "bad value\r\n"])
    layer = CorrelationIdMiddleware(ok_app, generator=lambda: next(values))
    response = call(layer, "GET", "/")
    assert is_valid_correlation_id(response.header("x-correlation-id") or "")
    assert len(response.header("x-correlation-id") or "") == 36


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"header": "bad header"}, ValueError, "is not a header name"),
        ({"header": "X-Request-ID:"}, ValueError, "is not a header name"),
        ({"header": ""}, ValueError, "is not a header name"),
        ({"generator": "uuid"}, TypeError, "generator must be a callable"),
        ({"validator": "strict"}, TypeError, "validator must be a callable"),
        ({"generator": lambda: 7}, ValueError, "IDs must be 1-256 visible ASCII characters"),
        ({"generator": lambda: "has space"}, ValueError, "IDs must be 1-256 visible ASCII characters"),
        ({"generator": lambda: "caf\u00e9"}, ValueError, "IDs must be 1-256 visible ASCII characters"),
        ({"generator": lambda: ""}, ValueError, "IDs must be 1-256 visible ASCII characters"),
        ({"generator": lambda: "req/1"}, ValueError, "is refused by the validator"),  # "/" fails the default rule
        ({"generator": lambda: "a1", "validator": lambda v: v.startswith("b")}, ValueError, "refused by the validator"),
    ],
)
def test_correlation_options_are_checked_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CorrelationIdMiddleware(ok_app, **options)


def test_correlation_header_setting_is_validated() -> None:
    lines = problems(correlation_header="X Request")
    assert lines == ["correlation_header: 'X Request' is not a valid header name"]


# -- X-Frame-Options, COEP, X-XSS-Protection ------------------------------------------------------


def test_frame_options_default_deny_with_frame_ancestors_none() -> None:
    response = call(protect(ok_app, settings()), "GET", "/")
    assert response.header("x-frame-options") == "DENY"
    assert "frame-ancestors 'none'" in (response.header("content-security-policy") or "")


def test_frame_options_sameorigin_makes_frame_ancestors_self() -> None:
    response = call(protect(ok_app, settings(x_frame_options="sameorigin")), "GET", "/")
    assert response.header("x-frame-options") == "SAMEORIGIN"
    csp = response.header("content-security-policy") or ""
    assert "frame-ancestors 'self'" in csp
    assert "'none'; base-uri" in csp  # object-src stays 'none'


def test_frame_options_sameorigin_keeps_configured_frame_ancestors() -> None:
    app = protect(ok_app, settings(x_frame_options="SAMEORIGIN", csp_extra_sources="frame-ancestors https://p.example"))
    assert "frame-ancestors https://p.example;" in (call(app, "GET", "/").header("content-security-policy") or "")


def test_frame_options_sameorigin_in_report_only_and_nonce_csp() -> None:
    policy = HeaderPolicy.from_settings(settings(x_frame_options="SAMEORIGIN", csp_report_only=True))
    assert dict(policy.headers)[b"content-security-policy-report-only"].count(b"frame-ancestors 'self'") == 1
    assert policy.csp_nonce_template is not None
    assert "frame-ancestors 'self'" in policy.csp_nonce_template


def test_frame_options_are_validated() -> None:
    assert problems(x_frame_options="ALLOW-FROM https://a.example")[0].startswith("x_frame_options:")
    with pytest.raises(ValueError, match="is not DENY or SAMEORIGIN"):
        HeaderPolicy.build(x_frame_options="ALLOWALL")


def test_embedder_policy_is_absent_by_default() -> None:
    assert call(protect(ok_app, settings()), "GET", "/").header("cross-origin-embedder-policy") is None


@pytest.mark.parametrize("value", ["require-corp", "credentialless", "Require-Corp "])
def test_embedder_policy_opt_in(value: str) -> None:
    response = call(protect(ok_app, settings(cross_origin_embedder_policy=value)), "GET", "/")
    assert response.header("cross-origin-embedder-policy") == value.strip().lower()
    assert response.header("cross-origin-opener-policy") == "same-origin"


def test_embedder_policy_off_omits_it() -> None:
    response = call(protect(ok_app, settings(cross_origin_embedder_policy="off")), "GET", "/")
    assert response.header("cross-origin-embedder-policy") is None


def test_embedder_policy_is_validated() -> None:
    lines = problems(cross_origin_embedder_policy="require-everything")
    assert lines == [
        "cross_origin_embedder_policy: 'require-everything' is not one of credentialless, require-corp, "
        "unsafe-none or off"
    ]
    with pytest.raises(ValueError, match="is not one of"):
        HeaderPolicy.build(cross_origin_embedder_policy="strict")
    with pytest.raises(ValueError, match="not an isolation header setting"):
        validate_isolation_value("x_frame_options", "DENY")


def test_xss_protection_default_is_the_specifications() -> None:
    assert call(protect(ok_app, settings()), "GET", "/").header("x-xss-protection") == "1; mode=block"
    assert Settings().xss_protection == "1; mode=block"


# -- rate limiter: forwarding headers from an untrusted peer --------------------------------------


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning is once per process: make this test's process-wide state a fresh process's."""
    monkeypatch.setattr(ratelimit, "_warned_untrusted_forwarding", False)


def _forwarding_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "thallus.ratelimit" and "not a trusted proxy" in r.getMessage()]


@pytest.mark.usefixtures("fresh_warning")
@pytest.mark.parametrize(
    ("header", "value"), [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7;proto=https")]
)
def test_forwarding_from_an_untrusted_peer_is_logged_once(
    caplog: pytest.LogCaptureFixture, header: str, value: str
) -> None:
    app = protect(ok_app, settings())
    with caplog.at_level(logging.WARNING, logger="thallus.ratelimit"):
        first = call(app, "GET", "/", [(header, value)])
        second = call(app, "GET", "/", [(header, "198.51.100.9")])
        call(protect(ok_app, settings()), "GET", "/", [(header, value)])  # another limiter, same process
    assert (first.status, second.status) == (200, 200)
    (record,) = _forwarding_warnings(caplog)
    message = record.getMessage()
    assert "127.0.0.1" in message
    assert header.lower() in message
    assert "THALLUS_TRUSTED_PROXIES" in message
    assert "shares one rate limit" in message
    assert record.levelno == logging.WARNING


@pytest.mark.usefixtures("fresh_warning")
def test_forwarding_from_a_peer_outside_the_trusted_proxies_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = protect(ok_app, settings(trusted_proxies="10.0.0.0/8"))
    with caplog.at_level(logging.WARNING, logger="thallus.ratelimit"):
        call(app, "GET", "/", [("x-forwarded-for", "203.0.113.7")])
        call(app, "GET", "/", [("x-forwarded-for", "203.0.113.7")])
    assert len(_forwarding_warnings(caplog)) == 1


@pytest.mark.usefixtures("fresh_warning")
def test_no_warning_from_a_trusted_proxy_or_without_forwarding(caplog: pytest.LogCaptureFixture) -> None:
    trusted = protect(ok_app, settings(trusted_proxies="127.0.0.1"))
    direct = protect(ok_app, settings())
    with caplog.at_level(logging.WARNING, logger="thallus.ratelimit"):
        call(trusted, "GET", "/", [("x-forwarded-for", "203.0.113.7")])
        call(trusted, "GET", "/", [("x-forwarded-for", "not-an-address")])  # malformed, from a trusted proxy
        call(trusted, "GET", "/", [("forwarded", "for=203.0.113.7")])  # the other header, from a trusted proxy
        call(direct, "GET", "/", [("x-real-ip", "203.0.113.7"), ("x-forwarded-host", "a.example")])
        call(direct, "GET", "/")
    assert _forwarding_warnings(caplog) == []
    assert ratelimit._warned_untrusted_forwarding is False


@pytest.mark.usefixtures("fresh_warning")
def test_forwarding_warning_does_not_change_the_answer(caplog: pytest.LogCaptureFixture) -> None:
    app = protect(ok_app, settings(rate_limit="2/minute"))

    async def requests() -> list[Response]:
        return [await acall(app, http_scope("GET", "/", [("x-forwarded-for", f"203.0.113.{n}")])) for n in range(3)]

    with caplog.at_level(logging.WARNING, logger="thallus.ratelimit"):
        statuses = [response.status for response in asyncio.run(requests())]
    assert statuses == [200, 200, 429]  # every client behind the peer shares one limit, as the warning says
    assert len(_forwarding_warnings(caplog)) == 1


# -- the hooks protect() passes on -------------------------------------------------------------


def test_protect_passes_the_csrf_refusal_hook_and_the_correlation_callables() -> None:
    from starlette.responses import JSONResponse

    from tests.asgi import call as call_app

    seen: list[str] = []

    def refusal(scope: Any, reason: str) -> JSONResponse:
        """A JSON refusal of the application's own shape (a non-JSON error body would be turned
        into the §8 shape by the error boundary, like any error the application answers)."""
        seen.append(reason)
        return JSONResponse({"problem": "cross-origin", "reason": reason}, status_code=403)

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = protect(
        ok,
        Settings(env="production", allowed_origins=("https://app.example.com",), rate_limit_enabled=False),
        csrf_refusal=refusal,
        correlation_id_generator=lambda: "req-fixed-0001",
        correlation_id_validator=lambda value: value.startswith("req-"),
    )
    refused = call_app(app, "POST", "/items", [("origin", "https://evil.example"), ("cookie", "a=1")])
    assert (refused.status, refused.json(), seen) == (
        403,
        {"problem": "cross-origin", "reason": "Origin is not a trusted origin"},
        ["Origin is not a trusted origin"],
    )
    assert refused.header("x-correlation-id") == "req-fixed-0001"
    assert call_app(app, "GET", "/", [("x-correlation-id", "req-from-client")]).header("x-correlation-id") == (
        "req-from-client"
    )
    assert call_app(app, "GET", "/", [("x-correlation-id", "other-id")]).header("x-correlation-id") == "req-fixed-0001"
