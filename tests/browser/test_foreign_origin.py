"""Scenario 2 — a foreign origin: CORS blocks reads and preflights, SameSite and CSRF stop forged POSTs.

The attacker's page is ``http://127.0.0.1:FOREIGN``: another *site* than the API
(``http://localhost:API``). A same-site but untrusted page, ``http://localhost:SIBLING``, plays a
sibling subdomain (``evil.example.com`` next to ``api.example.com``): SameSite cookies do go from
there to the API, so only the CSRF origin check stands between it and the session.

What a page cannot see (a response CORS withheld, a request the browser never sent) is proved
from the server's log. The misconfigured control reflects any origin with credentials, has no
CSRF check and a ``SameSite=None`` cookie; the same checks then report every hole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.browser.support import (
    CORS,
    CSRF,
    Backend,
    CookieWitness,
    Entry,
    NewContext,
    Result,
    Screenshot,
    Sites,
    api_key_for,
    call,
    open_client,
    refresh_cookie,
    settle,
    submit_form,
)

pytestmark = pytest.mark.browser

READ_PATH = "/health"
KEY_PATH = "/api/v1/users/me"
REFRESH_PATH = "/api/v1/auth/refresh"


# -- reading across origins ---------------------------------------------------------------------


@dataclass
class ForeignFetches:
    credentialed: Result
    with_key: Result
    reads: list[Entry]
    preflights: list[Entry]
    key_requests: list[Entry]


def fetch_from_foreign(page: Page, sites: Sites, backend: Backend, key: str) -> ForeignFetches:
    open_client(page, sites.foreign, backend)
    since = backend.log.mark()
    # A credentialed GET is "simple" (no preflight): the browser sends it, then withholds the answer.
    credentialed = call(page, "credentialed", backend.origin, READ_PATH)
    # X-API-Key is not CORS-safelisted: the browser asks first (OPTIONS), sends the GET only if allowed.
    with_key = call(page, "get", backend.origin, KEY_PATH, {"X-API-Key": key})
    settle(page, backend)
    run = ForeignFetches(
        credentialed=credentialed,
        with_key=with_key,
        reads=backend.log.access("GET", READ_PATH, since),
        preflights=backend.log.access("OPTIONS", KEY_PATH, since),
        key_requests=backend.log.access("GET", KEY_PATH, since),
    )
    for label, entries in (("GET " + READ_PATH, run.reads), ("OPTIONS " + KEY_PATH, run.preflights)):
        call(page, "note", f"server log: {label} → {[entry['status'] for entry in entries]}")
    call(page, "note", f"server log: GET {KEY_PATH} → {[entry['status'] for entry in run.key_requests]}")
    return run


def fetch_violations(run: ForeignFetches) -> list[str]:
    problems: list[str] = []
    if "error" not in run.credentialed:
        problems.append(f"the foreign page read a credentialed response: {run.credentialed['status']}")
    if "error" not in run.with_key:
        problems.append(f"the foreign page read an API-key response: {run.with_key['status']}")
    if not run.preflights:
        problems.append("no preflight reached the server")
    elif any(entry["status"] < 400 for entry in run.preflights):
        problems.append("the foreign origin's preflight was allowed")
    if run.key_requests:
        problems.append(f"the API-key request reached the handler: {[e['status'] for e in run.key_requests]}")
    return problems


def test_foreign_fetches_blocked(
    new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot
) -> None:
    key = api_key_for(thallus_dev)
    with httpx.Client() as client:  # the key is good: only CORS can keep the browser's GET from working
        assert client.get(thallus_dev.url(KEY_PATH), headers={"X-API-Key": key}).status_code == 200
    page = new_context().new_page()
    since = thallus_dev.log.mark()
    run = fetch_from_foreign(page, sites, thallus_dev, key)
    screenshot(page)
    assert fetch_violations(run) == []

    # The page saw only a network error — it cannot even tell 200 from 403.
    assert run.credentialed == run.with_key == {"error": "TypeError: Failed to fetch"}
    # The credentialed GET reached the server and was answered (CORS guards reading, not sending) …
    assert [entry["status"] for entry in run.reads] == [200]
    # … the preflight was refused, and the GET it asked about was never sent.
    assert [entry["status"] for entry in run.preflights] == [403]
    assert run.key_requests == []
    refusals = thallus_dev.log.logged(CORS, since)
    assert [entry["cors"]["origin"] for entry in refusals] == [sites.foreign]


def test_foreign_fetches_negative_control(
    new_context: NewContext, sites: Sites, naive: Backend, screenshot: Screenshot
) -> None:
    page = new_context().new_page()
    run = fetch_from_foreign(page, sites, naive, "thal_anything")
    screenshot(page)
    assert fetch_violations(run) == [
        "the foreign page read a credentialed response: 200",
        "the foreign page read an API-key response: 200",
        "the foreign origin's preflight was allowed",
        "the API-key request reached the handler: [200]",
    ]


# -- forged form POSTs --------------------------------------------------------------------------


@dataclass
class FormAttempt:
    status: int
    body: Any
    cookie: str  # what Chromium did with the refresh cookie: "sent" or why it withheld it


@dataclass
class ForgedPosts:
    cross_site: FormAttempt
    same_site: FormAttempt
    refresh_afterwards: Result


def forge_posts(new_context: NewContext, sites: Sites, backend: Backend) -> tuple[ForgedPosts, list[Page]]:
    """The victim signs in on the SPA; then two pages in the same browser auto-submit a form to the
    refresh endpoint — one from another site, one from a same-site but untrusted origin."""
    context = new_context()
    spa = context.new_page()
    open_client(spa, sites.spa, backend)
    assert call(spa, "login", backend.origin, backend.email, backend.password)["status"] == 200
    witness = CookieWitness()
    attempts: list[FormAttempt] = []
    pages: list[Page] = []
    for site in (sites.foreign, sites.sibling):
        page = witness.watch(context.new_page())
        response = submit_form(page, site, backend.url(REFRESH_PATH))
        cookie = witness.refresh_cookie(page, "POST", backend.url(REFRESH_PATH))
        attempts.append(FormAttempt(response.status, response.json(), cookie))
        pages.append(page)
    refresh_afterwards = call(spa, "refresh", backend.origin)
    return ForgedPosts(attempts[0], attempts[1], refresh_afterwards), [spa, *pages]


def form_violations(run: ForgedPosts) -> list[str]:
    problems: list[str] = []
    if run.cross_site.status == 200:
        problems.append("a cross-site form POST refreshed the session with the victim's cookie")
    if run.same_site.status == 200:
        problems.append("a form POST from an untrusted same-site origin refreshed the session")
    if run.refresh_afterwards.get("status") != 200:
        problems.append(f"the SPA's session did not survive: {run.refresh_afterwards}")
    return problems


def test_forged_form_posts_refused(
    new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot
) -> None:
    since = thallus_dev.log.mark()
    run, (spa, cross_site, same_site) = forge_posts(new_context, sites, thallus_dev)
    screenshot(cross_site, "cross-site")
    screenshot(same_site, "same-site")
    screenshot(spa, "spa")
    assert form_violations(run) == []

    # Cross-site: development's cookie is SameSite=Lax, and a cross-site POST — even a top-level
    # navigation — does not carry a Lax cookie (Chromium says so). The request reached the server
    # without it, so CSRF did not apply ("no cookie to protect") and /refresh itself answered 401.
    assert run.cross_site.cookie == "SameSiteLax"
    assert (run.cross_site.status, run.cross_site.body["message"]) == (401, "No refresh token: sign in first.")
    # Same site, untrusted origin: SameSite lets the cookie through, so the CSRF check decides —
    # the Origin is not allowlisted: 403 CSRFError, logged with the offending origin.
    assert run.same_site.cookie == "sent"
    assert (run.same_site.status, run.same_site.body["error"]) == (403, "CSRFError")
    refusals = [entry["csrf"] for entry in thallus_dev.log.logged(CSRF, since)]
    assert refusals == [{"reason": "Origin is not a trusted origin", "origin": sites.sibling}]
    statuses = [entry["status"] for entry in thallus_dev.log.access("POST", REFRESH_PATH, since)]
    assert statuses == [401, 403, 200], "the two forgeries, then the SPA's own refresh"


def test_forged_form_posts_negative_control(
    new_context: NewContext, sites: Sites, naive: Backend, screenshot: Screenshot
) -> None:
    run, (_spa, cross_site, same_site) = forge_posts(new_context, sites, naive)
    screenshot(cross_site, "cross-site")
    screenshot(same_site, "same-site")
    assert run.cross_site.cookie == run.same_site.cookie == "sent", "SameSite=None goes everywhere"
    assert form_violations(run) == [
        "a cross-site form POST refreshed the session with the victim's cookie",
        "a form POST from an untrusted same-site origin refreshed the session",
    ]


def test_cross_site_logout_leaves_the_session_alone(
    new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot
) -> None:
    """A forged logout carries no cookie (SameSite) and so authenticates nothing; it must change nothing."""
    context = new_context()
    spa = context.new_page()
    open_client(spa, sites.spa, thallus_dev)
    assert call(spa, "login", thallus_dev.origin, thallus_dev.email, thallus_dev.password)["status"] == 200
    witness = CookieWitness()
    page = witness.watch(context.new_page())
    submit_form(page, sites.foreign, thallus_dev.url("/api/v1/auth/logout"))
    assert witness.refresh_cookie(page, "POST", thallus_dev.url("/api/v1/auth/logout")) == "SameSiteLax"
    refresh = call(spa, "refresh", thallus_dev.origin)
    screenshot(spa)
    assert refresh_cookie(context) is not None, "the forged logout deleted the refresh cookie"
    assert refresh["status"] == 200
