"""CSRF (docs/design.md §5): the decision table, properties of the pure function, and the ASGI wrapper."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.apps import ok_app
from tests.asgi import call, websocket_handshake, websocket_scope
from thallus import csrf
from thallus.csrf import CSRFMiddleware, CsrfVerdict, Environment, csrf_verdict, has_cookie

PUBLIC = "https://api.example.com"
SPA = "https://app.example.com"
DEV_SPA = "http://localhost:3000"
TRUSTED = frozenset({PUBLIC, SPA, DEV_SPA})
ENVIRONMENTS: tuple[Environment, ...] = ("development", "test", "production")


def decide(
    method: str = "POST",
    *,
    cookies: bool = True,
    api_key: bool = False,
    site: str | None = None,
    origin: str | None = None,
    referer: str | None = None,
    env: Environment = "production",
) -> CsrfVerdict:
    return csrf_verdict(
        method,
        has_cookies=cookies,
        api_key_authenticated=api_key,
        sec_fetch_site=site,
        origin=origin,
        referer=referer,
        environment=env,
        trusted_origins=TRUSTED,
    )


# (id, request, allowed, reason) — the rows of §5 and every combination that matters.
TABLE: list[tuple[str, dict[str, Any], bool, str]] = [
    # -- when CSRF applies (the page's table) --
    ("GET is safe", {"method": "GET", "origin": "https://evil.com"}, True, csrf.EXEMPT_SAFE_METHOD),
    ("HEAD is safe", {"method": "HEAD", "site": "cross-site"}, True, csrf.EXEMPT_SAFE_METHOD),
    ("OPTIONS is safe", {"method": "OPTIONS", "origin": "null"}, True, csrf.EXEMPT_SAFE_METHOD),
    ("no cookies: not checked", {"cookies": False, "origin": "https://evil.com"}, True, csrf.EXEMPT_NO_COOKIES),
    ("valid API key: not checked", {"api_key": True, "origin": "https://evil.com"}, True, csrf.EXEMPT_API_KEY),
    ("POST cross-site refused", {"origin": "https://evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("PUT cross-site refused", {"method": "PUT", "origin": "https://evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("PATCH refused", {"method": "PATCH", "origin": "https://evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("DELETE refused", {"method": "DELETE", "origin": "https://evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    (
        "lower-case patch is checked",
        {"method": "patch", "origin": "https://evil.com"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    ("lower-case get is checked", {"method": "get", "origin": "https://evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    (
        "unknown method is checked",
        {"method": "PROPFIND", "origin": "https://evil.com"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    # -- rule 1: Sec-Fetch-Site --
    ("same-origin passes", {"site": "same-origin"}, True, csrf.PASS_FETCH_METADATA),
    ("none (navigation) passes", {"site": "none"}, True, csrf.PASS_FETCH_METADATA),
    (
        "same-origin passes even with a foreign Origin",
        {"site": "same-origin", "origin": "https://evil.com"},
        True,
        csrf.PASS_FETCH_METADATA,
    ),
    ("same-site alone refused", {"site": "same-site"}, False, csrf.REJECT_CROSS_SITE_NO_ORIGIN),
    ("cross-site alone refused", {"site": "cross-site"}, False, csrf.REJECT_CROSS_SITE_NO_ORIGIN),
    (
        "cross-site alone refused in development",
        {"site": "cross-site", "env": "development"},
        False,
        csrf.REJECT_CROSS_SITE_NO_ORIGIN,
    ),
    (
        "same-site with sibling Origin refused",
        {"site": "same-site", "origin": "https://evilapp.example.com"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    ("same-site with allowlisted Origin passes", {"site": "same-site", "origin": SPA}, True, csrf.PASS_TRUSTED_ORIGIN),
    (
        "cross-site with allowlisted Origin passes",
        {"site": "cross-site", "origin": SPA},
        True,
        csrf.PASS_TRUSTED_ORIGIN,
    ),
    ("unknown Sec-Fetch-Site falls back to Origin", {"site": "bogus", "origin": SPA}, True, csrf.PASS_TRUSTED_ORIGIN),
    (
        "unknown Sec-Fetch-Site without Origin refused",
        {"site": "bogus", "env": "development"},
        False,
        csrf.REJECT_CROSS_SITE_NO_ORIGIN,
    ),
    (
        "repeated same-origin values are not same-origin",
        {"site": "same-origin, same-origin"},
        False,
        csrf.REJECT_CROSS_SITE_NO_ORIGIN,
    ),
    # -- rule 2: Origin --
    ("own public origin passes", {"origin": PUBLIC}, True, csrf.PASS_TRUSTED_ORIGIN),
    ("allowlisted origin passes", {"origin": SPA}, True, csrf.PASS_TRUSTED_ORIGIN),
    ("upper-case scheme and host pass", {"origin": "HTTPS://APP.EXAMPLE.COM"}, True, csrf.PASS_TRUSTED_ORIGIN),
    ("null Origin refused", {"origin": "null"}, False, csrf.REJECT_NULL_ORIGIN),
    ("null Origin refused in development", {"origin": "null", "env": "development"}, False, csrf.REJECT_NULL_ORIGIN),
    ("look-alike suffix refused", {"origin": "https://app.example.com.evil.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("look-alike prefix refused", {"origin": "https://evilapp.example.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("sibling subdomain refused", {"origin": "https://www.example.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("scheme mismatch refused", {"origin": "http://app.example.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("explicit default port refused", {"origin": "https://app.example.com:443"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("other port refused", {"origin": "https://app.example.com:8443"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    (
        "dev port mismatch refused",
        {"origin": "http://localhost:3001", "env": "development"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    ("trailing slash refused", {"origin": SPA + "/"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("Origin with a path refused", {"origin": SPA + "/x"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("userinfo trick refused", {"origin": "https://evil.com@app.example.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    (
        "userinfo trick refused (reversed)",
        {"origin": "https://app.example.com@evil.com"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    ("unparsable Origin refused", {"origin": "https://["}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("empty Origin refused", {"origin": ""}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("non-ASCII Origin refused", {"origin": "https://app.exämple.com"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    ("two Origins joined are refused", {"origin": f"{SPA}, {SPA}"}, False, csrf.REJECT_UNTRUSTED_ORIGIN),
    (
        "Origin decides before Referer",
        {"origin": "https://evil.com", "referer": SPA + "/page"},
        False,
        csrf.REJECT_UNTRUSTED_ORIGIN,
    ),
    (
        "bad Origin not rescued by good Referer",
        {"origin": "null", "referer": SPA + "/"},
        False,
        csrf.REJECT_NULL_ORIGIN,
    ),
    # -- rule 3: Referer fallback --
    ("trusted Referer passes", {"referer": SPA + "/settings?tab=1"}, True, csrf.PASS_TRUSTED_REFERER),
    ("own-origin Referer passes", {"referer": PUBLIC + "/docs"}, True, csrf.PASS_TRUSTED_REFERER),
    ("bare-origin Referer passes", {"referer": SPA}, True, csrf.PASS_TRUSTED_REFERER),
    ("Referer with query only passes", {"referer": SPA + "?q=1"}, True, csrf.PASS_TRUSTED_REFERER),
    ("foreign Referer refused", {"referer": "https://evil.com/" + SPA}, False, csrf.REJECT_UNTRUSTED_REFERER),
    (
        "look-alike Referer refused",
        {"referer": "https://app.example.com.evil.com/"},
        False,
        csrf.REJECT_UNTRUSTED_REFERER,
    ),
    (
        "http Referer for https origin refused",
        {"referer": "http://app.example.com/"},
        False,
        csrf.REJECT_UNTRUSTED_REFERER,
    ),
    (
        "Referer with userinfo refused",
        {"referer": "https://app.example.com@evil.com/"},
        False,
        csrf.REJECT_UNTRUSTED_REFERER,
    ),
    (
        "Referer with default port refused",
        {"referer": "https://app.example.com:443/"},
        False,
        csrf.REJECT_UNTRUSTED_REFERER,
    ),
    ("scheme-relative Referer refused", {"referer": "//app.example.com/"}, False, csrf.REJECT_UNTRUSTED_REFERER),
    ("empty Referer refused", {"referer": ""}, False, csrf.REJECT_UNTRUSTED_REFERER),
    ("scheme-only Referer refused", {"referer": "https://"}, False, csrf.REJECT_UNTRUSTED_REFERER),
    ("unparsable Referer refused", {"referer": "https://["}, False, csrf.REJECT_UNTRUSTED_REFERER),
    ("non-ASCII Referer refused", {"referer": "https://app.example.com/é"}, False, csrf.REJECT_UNTRUSTED_REFERER),
    (
        "cross-site with trusted Referer passes",
        {"site": "cross-site", "referer": SPA + "/"},
        True,
        csrf.PASS_TRUSTED_REFERER,
    ),
    # -- rule 4: no evidence, per environment --
    ("no evidence refused in production", {"env": "production"}, False, csrf.REJECT_NO_EVIDENCE),
    ("no evidence refused in test", {"env": "test"}, False, csrf.REJECT_NO_EVIDENCE),
    ("no evidence passes in development", {"env": "development"}, True, csrf.PASS_NO_EVIDENCE_DEVELOPMENT),
    ("no evidence without cookies passes in production", {"cookies": False}, True, csrf.EXEMPT_NO_COOKIES),
]


@pytest.mark.parametrize(
    ("request_fields", "allowed", "reason"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_decision_table(request_fields: dict[str, Any], allowed: bool, reason: str) -> None:
    verdict = decide(**request_fields)
    assert (verdict.allowed, verdict.reason) == (allowed, reason)


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("origin", ["https://evil.com", "null", "https://app.example.com.evil.com"])
def test_untrusted_origin_refused_in_every_environment(env: Environment, origin: str) -> None:
    assert not decide(origin=origin, env=env).allowed


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_exemptions_hold_in_every_environment(env: Environment) -> None:
    assert decide("GET", env=env, origin="null").allowed
    assert decide(cookies=False, env=env, site="cross-site").allowed
    assert decide(api_key=True, env=env, origin="https://evil.com").allowed


# -- properties -------------------------------------------------------------------------------

header_values = st.one_of(
    st.none(), st.text(max_size=80), st.sampled_from([SPA, PUBLIC, "null", "same-origin", "none"])
)


@given(
    method=st.one_of(st.sampled_from(["GET", "POST", "patch", "DELETE", "HEAD"]), st.text(max_size=10)),
    cookies=st.booleans(),
    api_key=st.booleans(),
    site=header_values,
    origin=header_values,
    referer=header_values,
    env=st.sampled_from(ENVIRONMENTS),
)
def test_verdict_properties(
    method: str,
    cookies: bool,
    api_key: bool,
    site: str | None,
    origin: str | None,
    referer: str | None,
    env: Environment,
) -> None:
    verdict = decide(method, cookies=cookies, api_key=api_key, site=site, origin=origin, referer=referer, env=env)
    unchecked = method in {"GET", "HEAD", "OPTIONS"} or not cookies or api_key
    assert verdict.checked is not unchecked
    if unchecked:
        assert verdict.allowed
        return
    fetch_ok = site is not None and site.strip().lower() in {"same-origin", "none"}
    origin_ok = origin is not None and origin.isascii() and origin.lower() in TRUSTED
    if not verdict.allowed:
        assert not fetch_ok
        assert not origin_ok
    if verdict.allowed and not fetch_ok:
        # passing without the browser's word needs a trusted origin, or development with no evidence at all
        assert origin_ok or origin is None
        if origin is None and referer is None:
            assert env == "development"
            assert site is None


@given(st.text(min_size=1, max_size=60))
def test_no_string_equal_to_no_trusted_origin_passes(candidate: str) -> None:
    if candidate.isascii() and candidate.lower() in TRUSTED:
        return
    assert not decide(origin=candidate).allowed


def test_has_cookie() -> None:
    assert has_cookie("session=abc")
    assert has_cookie("garbage")
    assert has_cookie(" ; a=1")
    assert has_cookie("=")
    assert not has_cookie("")
    assert not has_cookie(" ;  ; ")


# -- the ASGI wrapper --------------------------------------------------------------------------


def middleware(env: Environment = "production") -> CSRFMiddleware:
    return CSRFMiddleware(ok_app, [PUBLIC, SPA], environment=env)


def test_wrapper_refuses_with_json_403() -> None:
    response = call(middleware(), "POST", "/items", [("cookie", "session=1"), ("origin", "https://evil.com")])
    assert response.status == 403
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert body["error"] == "CSRFError"
    assert body["details"] == {"reason": csrf.REJECT_UNTRUSTED_ORIGIN, "origin": "https://evil.com"}
    assert set(body) == {"error", "message", "details", "correlation_id"}


def test_refusal_names_only_the_referers_origin() -> None:
    referer = "https://evil.com/reset?token=s3cret"
    response = call(middleware(), "POST", "/", [("cookie", "s=1"), ("referer", referer)])
    assert response.json()["details"]["origin"] == "https://evil.com"
    assert "s3cret" not in response.body.decode()
    malformed = call(middleware(), "POST", "/", [("cookie", "s=1"), ("referer", "not a url?token=s3cret")])
    assert malformed.json()["details"]["origin"] == "(malformed Referer)"


def test_wrapper_passes_trusted_origin() -> None:
    response = call(middleware(), "POST", "/items", [("cookie", "session=1"), ("origin", SPA)])
    assert response.status == 200


def test_wrapper_passes_without_cookie() -> None:
    assert call(middleware(), "POST", "/items", [("origin", "https://evil.com")]).status == 200


def test_empty_cookie_header_is_not_a_cookie() -> None:
    assert call(middleware(), "POST", "/", [("cookie", ""), ("origin", "https://evil.com")]).status == 200


def test_garbage_cookie_is_checked_not_crashing() -> None:
    headers: list[tuple[str, str | bytes]] = [("cookie", b"\xff\x00;;=;\xfe"), ("origin", "https://evil.com")]
    assert call(middleware(), "POST", "/", headers).status == 403
    assert call(middleware(), "POST", "/", [("cookie", b"\xff\x00;;=;\xfe"), ("origin", SPA)]).status == 200


def test_cookies_in_a_second_cookie_header_count() -> None:
    headers = [("cookie", ""), ("cookie", "session=1"), ("origin", "https://evil.com")]
    assert call(middleware(), "POST", "/", headers).status == 403


def test_repeated_origin_headers_fail_closed() -> None:
    headers = [("cookie", "s=1"), ("origin", SPA), ("origin", SPA)]
    assert call(middleware(), "POST", "/", headers).status == 403


@pytest.mark.parametrize(
    "bad",
    [
        b"https://\xff\xfe",
        "https://" + "a" * 100_000,
        b"\x00\x01",
        "https://app.example.com\t",
        "ht tp://x",
        b"\xe2\x80\xae",
    ],
)
def test_hostile_origin_values_get_403_not_500(bad: bytes | str) -> None:
    response = call(middleware(), "POST", "/", [("cookie", "s=1"), ("origin", bad)])
    assert response.status == 403
    assert len(response.json()["details"]["origin"]) <= 200


@pytest.mark.parametrize("bad", [b"https://\xff/", "https://" + "a" * 100_000 + "/", b"\x00"])
def test_hostile_referer_values_get_403_not_500(bad: bytes | str) -> None:
    assert call(middleware(), "POST", "/", [("cookie", "s=1"), ("referer", bad)]).status == 403


def test_no_evidence_per_environment() -> None:
    assert call(middleware("production"), "POST", "/", [("cookie", "s=1")]).status == 403
    assert call(middleware("test"), "POST", "/", [("cookie", "s=1")]).status == 403
    assert call(middleware("development"), "POST", "/", [("cookie", "s=1")]).status == 200


def test_api_key_hand_off_exempts_only_when_marked() -> None:
    headers = [("cookie", "s=1"), ("origin", "https://evil.com"), ("x-api-key", "thal_whatever")]
    assert call(middleware(), "POST", "/", headers).status == 403, "an unverified key header alone never exempts"
    marked = call(middleware(), "POST", "/", headers, state={csrf.API_KEY_AUTHENTICATED_STATE_KEY: True})
    assert marked.status == 200
    truthy = call(middleware(), "POST", "/", headers, state={csrf.API_KEY_AUTHENTICATED_STATE_KEY: "yes"})
    assert truthy.status == 403, "only the exact value True exempts"


def test_mark_api_key_authenticated_sets_the_hand_off() -> None:
    scope: dict[str, Any] = {}
    csrf.mark_api_key_authenticated(scope)
    assert scope["state"][csrf.API_KEY_AUTHENTICATED_STATE_KEY] is True


def test_trusted_origins_are_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="path"):
        CSRFMiddleware(ok_app, ["https://app.example.com/"])
    with pytest.raises(ValueError, match="wildcard"):
        CSRFMiddleware(ok_app, ["*"])


def test_trusted_origins_are_canonicalised() -> None:
    layer = CSRFMiddleware(ok_app, ["HTTPS://App.Example.COM"])
    assert call(layer, "POST", "/", [("cookie", "s=1"), ("origin", SPA)]).status == 200


def test_lifespan_passes_untouched() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    import asyncio

    asyncio.run(CSRFMiddleware(app, [SPA])({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


# -- WebSocket handshakes (cross-site WebSocket hijacking) -------------------------------------


def test_cross_site_websocket_with_cookies_is_refused_before_accept() -> None:
    scope = websocket_scope(headers=[("cookie", "s=1"), ("origin", "https://evil.com")])
    sent = websocket_handshake(middleware(), scope)
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 403
    assert b'"CSRFError"' in sent[1]["body"]


def test_refused_websocket_closes_when_server_lacks_denial_extension() -> None:
    scope = websocket_scope(headers=[("cookie", "s=1"), ("origin", "https://evil.com")], denial_extension=False)
    sent = websocket_handshake(middleware(), scope)
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_trusted_websocket_is_accepted() -> None:
    scope = websocket_scope(headers=[("cookie", "s=1"), ("origin", SPA)])
    assert websocket_handshake(middleware(), scope)[0]["type"] == "websocket.accept"


def test_cookieless_websocket_is_not_checked() -> None:
    scope = websocket_scope(headers=[("origin", "https://evil.com")])
    assert websocket_handshake(middleware(), scope)[0]["type"] == "websocket.accept"


def test_websocket_without_evidence_follows_environment() -> None:
    assert (
        websocket_handshake(middleware("production"), websocket_scope(headers=[("cookie", "s=1")]))[0]["status"] == 403
    )
    assert websocket_handshake(middleware("development"), websocket_scope(headers=[("cookie", "s=1")]))[0]["type"] == (
        "websocket.accept"
    )
