"""``protect()``'s fast path gives exactly what the composed layers give.

:class:`~thallus.stack.ProtectedApp` drives the layer objects from one frame for HTTP requests and
keeps them composed (``.composed``) for everything else. Here both paths answer the same generated
requests, from an application that answers with any status, content type and headers, crashes
before or after starting, never answers, or overrides a header per route: status, every header in
order, body, the exception that escapes and the audit events must be the same. Only the generated
correlation ID differs between two runs, so it is compared by its place, not its value.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.asgi import Response, acall, http_scope
from thallus import Settings, protect
from thallus._asgi import Receive, Scope, Send
from thallus.audit import AuditEvent
from thallus.correlation import uuid7
from thallus.errors import PermissionDeniedError
from thallus.headers import csp_nonce, override_header
from thallus.stack import ProtectedApp

SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"

ORIGINS = [SPA, SPA.upper(), PUBLIC, "https://evil.example", "null", "", SPA + "/", "https://app.example.com.evil.com"]
REQUEST_HEADERS = st.one_of(
    st.tuples(st.just("origin"), st.sampled_from(ORIGINS)),
    st.tuples(st.just("cookie"), st.sampled_from(["session=1", " ; ", "", "a=b; c=d"])),
    st.tuples(st.just("sec-fetch-site"), st.sampled_from(["same-origin", "cross-site", "same-site", "none"])),
    st.tuples(st.just("referer"), st.sampled_from([SPA + "/page", "https://evil.example/x", "garbage"])),
    st.tuples(st.just("x-correlation-id"), st.sampled_from(["client-id-1", "bad id", "x" * 200])),
    st.tuples(st.just("access-control-request-method"), st.sampled_from(["POST", "patch", "TRACE"])),
    st.tuples(st.just("access-control-request-headers"), st.sampled_from(["content-type", "x-evil"])),
    st.tuples(st.just("user-agent"), st.just("hypothesis")),
)
APP_HEADERS = [
    (b"vary", b"Accept"),
    (b"Vary", b"Cookie"),
    (b"vary", b"*"),
    (b"access-control-allow-origin", b"*"),
    (b"server", b"uvicorn"),
    (b"x-correlation-id", b"from-the-app"),
    (b"cache-control", b"public, max-age=60"),
    (b"X-Frame-Options", b"SAMEORIGIN"),
    (b"allow", b"GET, POST"),
    (b"retry-after", b"7"),
]
MODES = [
    "answer",
    "raise before",
    "raise after start",
    "no answer",
    "thallus error",
    "override",
    "nonce",
    "answers body errors",  # turns an error raised by receive into a 400 of its own, as FastAPI does
    "ignores the body",
]
#: A small body limit, so generated bodies are over it as often as not.
MAX_BODY_BYTES = 16
BODIES = st.lists(st.sampled_from([b"", b"{}", b'{"a":"12345678"}', b"x" * 17]), min_size=1, max_size=3)


@dataclass(frozen=True)
class Behaviour:
    """What the inner application does."""

    mode: str
    status: int
    content_type: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]
    chunks: int


def behaving_app(behaviour: Behaviour) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            while behaviour.mode != "ignores the body" and (await receive()).get("more_body", False):
                pass
        except Exception:
            if behaviour.mode != "answers body errors":
                raise
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})
            return
        if behaviour.mode == "raise before":
            raise RuntimeError("kaboom")
        if behaviour.mode == "thallus error":
            raise PermissionDeniedError("Not yours.")
        if behaviour.mode == "no answer":
            return
        if behaviour.mode == "override":
            override_header(scope, "X-Frame-Options", "SAMEORIGIN")
            override_header(scope, "Vary", "Accept-Encoding")
        if behaviour.mode == "nonce":
            csp_nonce(scope)
        headers = list(behaviour.headers)
        if behaviour.content_type is not None:
            headers.insert(0, (b"content-type", behaviour.content_type))
        await send({"type": "http.response.start", "status": behaviour.status, "headers": headers})
        for index in range(behaviour.chunks):
            more = index < behaviour.chunks - 1
            await send({"type": "http.response.body", "body": b'{"part":%d}' % index, "more_body": more})
            if behaviour.mode == "raise after start":
                raise RuntimeError("kaboom after start")

    return app


class ListSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)


def scope_for(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    scope = http_scope(method, path, scheme="https", state={})
    scope["headers"] = list(headers)  # as generated: names in either case, repeats kept
    return scope


_GENERATED = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}|'nonce-[\w-]+'")


def comparable(response: Response) -> dict[str, Any]:
    """The response with generated correlation IDs and CSP nonces replaced by a placeholder (after
    checking that the body names the same ID as the header)."""
    header = next((value for name, value in response.headers if name == b"x-correlation-id"), None)
    if header is not None and b'"correlation_id"' in response.body:
        assert json.loads(response.body)["correlation_id"] == header.decode()
    headers = [(name, _GENERATED.sub(b"<generated>", value)) for name, value in response.headers]
    return {
        "status": response.status,
        "headers": headers,
        "body": _GENERATED.sub(b"<generated>", response.body),
        "exception": type(response.exception).__name__ if response.exception else None,
        "messages": [message["type"] for message in response.messages],
    }


def event_summary(event: AuditEvent) -> tuple[Any, ...]:
    return (event.action, event.outcome, event.status_code, event.method, event.path, json.dumps(event.details))


@settings(
    max_examples=int(os.environ.get("THALLUS_FAST_PATH_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    environment=st.sampled_from(["development", "production"]),
    rate_limited=st.booleans(),
    audited=st.booleans(),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "patch", "DELETE", "OPTIONS"]),
    path=st.sampled_from(["/items", "/api/v1/auth/refresh", "/elsewhere"]),
    request_headers=st.lists(REQUEST_HEADERS, max_size=6),
    capitalised=st.booleans(),
    body=BODIES,
    declared=st.booleans(),
    behaviour=st.builds(
        Behaviour,
        mode=st.sampled_from(MODES),
        status=st.sampled_from([200, 201, 204, 304, 400, 401, 404, 405, 429, 500, 503]),
        content_type=st.sampled_from([b"application/json", b"application/problem+json", b"text/plain", None]),
        headers=st.lists(st.sampled_from(APP_HEADERS), max_size=4, unique=True).map(tuple),
        chunks=st.integers(1, 2),
    ),
)
def test_fast_path_equals_the_composed_layers(
    environment: str,
    rate_limited: bool,
    audited: bool,
    method: str,
    path: str,
    request_headers: list[tuple[str, str]],
    capitalised: bool,
    body: list[bytes],
    declared: bool,
    behaviour: Behaviour,
) -> None:
    raw_headers = [
        ((name.title() if capitalised else name).encode(), value.encode("latin-1")) for name, value in request_headers
    ]
    if declared:  # else the body streams undeclared (chunked), counted as it comes
        raw_headers.append((b"content-length", str(sum(map(len, body))).encode()))
    results = []
    for fast in (True, False):
        sink = ListSink()
        protected = protect(
            behaving_app(behaviour),
            Settings(
                env=environment,
                allowed_origins=SPA,
                public_origin=PUBLIC,
                rate_limit_enabled=rate_limited,
                rate_limit="100000/minute",
                max_body_bytes=MAX_BODY_BYTES,
            ),
            audit=sink if audited else None,
        )
        app = protected if fast else protected.composed
        response = asyncio.run(acall(app, scope_for(method, path, raw_headers), chunks=body))
        results.append((comparable(response), [event_summary(event) for event in sink.events]))
    assert results[0] == results[1]


def test_csrf_is_checked_in_the_fast_path_only_when_nothing_runs_before_it() -> None:
    plain = Settings(env="production", allowed_origins=SPA, public_origin=PUBLIC, rate_limit_enabled=False)
    assert protect(behaving_app(Behaviour("answer", 200, None, (), 1)), plain).csrf is not None
    limited = plain.model_copy(update={"rate_limit_enabled": True})
    assert protect(behaving_app(Behaviour("answer", 200, None, (), 1)), limited).csrf is None

    def layer(app: Any) -> Any:
        async def authenticate(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send)

        return authenticate

    assert protect(behaving_app(Behaviour("answer", 200, None, (), 1)), plain, inner=[layer]).csrf is None


def test_protect_returns_the_protected_app() -> None:
    protected = protect(behaving_app(Behaviour("answer", 200, None, (), 1)), Settings(env="development"))
    assert isinstance(protected, ProtectedApp)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_mint_different_ids() -> None:
    """uuid-utils keeps its random state in the process; a fork must not make two processes share it."""
    uuid7()  # the parent's generator is initialised
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        os.write(write_end, "\n".join(uuid7() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    parent_ids = {uuid7() for _ in range(100)}
    with os.fdopen(read_end) as pipe:
        child_ids = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    assert len(child_ids) == 100
    assert not parent_ids & child_ids
