"""Servers for the browser tests: page sites, the service as a process, apps under uvicorn, their logs.

Sites. The browser decides by *site* (scheme + registrable domain, ports ignored) whether SameSite
cookies go along, and by *origin* (scheme + host + port) what CORS allows. On loopback,
``http://localhost:P`` and ``http://localhost:Q`` are two origins of one site — like
``app.example.com`` and ``api.example.com`` — while ``http://127.0.0.1:R`` is another site
altogether, like ``evil.example``. So the API is always addressed as ``http://localhost:PORT``, the
allowlisted SPA is ``http://localhost:SPA``, a same-site but untrusted origin (a sibling
subdomain) is ``http://localhost:SIBLING`` and the attacker is ``http://127.0.0.1:FOREIGN``.
Every server binds 127.0.0.1; ``localhost`` resolves to it (checked by :func:`localhost_is_loopback`).

Evidence. A page cannot see responses CORS blocked, nor requests the browser never sent; what
reached a server is read from that server's own log: ``thallus serve`` writes one JSON line per
request (logger ``thallus.access``, with the correlation ID) and one per CSRF or CORS refusal
(``thallus.csrf``, ``thallus.cors``, with the reason and the offending origin); the misconfigured app
(:mod:`tests.browser.naive`) writes the same shape into the same :class:`ServerLog`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from playwright.sync_api import BrowserContext, Cookie, Page, Response

from tests.server import THALLUS, Server, running_server, served
from thallus._asgi import ASGIApp

# -- the suite's settings ----------------------------------------------------------------------

#: The system's Chromium; Playwright never downloads a browser.
CHROMIUM = os.environ.get("THALLUS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # no calls home: on a closed network they fail and Chromium then refuses connections
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
TIMEOUT_MS = 10_000
#: All browser traffic comes from one IP, across tests sharing a server: the per-IP limits
#: (120/minute, 10/minute on /api/v1/auth) are raised, they are not what these tests are about.
RELAXED_RATE_LIMITS = {"THALLUS_RATE_LIMIT": "2000/minute", "THALLUS_RATE_LIMIT_AUTH": "500/minute"}

NewContext = Callable[[], BrowserContext]


class Screenshot(Protocol):
    def __call__(self, page: Page, suffix: str = "") -> Path:
        """Save ``page`` as ``test-artifacts/browser/<test name>[-suffix].png``."""
        ...


# Loggers of thallus serve's JSON log lines.
ACCESS = "thallus.access"
CSRF = "thallus.csrf"
CORS = "thallus.cors"
PASSWORD = "Correct-Horse-Battery-9!"
WAIT_SECONDS = 10.0

Entry = dict[str, Any]


# -- logs --------------------------------------------------------------------------------------


class ServerLog:
    """The JSON log entries of one server, appended by a reader thread, awaited by tests."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._changed = threading.Condition()

    def add(self, entry: Entry) -> None:
        with self._changed:
            self._entries.append(entry)
            self._changed.notify_all()

    def mark(self) -> int:
        """A position; queries ``since`` it see only what was logged afterwards."""
        with self._changed:
            return len(self._entries)

    def entries(self, since: int = 0) -> list[Entry]:
        with self._changed:
            return list(self._entries[since:])

    def wait_for(self, predicate: Callable[[Entry], bool], since: int = 0, timeout: float = WAIT_SECONDS) -> Entry:
        """The first entry after ``since`` matching ``predicate``, waiting for it to be logged."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for entry in self._entries[since:]:
                    if predicate(entry):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    lines = "\n".join(json.dumps(entry) for entry in self._entries[since:])
                    raise AssertionError(f"no matching log entry within {timeout} s; logged since:\n{lines}")
                self._changed.wait(remaining)

    def access(self, method: str, path: str, since: int = 0) -> list[Entry]:
        """Access-log entries of requests ``method path`` that reached the server."""
        return [
            entry
            for entry in self.entries(since)
            if entry.get("logger") == ACCESS and entry.get("method") == method and entry.get("path") == path
        ]

    def wait_for_access(self, method: str, path: str, since: int = 0) -> Entry:
        return self.wait_for(
            lambda entry: entry.get("logger") == ACCESS and entry.get("method") == method and entry.get("path") == path,
            since,
        )

    def logged(self, logger: str, since: int = 0) -> list[Entry]:
        """Entries of one logger, e.g. ``thallus.csrf`` (refusals, with ``{"csrf": {reason, origin}}``)."""
        return [entry for entry in self.entries(since) if entry.get("logger") == logger]


def follow(server: Server, log: ServerLog) -> threading.Thread:
    """Follow a server's output (read as it comes by ``tests.server.Server``) into ``log``, line by
    line as it is written (non-JSON lines kept as ``{"text": …}``)."""

    def read() -> None:
        seen = 0
        while True:
            lines = server.lines
            if seen == len(lines):
                if server.process.poll() is not None:
                    return
                time.sleep(0.005)
                continue
            for line in lines[seen:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = {"text": line.rstrip("\n")}
                log.add(entry if isinstance(entry, dict) else {"text": line.rstrip("\n")})
            seen = len(lines)

    thread = threading.Thread(target=read, name=f"log-{server.process.pid}", daemon=True)
    thread.start()
    return thread


# -- backends ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """An API under test, as the browser addresses it, with its log and a user of its own."""

    name: str
    origin: str
    log: ServerLog
    email: str
    password: str = PASSWORD

    def url(self, path: str) -> str:
        return self.origin + path


def localhost_is_loopback() -> bool:
    """Whether ``localhost`` resolves to 127.0.0.1 (where every test server listens) and nothing else."""
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None, socket.AF_UNSPEC, socket.SOCK_STREAM)}
    return "127.0.0.1" in addresses and not addresses - {"127.0.0.1", "::1"}


def thallus_cli(environment: Mapping[str, str], *args: str) -> str:
    """Run ``thallus ARGS`` with exactly ``environment`` as its THALLUS_* settings; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(environment)
    result = subprocess.run([THALLUS, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"thallus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


@contextmanager
def thallus_service(name: str, environment: Mapping[str, str], data_dir: Path, email: str) -> Iterator[Backend]:
    """``thallus serve`` as a process (tests.server.running_server) with a user allowed API keys.

    The user is created with the CLI before the server starts (the CLI migrates the database).
    The server's JSON log is followed live; the browser addresses it as ``http://localhost:PORT``.
    """
    settings = {**environment, "THALLUS_DATA_DIR": str(data_dir)}
    thallus_cli(settings, "users", "create", "--email", email, "--password", PASSWORD, "--api-access")
    with running_server(settings) as server:
        log = ServerLog()
        reader = follow(server, log)
        try:
            yield Backend(name, f"http://localhost:{server.port}", log, email)
        finally:
            server.stop()
            reader.join(5)


def api_key_for(backend: Backend) -> str:
    """A fresh API key of the backend's user, created through the API from Python (no browser)."""
    with httpx.Client(base_url=backend.origin, timeout=10) as client:
        login = client.post("/api/v1/auth/login", json={"email": backend.email, "password": backend.password})
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        created = client.post(
            "/api/v1/api-keys", json={"name": "browser"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert created.status_code == 201, created.text
        key: str = created.json()["key"]
        return key


@contextmanager
def uvicorn_thread(app: ASGIApp) -> Iterator[int]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread of this process; yields the port."""
    with served(app) as url:
        yield int(url.rsplit(":", 1)[1])


# -- page sites --------------------------------------------------------------------------------


class PageServer:
    """A static site on 127.0.0.1: ``pages`` maps a path to an HTML document (query strings ignored)."""

    def __init__(self, pages: Mapping[str, str]) -> None:
        documents = {path: html.encode() for path, html in pages.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = documents.get(self.path.split("?", 1)[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"pages-{self.port}", daemon=True)

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT_SECONDS)


@dataclass(frozen=True)
class Sites:
    """The page origins of the suite (module doc): one allowlisted, one same-site, one foreign."""

    spa: str
    sibling: str
    foreign: str


# -- the browser side ---------------------------------------------------------------------------

Result = dict[str, Any]
#: The refresh cookie's names: development's, and the ``__Secure-`` one of test and production.
REFRESH_COOKIES = ("thallus_refresh", "__Secure-thallus_refresh")


def call(page: Page, function: str, *args: Any) -> Result:
    """``client.<function>(...args)`` in a page showing ``/client.html`` (tests.browser.pages)."""
    result: Result = page.evaluate(f"(args) => client.{function}(...args)", list(args))
    return result


def open_client(page: Page, site: str, backend: Backend) -> None:
    page.goto(site + "/client.html")
    call(page, "note", f"API: {backend.name} at {backend.origin}")


def refresh_cookie(context: BrowserContext) -> Cookie | None:
    """The refresh cookie in the browser's jar (whatever its path), as the browser stored it."""
    cookies = context.cookies()
    return next((c for c in cookies if c["name"] in REFRESH_COOKIES and c["domain"] == "localhost"), None)


class CookieWitness:
    """Chromium's own account of the refresh cookie on each request of the pages it watches.

    Through the DevTools protocol (``Network.requestWillBeSentExtraInfo``), Chromium lists for every
    request the cookies of its jar that matched the host, each either sent or withheld with its
    reasons (``NotOnPath``, ``SameSiteStrict``, ``SameSiteLax``, …). That covers requests whose
    headers Playwright cannot show (``no-cors`` requests, responses CORS blocked).
    """

    def __init__(self) -> None:
        self._requests: dict[str, tuple[int, str, str]] = {}  # request id → (page, method, url)
        self._cookies: dict[str, dict[str, list[str]]] = {}  # request id → cookie name → withheld reasons

    def watch(self, page: Page) -> Page:
        session = page.context.new_cdp_session(page)

        def sent(event: dict[str, Any]) -> None:
            self._requests[event["requestId"]] = (id(page), event["request"]["method"], event["request"]["url"])

        session.on("Network.requestWillBeSent", sent)
        session.on("Network.requestWillBeSentExtraInfo", self._extra)
        session.send("Network.enable")
        return page

    def _extra(self, event: dict[str, Any]) -> None:
        # With schemeful same-site on (the default), Chromium may name a SameSite block
        # "SchemefulSameSite…"; every page here is http, so the scheme plays no part: the prefix goes.
        self._cookies[event["requestId"]] = {
            item["cookie"]["name"]: [reason.removeprefix("Schemeful") for reason in item.get("blockedReasons") or []]
            for item in event.get("associatedCookies", [])
        }

    def refresh_cookie(self, page: Page, method: str, url: str) -> str:
        """For ``page``'s last ``method url`` request: ``"sent"``, the reasons it was withheld (e.g.
        ``"NotOnPath"``), or ``"not in the jar"``; waits for Chromium's report."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            for request_id, request in reversed(list(self._requests.items())):
                if request == (id(page), method, url) and request_id in self._cookies:
                    reported = self._cookies[request_id]
                    reasons = next((reported[name] for name in REFRESH_COOKIES if name in reported), None)
                    if reasons is None:
                        return "not in the jar"
                    return ", ".join(reasons) if reasons else "sent"
            if time.monotonic() > deadline:
                raise AssertionError(f"Chromium reported no cookies for {method} {url}")
            page.wait_for_timeout(20)  # lets Playwright deliver the pending protocol events


def settle(page: Page, backend: Backend) -> None:
    """Make one last request from ``page`` and wait for the server to log it.

    Requests the page made earlier have been answered by then, and the server writes a request's
    access line as its response completes, so afterwards the log holds every one of them: a request
    missing from it was never sent.
    """
    path = f"/settle-{secrets.token_hex(6)}"
    since = backend.log.mark()
    page.evaluate("(url) => fetch(url, {mode: 'no-cors'}).catch(() => null)", backend.origin + path)
    backend.log.wait_for_access("GET", path, since)


def submit_form(page: Page, site: str, target: str) -> Response:
    """Load ``site``'s auto-submitting form aimed at ``target``; the POST's response (a top-level navigation)."""
    with page.expect_response(lambda r: r.url == target and r.request.method == "POST") as posted:
        page.goto(f"{site}/form.html?target={quote(target, safe='')}", wait_until="commit")
    if posted.value.status not in (204, 205):  # a navigation to "no content" never commits
        page.wait_for_url(target)
    return posted.value
