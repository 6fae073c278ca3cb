"""Apps for tests/test_check.py: a sound pure-ASGI API, the same with one weakness each, and listeners
that are not HTTP servers at all — each served on a loopback port of this process.

The sound app does what docs/design.md asks of an API (§3 headers, §4 CORS for ALLOWED, §5 CSRF on
``POST /session/end``, §7 correlation IDs, §8 JSON errors, a ``__Host-`` session cookie), in a few
lines and without Thallus, so the scanner is tested against behaviour, not against our own layers.
Each :class:`Flaws` field breaks exactly one of those.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from thallus._asgi import Receive, Scope, Send

ALLOWED = "https://app.example.com"
PUBLIC = "https://api.example.com"
SESSION_COOKIE = "__Host-session=abc123; Path=/; Secure; HttpOnly; SameSite=Strict"
INSECURE_COOKIE = "session=abc123; Path=/"
CSRF_ENDPOINT = "/session/end"
SECURITY_HEADERS = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    ("strict-transport-security", "max-age=31536000"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=()"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-site"),
    ("x-permitted-cross-domain-policies", "none"),
]
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
WAIT_SECONDS = 10


@dataclass(frozen=True)
class Flaws:
    reflect_origin: bool = False  # CORS grants whatever Origin asks, with credentials
    wildcard_credentials: bool = False  # Access-Control-Allow-Origin: * and credentials, everywhere
    missing_headers: bool = False  # no security header at all
    accept_cross_site: bool = False  # the cookie POST runs whatever its origin
    echo_correlation: bool = False  # any X-Correlation-ID comes back as sent
    insecure_cookie: bool = False  # a session cookie without Secure, HttpOnly, SameSite
    html_errors: bool = False  # errors are HTML pages


Headers = list[tuple[str, str]]


@dataclass
class App:
    """The API; ``requests`` counts what reached it (with the ``Host`` each carried)."""

    flaws: Flaws = field(default_factory=Flaws)
    delay: float = 0.0
    hosts: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {name.decode().lower(): value.decode("latin-1") for name, value in scope["headers"]}
        self.hosts.append(headers.get("host", ""))
        if self.delay:
            await asyncio.sleep(self.delay)
        status, extra, body = self.route(scope, headers)
        await self.respond(send, headers, status, extra, body)

    def route(self, scope: Scope, headers: dict[str, str]) -> tuple[int, Headers, object]:
        method, path, query = scope["method"], scope["path"], scope["query_string"]
        origin = headers.get("origin")
        if method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            if self.grants(origin):
                return (
                    204,
                    [("access-control-allow-methods", "GET, POST"), ("access-control-allow-headers", "content-type")],
                    None,
                )
            return 403, [], ("CORSError", "This origin is not allowed.")
        if path == "/health":
            if method not in ("GET", "HEAD"):
                return 405, [("allow", "GET, HEAD")], ("MethodNotAllowedError", "Method not allowed.")
            if b"%00" in query:
                return 400, [], ("BadRequestError", "NUL in the URL.")
            if headers.get("authorization", "").startswith("Bearer "):
                return 401, [("www-authenticate", 'Bearer realm="test"')], ("AuthenticationError", "Invalid token.")
            cookie = INSECURE_COOKIE if self.flaws.insecure_cookie else SESSION_COOKIE
            return 200, [("set-cookie", cookie)], {"status": "ok"}
        if path == CSRF_ENDPOINT and method in ("POST", "PUT", "PATCH", "DELETE"):
            if "cookie" in headers and not self.flaws.accept_cross_site and not trusted(headers):
                return 403, [], ("CSRFError", "Cross-site request refused.")
            return 204, [], None
        return 404, [], ("NotFoundError", "Not found.")

    def grants(self, origin: str) -> bool:
        return origin == ALLOWED or self.flaws.reflect_origin

    async def respond(self, send: Send, request: dict[str, str], status: int, extra: Headers, body: object) -> None:
        cid = request.get("x-correlation-id", "")
        if not self.flaws.echo_correlation and not _VALID_ID.fullmatch(cid):
            cid = str(uuid.uuid4())
        cid = cid or str(uuid.uuid4())
        headers: Headers = [] if self.flaws.missing_headers else list(SECURITY_HEADERS)
        headers += [("vary", "Origin"), ("x-correlation-id", cid), *extra]
        origin = request.get("origin")
        if self.flaws.wildcard_credentials:
            headers += [("access-control-allow-origin", "*"), ("access-control-allow-credentials", "true")]
        elif origin is not None and self.grants(origin):
            headers += [("access-control-allow-origin", origin), ("access-control-allow-credentials", "true")]
        payload = b""
        if isinstance(body, tuple):
            headers.append(("cache-control", "no-store"))
            if self.flaws.html_errors:
                payload = f"<html><body><h1>{status} {body[1]}</h1></body></html>".encode()
                headers.append(("content-type", "text/html; charset=utf-8"))
            else:
                error = {"error": body[0], "message": body[1], "details": None, "correlation_id": cid}
                payload = json.dumps(error).encode()
                headers.append(("content-type", "application/json"))
        elif body is not None:
            payload = json.dumps(body).encode()
            headers.append(("content-type", "application/json"))
        raw = [(name.encode(), value.encode("latin-1")) for name, value in headers]
        raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})


def trusted(headers: dict[str, str]) -> bool:
    """design.md §5 rules 1–4, production: Fetch Metadata, then Origin, then Referer, else refuse."""
    if headers.get("sec-fetch-site") in ("same-origin", "none"):
        return True
    if "origin" in headers:
        return headers["origin"] in (ALLOWED, PUBLIC)
    if "referer" in headers:
        return headers["referer"].startswith((ALLOWED + "/", PUBLIC + "/"))
    return False


@dataclass
class Redirect:
    """Answers every request with a redirect to ``location``."""

    location: str
    requests: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        headers = [(b"location", self.location.encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


@contextmanager
def raw_listener(greeting: bytes | None) -> Iterator[str]:
    """A TCP listener on loopback that is no HTTP server: it reads the request, writes ``greeting``
    and closes the connection, or with ``None`` accepts and never answers. Yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if greeting is None:
                held.append(connection)
            else:
                with connection:
                    connection.settimeout(2)
                    connection.recv(65536)  # the request, read so that closing sends FIN, not RST
                    connection.sendall(greeting)
                    connection.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(WAIT_SECONDS)
        for connection in held:
            connection.close()
        listener.close()


@dataclass
class Hostile:
    """Answers every request with what a scanner must survive: JSON nested past any recursion limit,
    a header value of 8000 characters, thirty cookies, an error type of 10 000 characters."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status = 200 if scope["path"] == "/" else 404
        body = ("[" * 50_000).encode() if status == 200 else json.dumps({"error": "E" * 10_000}).encode()
        headers = [(b"content-type", b"application/json"), (b"x-frame-options", b"A" * 8000)]
        headers += [(b"set-cookie", f"c{n}=1; Path=/".encode()) for n in range(30)]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
