"""Scenario 3 — framing: an API page in an ``<iframe>`` on a foreign site does not render.

The foreign page (``http://127.0.0.1:FOREIGN/frame.html``) frames the target. Chromium replaces a
refused frame with its error page (``chrome-error://chromewebdata/``) and says why on the
embedding page's console. Thallus sends both ``frame-ancestors 'none'`` (which wins where CSP is
supported) and ``X-Frame-Options: DENY`` (which still holds when CSP is turned off, checked on an
app wrapped by :func:`thallus.protect` with ``csp_enabled=False``). The misconfigured control sends
neither: its page renders inside the attacker's frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from playwright.sync_api import Page

from tests.browser.naive import NAIVE_DOCS_MARKER, xss_app
from tests.browser.support import Backend, NewContext, Screenshot, Sites, uvicorn_thread
from thallus import Settings, protect

pytestmark = pytest.mark.browser

REFUSED_FRAME = "chrome-error://chromewebdata/"


@pytest.fixture(scope="module")
def csp_off() -> Iterator[str]:
    """An app behind :func:`thallus.protect` with the CSP turned off: X-Frame-Options alone."""
    with uvicorn_thread(protect(xss_app(), Settings(csp_enabled=False))) as port:
        yield f"http://localhost:{port}"


@dataclass
class Framing:
    target: str
    frame_url: str
    frame_text: str
    console: list[str] = field(default_factory=list)


def frame_from_foreign(page: Page, sites: Sites, target: str, refusal: str | None = None) -> Framing:
    """Frame ``target``; with ``refusal``, also wait for that console message of the embedding page."""
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    url = f"{sites.foreign}/frame.html?target={quote(target, safe='')}"
    if refusal is None:
        page.goto(url)
    else:
        with page.expect_console_message(lambda message: refusal in message.text):
            page.goto(url)
    # The iframe's load event fires for a rendered page and for Chromium's refusal page alike.
    page.wait_for_selector("body[data-frame-loaded]", state="attached")
    handle = page.query_selector("#victim")
    frame = handle.content_frame() if handle else None
    assert frame is not None
    return Framing(target, frame.url, frame.evaluate("document.body ? document.body.innerText : ''"), console)


def framing_violations(run: Framing) -> list[str]:
    if run.frame_url == REFUSED_FRAME:
        return []
    if run.frame_url == run.target:
        return [f"{run.target} rendered inside a foreign frame"]
    return [f"unexpected frame state: {run.frame_url}"]


def test_docs_refuse_foreign_frames(
    new_context: NewContext, sites: Sites, thallus_dev: Backend, screenshot: Screenshot
) -> None:
    page = new_context().new_page()
    refusal = (
        f"Framing '{thallus_dev.origin}/' violates the following Content Security Policy directive: "
        "\"frame-ancestors 'none'\". The request has been blocked."
    )
    run = frame_from_foreign(page, sites, thallus_dev.url("/docs"), refusal)
    screenshot(page)
    assert framing_violations(run) == []
    assert "Swagger" not in run.frame_text and "Thallus" not in run.frame_text


def test_x_frame_options_holds_without_csp(
    new_context: NewContext, sites: Sites, csp_off: str, screenshot: Screenshot
) -> None:
    page = new_context().new_page()
    refusal = f"Refused to display '{csp_off}/' in a frame because it set 'X-Frame-Options' to 'deny'."
    run = frame_from_foreign(page, sites, csp_off + "/greet", refusal)
    screenshot(page)
    assert framing_violations(run) == []
    assert not [line for line in run.console if "Content Security Policy" in line], "no CSP here: XFO alone"


def test_framing_negative_control(
    new_context: NewContext, sites: Sites, naive: Backend, screenshot: Screenshot
) -> None:
    page = new_context().new_page()
    run = frame_from_foreign(page, sites, naive.url("/docs"))
    screenshot(page)
    assert framing_violations(run) == [f"{naive.url('/docs')} rendered inside a foreign frame"]
    assert run.frame_text == NAIVE_DOCS_MARKER
    assert not [line for line in run.console if "frame" in line.lower()]
