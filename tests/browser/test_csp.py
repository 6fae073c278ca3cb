"""Scenario 4 — Content-Security-Policy: an injected inline script does not run; ``/docs`` renders clean.

An app with a reflected-XSS bug (tests.browser.naive.xss_app: ``/greet?name=`` goes into the HTML
unescaped) runs under uvicorn wrapped by :func:`thallus.protect`. The payload is an inline
``<script>``; the page's own same-origin script must still run (so a blocked payload means CSP,
not "no JavaScript"). Violations are recorded by a listener that Playwright installs before any
page script (``add_init_script``), so none is missed. The negative control is the same app
unwrapped: the payload runs and nothing is reported.

``/docs`` of the real ``thallus serve`` must render Swagger UI completely (its operations listed)
under its nonce'd policy without a single violation. Its negative control is the same docs page
behind a misconfigured proxy that sets one CSP for every path, dropping the page's nonce.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from playwright.sync_api import BrowserContext, Page

from tests.browser.naive import INJECTED_TEXT, PAYLOAD, ReplaceCsp, docs_app, xss_app
from tests.browser.support import Backend, NewContext, Screenshot, uvicorn_thread
from thallus import Settings, protect
from thallus.headers import ContentSecurityPolicy

pytestmark = pytest.mark.browser

RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push({
    directive: event.effectiveDirective, blocked: event.blockedURI, disposition: event.disposition
  });
});
"""
BASELINE_CSP = ContentSecurityPolicy().render()


@pytest.fixture(scope="module")
def protected_xss() -> Iterator[str]:
    with uvicorn_thread(protect(xss_app(), Settings())) as port:
        yield f"http://localhost:{port}"


@pytest.fixture(scope="module")
def bare_xss() -> Iterator[str]:
    with uvicorn_thread(xss_app()) as port:
        yield f"http://localhost:{port}"


@pytest.fixture(scope="module")
def docs_without_nonce() -> Iterator[str]:
    with uvicorn_thread(ReplaceCsp(protect(docs_app(), Settings()), BASELINE_CSP)) as port:
        yield f"http://localhost:{port}"


def recording_page(context: BrowserContext, console: list[str]) -> Page:
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    return page


# -- an injected inline script -------------------------------------------------------------------


@dataclass
class Injection:
    injected: Any
    own_script: Any
    violations: list[dict[str, str]]
    console: list[str]


def inject(context: BrowserContext, origin: str) -> tuple[Injection, Page]:
    console: list[str] = []
    page = recording_page(context, console)
    page.goto(f"{origin}/greet?name={quote(PAYLOAD, safe='')}")
    # An inline script runs while the document is parsed, before "load"; a blocked one is reported
    # by an event queued right after. One of the two has happened once this returns.
    page.wait_for_function("window.injected === 'ran' || window.cspViolations.length > 0")
    run = Injection(
        injected=page.evaluate("window.injected"),
        own_script=page.evaluate("window.appScript"),
        violations=page.evaluate("window.cspViolations"),
        console=console,
    )
    return run, page


def injection_violations(run: Injection) -> list[str]:
    problems: list[str] = []
    if run.own_script != "ran":
        problems.append("the page's own same-origin script did not run")
    if run.injected == "ran":
        problems.append("the injected inline script ran")
    if not any(v["directive"] == "script-src-elem" and v["blocked"] == "inline" for v in run.violations):
        problems.append("no securitypolicyviolation event for the inline script")
    return problems


def test_injected_inline_script_blocked(new_context: NewContext, protected_xss: str, screenshot: Screenshot) -> None:
    run, page = inject(new_context(), protected_xss)
    screenshot(page)
    assert injection_violations(run) == []
    assert run.violations == [{"directive": "script-src-elem", "blocked": "inline", "disposition": "enforce"}]
    assert any("violates the following Content Security Policy directive" in line for line in run.console)
    assert page.get_by_text(INJECTED_TEXT, exact=True).count() == 0


def test_injected_inline_script_negative_control(
    new_context: NewContext, bare_xss: str, screenshot: Screenshot
) -> None:
    run, page = inject(new_context(), bare_xss)
    screenshot(page)
    assert injection_violations(run) == [
        "the injected inline script ran",
        "no securitypolicyviolation event for the inline script",
    ]
    assert page.get_by_text(INJECTED_TEXT, exact=True).count() == 1


# -- /docs ---------------------------------------------------------------------------------------


@dataclass
class Docs:
    operations: int
    violations: list[dict[str, str]]
    console: list[str]


def open_docs(context: BrowserContext, origin: str) -> tuple[Docs, Page]:
    console: list[str] = []
    page = recording_page(context, console)
    page.goto(origin + "/docs")
    page.wait_for_load_state("networkidle")  # the spec is fetched and rendered, or the UI never started
    page.wait_for_function("document.querySelector('.opblock') !== null || window.cspViolations.length > 0")
    run = Docs(
        operations=page.locator(".opblock").count(),
        violations=page.evaluate("window.cspViolations"),
        console=console,
    )
    return run, page


def docs_violations(run: Docs) -> list[str]:
    problems: list[str] = []
    if run.operations == 0:
        problems.append("Swagger UI did not render the operations")
    if run.violations:
        problems.append(f"CSP violations: {sorted({v['directive'] for v in run.violations})}")
    if any("Content Security Policy" in line for line in run.console):
        problems.append("CSP messages on the console")
    return problems


def test_docs_render_without_violations(new_context: NewContext, thallus_dev: Backend, screenshot: Screenshot) -> None:
    run, page = open_docs(new_context(), thallus_dev.origin)
    screenshot(page)
    assert docs_violations(run) == []
    assert run.operations >= 10, "every operation of the reference API is listed"
    assert page.get_by_text("/api/v1/auth/login").first.is_visible()
    assert [line for line in run.console if line.startswith("error")] == []


def test_docs_negative_control(new_context: NewContext, docs_without_nonce: str, screenshot: Screenshot) -> None:
    run, page = open_docs(new_context(), docs_without_nonce)
    screenshot(page)
    assert docs_violations(run) == [
        "Swagger UI did not render the operations",
        "CSP violations: ['script-src-elem']",
        "CSP messages on the console",
    ]
