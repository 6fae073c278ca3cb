"""Scenario 1 — the allowlisted SPA: login, refresh cookie, Bearer token, API key, correlation IDs.

The page at ``http://localhost:SPA`` (allowlisted, same site as the API at ``http://localhost:API``)
does what a real SPA does with ``fetch``: log in with a JSON body and ``credentials: "include"``,
keep the HttpOnly refresh cookie the response sets, refresh through it (the browser sends
``Origin: <SPA>``, which CSRF trusts because it is allowlisted), call the API with the access
token and with an API key it created, and read ``X-Correlation-ID`` from a response header
(exposed by CORS) and from an error body. The misconfigured control exposes no header and sets a
cookie scripts can read, sent everywhere: the same checks report exactly that.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
from playwright.sync_api import Cookie, Page

from tests.browser.support import (
    CORS,
    CSRF,
    Backend,
    Entry,
    NewContext,
    Result,
    Screenshot,
    Sites,
    call,
    open_client,
    refresh_cookie,
)

pytestmark = pytest.mark.browser


@dataclass
class SpaRun:
    login: Result
    cookie: Cookie | None
    refresh: Result
    rotated_cookie: Cookie | None
    me_bearer: Result
    created_key: Result
    me_key: Result
    missing: Result
    traced: Result
    trace_id: str
    script_cookies: str
    missing_logged: Entry


def run_spa(page: Page, sites: Sites, backend: Backend) -> SpaRun:
    api = backend.origin
    open_client(page, sites.spa, backend)
    login = call(page, "login", api, backend.email, backend.password)
    cookie = refresh_cookie(page.context)
    refresh = call(page, "refresh", api)
    rotated = refresh_cookie(page.context)
    token = (refresh.get("body") or {}).get("access_token", "")
    me_bearer = call(page, "get", api, "/api/v1/users/me", {"Authorization": f"Bearer {token}"})
    created = call(page, "createKey", api, token)
    key = (created.get("body") or {}).get("key", "")
    me_key = call(page, "get", api, "/api/v1/users/me", {"X-API-Key": key})
    since = backend.log.mark()
    missing = call(page, "get", api, "/api/v1/no-such-thing")
    trace_id = "spa-" + secrets.token_hex(6)
    traced = call(page, "get", api, "/health", {"X-Correlation-ID": trace_id})
    return SpaRun(
        login=login,
        cookie=cookie,
        refresh=refresh,
        rotated_cookie=rotated,
        me_bearer=me_bearer,
        created_key=created,
        me_key=me_key,
        missing=missing,
        traced=traced,
        trace_id=trace_id,
        script_cookies=str(page.evaluate("document.cookie")),
        missing_logged=backend.log.wait_for_access("GET", "/api/v1/no-such-thing", since),
    )


def violations(run: SpaRun, backend: Backend) -> list[str]:
    """What went wrong for the SPA, one line each; empty when the API behaves as specified."""
    problems: list[str] = []
    if run.login.get("status") != 200 or "access_token" not in (run.login.get("body") or {}):
        problems.append(f"login failed: {run.login}")
    if run.cookie is None:
        problems.append("no refresh cookie was stored")
    else:
        if not run.cookie["httpOnly"] or "thallus_refresh" in run.script_cookies:
            problems.append("refresh cookie readable by scripts")
        if run.cookie["path"] != "/api/v1/auth":
            problems.append(f"refresh cookie path is {run.cookie['path']}")
        if run.cookie["sameSite"] not in ("Lax", "Strict"):
            problems.append(f"refresh cookie SameSite={run.cookie['sameSite']}")
    if run.refresh.get("status") != 200:
        problems.append(f"refresh through the cookie failed: {run.refresh}")
    elif run.rotated_cookie is None or run.cookie is None or run.rotated_cookie["value"] == run.cookie["value"]:
        problems.append("refresh cookie not rotated")
    for label, result in (("Bearer token", run.me_bearer), ("API key", run.me_key)):
        if result.get("status") != 200 or (result.get("body") or {}).get("email") != backend.email:
            problems.append(f"GET /api/v1/users/me with the {label} failed: {result}")
    if run.created_key.get("status") != 201:
        problems.append(f"API key creation failed: {run.created_key}")
    header = run.missing.get("correlationId")
    if run.missing.get("status") != 404:
        problems.append(f"unknown path did not answer 404: {run.missing}")
    elif header is None:
        problems.append("X-Correlation-ID not readable")
    else:
        if (run.missing.get("body") or {}).get("correlation_id") != header:
            problems.append("error body correlation_id differs from X-Correlation-ID")
        if run.missing_logged.get("correlation_id") != header:
            problems.append("the server logged another correlation ID")
        if run.traced.get("correlationId") != run.trace_id:
            problems.append("the SPA's own X-Correlation-ID was not echoed")
    return problems


def test_allowed_spa(new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot) -> None:
    page = new_context().new_page()
    since = thallus_dev.log.mark()
    run = run_spa(page, sites, thallus_dev)
    screenshot(page)
    assert violations(run, thallus_dev) == []

    assert run.cookie is not None
    assert (run.cookie["httpOnly"], run.cookie["sameSite"], run.cookie["secure"]) == (True, "Lax", False)
    assert run.script_cookies == ""
    # What reached the server: every step, and not one CSRF or CORS refusal. The refresh carried
    # the cookie (it is the only credential /refresh reads) and the SPA's Origin, which CSRF trusts.
    log = thallus_dev.log
    assert [e["status"] for e in log.access("POST", "/api/v1/auth/refresh", since)] == [200]
    # Authorization and X-API-Key are not CORS-safelisted: preflighted (the answer is cached, Max-Age).
    assert {e["status"] for e in log.access("OPTIONS", "/api/v1/users/me", since)} == {204}
    assert [e["status"] for e in log.access("GET", "/api/v1/users/me", since)] == [200, 200]
    assert log.logged(CSRF, since) == log.logged(CORS, since) == []
    # The ID the page read is the one in the server's log line for that request.
    assert run.missing_logged["correlation_id"] == run.missing["correlationId"] == run.missing["body"]["correlation_id"]


def test_allowed_spa_negative_control(
    new_context: NewContext, sites: Sites, naive: Backend, screenshot: Screenshot
) -> None:
    """The same page against the misconfigured app: the flow works, the checks catch the rest."""
    page = new_context().new_page()
    run = run_spa(page, sites, naive)
    screenshot(page)
    assert violations(run, naive) == [
        "refresh cookie readable by scripts",
        "refresh cookie path is /",
        "refresh cookie SameSite=None",
        "X-Correlation-ID not readable",
    ]
    assert run.missing_logged["correlation_id"], "the header was there; CORS did not expose it to the page"
