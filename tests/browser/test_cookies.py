"""Scenario 5 — production-like cookies over loopback: Secure, HttpOnly, SameSite=Strict, Path=/api/v1/auth.

``THALLUS_ENV=production`` refuses ``http://`` origins, so the production cookie policy is exercised
with ``THALLUS_ENV=test``, which sets the same cookie. Chromium treats ``http://localhost`` as a
secure context, so it stores and sends a ``Secure`` cookie there.

Where the cookie goes is observed twice: by the browser (the headers Chromium really sent, through
Playwright) and by the server. ``thallus serve`` logs no cookies, but its CSRF layer is a witness:
a page on ``http://localhost:SIBLING`` — same site as the API, so SameSite=Strict lets cookies
through, but not allowlisted — sends blind POSTs (``mode: "no-cors"``, no preflight) to several
paths. A POST from an untrusted origin is refused with 403 ``CSRFError`` *exactly* when it carries
a cookie (cookieless requests are not checked), so a refusal in the log means "the cookie arrived"
and its absence means "it did not". The probe to ``/api/v1/auth/refresh`` is the control that the
witness works: there the cookie must arrive and be refused.

``SameSite=Strict`` shows where Lax would not: a link on another site is followed without the cookie.
The same checks flag development's profile (not Secure, Lax) and the misconfigured app (no HttpOnly,
``Path=/``, ``SameSite=None``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, Cookie, Page

from tests.browser.support import (
    CSRF,
    RELAXED_RATE_LIMITS,
    Backend,
    CookieWitness,
    Entry,
    NewContext,
    Screenshot,
    Sites,
    call,
    open_client,
    refresh_cookie,
    settle,
    submit_form,
    thallus_service,
)

pytestmark = pytest.mark.browser

AUTH_PATH = "/api/v1/auth"
CONTROL = "/api/v1/auth/refresh"
# Other paths of the API; /api/v1/authz shares the prefix but not the path (cookie path-match is by segment).
OTHER_PATHS = ("/api/v1/api-keys", "/api/v1/users/me", "/api/v1/authz", "/")


@pytest.fixture(scope="module")
def thallus_test_env(sites: Sites, tmp_path_factory: pytest.TempPathFactory, chromium: Browser) -> Iterator[Backend]:
    """``thallus serve`` with THALLUS_ENV=test: production's cookie and strict CSRF, http origins allowed."""
    environment = {
        "THALLUS_ENV": "test",
        "THALLUS_SECRET_KEY": "browser-tests-" + "s" * 40,
        "THALLUS_ALLOWED_ORIGINS": sites.spa,
        **RELAXED_RATE_LIMITS,
    }
    data_dir = tmp_path_factory.mktemp("thallus-test-env")
    with thallus_service("thallus serve (test)", environment, data_dir, "grace@example.com") as backend:
        yield backend


@dataclass
class Probe:
    status: int
    browser: str  # Chromium's word on the refresh cookie: "sent", or why it withheld it
    server_saw_cookie: bool


@dataclass
class CookieRun:
    cookie: Cookie | None
    refresh_status: int
    refresh: str
    probes: dict[str, Probe]
    cross_site_form_status: int
    cross_site_form: str
    cross_site_link: str


def server_saw_cookie(backend: Backend, entry: Entry, since: int) -> bool:
    if "cookie" in entry:  # the misconfigured app logs whether a Cookie header came
        return bool(entry["cookie"])
    # thallus serve: the CSRF refusal of this very request (same correlation ID), see the module doc.
    return any(line.get("correlation_id") == entry["correlation_id"] for line in backend.log.logged(CSRF, since))


def blind_posts(page: Page, witness: CookieWitness, backend: Backend) -> dict[str, Probe]:
    since = backend.log.mark()
    for path in (CONTROL, *OTHER_PATHS):
        call(page, "blindPost", backend.origin, path)
    settle(page, backend)
    probes: dict[str, Probe] = {}
    for path in (CONTROL, *OTHER_PATHS):
        [entry] = backend.log.access("POST", path, since)
        browser = witness.refresh_cookie(page, "POST", backend.url(path))
        probes[path] = Probe(entry["status"], browser, server_saw_cookie(backend, entry, since))
        call(page, "note", f"{path}: Chromium {browser}; server answered {entry['status']}")  # for the screenshot
    return probes


def run_cookies(new_context: NewContext, sites: Sites, backend: Backend) -> tuple[CookieRun, list[Page]]:
    """Sign in on the SPA and refresh; probe paths from the sibling; a form and a link from another site."""
    context = new_context()
    witness = CookieWitness()
    spa = witness.watch(context.new_page())
    open_client(spa, sites.spa, backend)
    assert call(spa, "login", backend.origin, backend.email, backend.password)["status"] == 200
    cookie = refresh_cookie(context)
    refresh = call(spa, "refresh", backend.origin)
    sibling = witness.watch(context.new_page())
    open_client(sibling, sites.sibling, backend)
    probes = blind_posts(sibling, witness, backend)
    form_page = witness.watch(context.new_page())
    form = submit_form(form_page, sites.foreign, backend.url(CONTROL))
    link_page = witness.watch(context.new_page())
    link_page.goto(f"{sites.foreign}/link.html?target={quote(backend.url(CONTROL), safe='')}")
    with link_page.expect_response(backend.url(CONTROL)):
        link_page.click("#link")
    run = CookieRun(
        cookie=cookie,
        refresh_status=refresh["status"],
        refresh=witness.refresh_cookie(spa, "POST", backend.url(CONTROL)),
        probes=probes,
        cross_site_form_status=form.status,
        cross_site_form=witness.refresh_cookie(form_page, "POST", backend.url(CONTROL)),
        cross_site_link=witness.refresh_cookie(link_page, "GET", backend.url(CONTROL)),
    )
    return run, [spa, sibling]


def cookie_violations(run: CookieRun) -> list[str]:
    """Departures from production's cookie policy (docs/design.md §6), one line each."""
    problems: list[str] = []
    if run.cookie is None:
        return ["no refresh cookie was stored"]
    if run.cookie["name"] != "__Secure-thallus_refresh":
        problems.append(f"refresh cookie named {run.cookie['name']}, without the __Secure- prefix")
    if not run.cookie["secure"]:
        problems.append("refresh cookie not Secure")
    if not run.cookie["httpOnly"]:
        problems.append("refresh cookie readable by scripts")
    if run.cookie["sameSite"] != "Strict":
        problems.append(f"refresh cookie SameSite={run.cookie['sameSite']}")
    if run.cookie["path"] != AUTH_PATH:
        problems.append(f"refresh cookie path is {run.cookie['path']}")
    if run.refresh_status != 200 or run.refresh != "sent":
        problems.append(f"the refresh cookie did not work on {CONTROL}: {run.refresh_status}, {run.refresh}")
    for path, probe in run.probes.items():
        if (probe.browser == "sent") != probe.server_saw_cookie:
            problems.append(f"browser and server disagree about the cookie on {path}: {probe}")
        elif path == CONTROL and not probe.server_saw_cookie:
            problems.append(f"control: the sibling's POST to {path} did not carry the cookie; the probes prove nothing")
        elif path != CONTROL and probe.server_saw_cookie:
            problems.append(f"the refresh cookie was sent to {path}")
    if run.cross_site_form == "sent" or run.cross_site_form_status == 200:
        problems.append("a cross-site form POST carried the refresh cookie")
    if run.cross_site_link == "sent":
        problems.append("a cross-site link carried the refresh cookie")
    return problems


def test_production_like_cookies(
    new_context: NewContext, sites: Sites, thallus_test_env: Backend, screenshot: Screenshot
) -> None:
    run, (spa, sibling) = run_cookies(new_context, sites, thallus_test_env)
    screenshot(sibling, "sibling-probes")
    screenshot(spa, "spa")
    assert cookie_violations(run) == []
    assert run.cookie is not None
    assert (run.cookie["secure"], run.cookie["httpOnly"], run.cookie["sameSite"]) == (True, True, "Strict")
    # The witness at work: the cookie reached the auth path only, where CSRF refused the untrusted
    # origin; elsewhere no cookie, so no CSRF check, and the route answered for itself.
    assert run.probes[CONTROL] == Probe(403, "sent", True)
    for path in OTHER_PATHS:
        assert run.probes[path].browser == "NotOnPath"
        assert run.probes[path].status != 403 and not run.probes[path].server_saw_cookie
    # Strict: nothing from another site carries it, not even a link the user follows.
    assert (run.cross_site_form, run.cross_site_form_status) == ("SameSiteStrict", 401)  # 401: "No refresh token"
    assert run.cross_site_link == "SameSiteStrict"


def test_development_cookies_are_not_production_grade(
    new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot
) -> None:
    """The same checks on development's profile: plain-http Lax cookies — as §6 specifies there."""
    run, (_spa, sibling) = run_cookies(new_context, sites, thallus_dev)
    screenshot(sibling)
    assert (run.cross_site_form, run.cross_site_link) == ("SameSiteLax", "sent")
    assert cookie_violations(run) == [
        "refresh cookie named thallus_refresh, without the __Secure- prefix",
        "refresh cookie not Secure",
        "refresh cookie SameSite=Lax",
        "a cross-site link carried the refresh cookie",  # Lax goes along on top-level GET navigations
    ]


def test_cookies_negative_control(
    new_context: NewContext, sites: Sites, naive: Backend, screenshot: Screenshot
) -> None:
    run, (_spa, sibling) = run_cookies(new_context, sites, naive)
    screenshot(sibling)
    assert cookie_violations(run) == [
        "refresh cookie named thallus_refresh, without the __Secure- prefix",
        "refresh cookie readable by scripts",
        "refresh cookie SameSite=None",
        "refresh cookie path is /",
        *(f"the refresh cookie was sent to {path}" for path in OTHER_PATHS),
        "a cross-site form POST carried the refresh cookie",
        "a cross-site link carried the refresh cookie",
    ]
