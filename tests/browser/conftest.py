"""Fixtures of the browser suite: Chromium, fresh contexts, screenshots, the sites and the APIs.

Chromium is the system's (``/usr/bin/chromium``, or ``THALLUS_TEST_CHROMIUM``); Playwright never
downloads one. Without it the tests skip with the reason — in CI (``CI=true``) they fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.browser.naive import naive_api
from tests.browser.pages import PAGES
from tests.browser.support import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    RELAXED_RATE_LIMITS,
    TIMEOUT_MS,
    Backend,
    NewContext,
    PageServer,
    Screenshot,
    ServerLog,
    Sites,
    localhost_is_loopback,
    thallus_service,
    uvicorn_thread,
)
from tests.databases import unavailable


@pytest.fixture(scope="package")
def chromium() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium, or set THALLUS_TEST_CHROMIUM)")
    if not localhost_is_loopback():
        unavailable("'localhost' does not resolve to 127.0.0.1 here; the browser tests need it to")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except PlaywrightError as exc:
            unavailable(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield browser
        browser.close()


_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_failed] = report.failed
    return report


def _artifact_name(node: pytest.Item) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", node.name).strip("-")


@pytest.fixture
def new_context(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[NewContext]:
    """Fresh browser contexts (no cookies, no cache) for one test; a failed test leaves screenshots."""
    contexts: list[BrowserContext] = []

    def create() -> BrowserContext:
        context = chromium.new_context(viewport={"width": 1000, "height": 700})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context

    yield create
    if request.node.stash.get(_failed, False):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for number, page in enumerate(page for context in contexts for page in context.pages):
            try:
                page.screenshot(path=ARTIFACTS / f"{_artifact_name(request.node)}-failed-{number}.png")
            except PlaywrightError:  # a page that cannot be drawn must not hide the test's own failure
                continue
    for context in contexts:
        context.close()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Screenshot:
    """Save a page as ``test-artifacts/browser/<test name>[-suffix].png`` (the scenario's final state)."""

    def save(page: Page, suffix: str = "") -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{_artifact_name(request.node)}{'-' + suffix if suffix else ''}.png"
        page.screenshot(path=path, full_page=True)
        return path

    return save


@pytest.fixture(scope="package")
def sites() -> Iterator[Sites]:
    with PageServer(PAGES) as spa, PageServer(PAGES) as sibling, PageServer(PAGES) as foreign:
        yield Sites(
            spa=f"http://localhost:{spa.port}",
            sibling=f"http://localhost:{sibling.port}",
            foreign=f"http://127.0.0.1:{foreign.port}",
        )


@pytest.fixture(scope="package")
def thallus_dev(sites: Sites, tmp_path_factory: pytest.TempPathFactory, chromium: Browser) -> Iterator[Backend]:
    """``thallus serve`` in development (SameSite=Lax cookies) with the SPA origin allowlisted."""
    environment = {
        "THALLUS_ENV": "development",
        "THALLUS_ALLOWED_ORIGINS": sites.spa,
        **RELAXED_RATE_LIMITS,
    }
    data_dir = tmp_path_factory.mktemp("thallus-dev")
    with thallus_service("thallus serve (development)", environment, data_dir, "ada@example.com") as backend:
        yield backend


@pytest.fixture(scope="package")
def naive(chromium: Browser) -> Iterator[Backend]:
    """The misconfigured control (tests.browser.naive), under uvicorn in this process."""
    log = ServerLog()
    with uvicorn_thread(naive_api(log)) as port:
        yield Backend("misconfigured app", f"http://localhost:{port}", log, "naive@example.com")
