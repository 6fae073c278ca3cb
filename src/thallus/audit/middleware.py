"""One ``request`` audit record for every state-changing request not answered 429 (docs/design.md §11).

Placed just inside CORS (outside the error boundary), so it sees the final status of every request
whichever layer answered it — a CSRF 403, a 401, a 404, a crash's 500 — and exactly one record is
written per request. The principal, set deeper by the authentication layer, is read from the shared
``scope["state"]`` when the response is done: API-key requests are attributed to the key's user with
``auth_method: api_key`` and the key id.

A request answered 429 writes no ``request`` record: the refusal's own record stands for it
(``rate_limited`` from the rate limiter, ``login_failed`` from a sign-in lockout). Written as well,
a flood past the limit cost two rows per request, and the second — unlike the refusal records,
which are coalesced per client (:mod:`thallus.server.audit.coalesce`) — one each, however many came.
"""

from __future__ import annotations

import time

from thallus._asgi import ASGIApp, Message, Receive, Scope, Send
from thallus.audit import AuditEvent, AuditSink, Outcome, request_fields
from thallus.csrf import SAFE_METHODS
from thallus.principal import principal_of

#: The status whose request is recorded by its refusal alone.
TOO_MANY_REQUESTS = 429


def outcome_of(status: int | None) -> Outcome:
    if status is None or status >= 500:
        return "failure"
    if status in (401, 403, 429):
        return "denied"
    return "failure" if status >= 400 else "success"


class AuditRequestMiddleware:
    def __init__(self, app: ASGIApp, sink: AuditSink) -> None:
        self.app = app
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.record(scope, status, (time.perf_counter() - started) * 1000)

    def record(self, scope: Scope, status: int | None, duration_ms: float) -> None:
        """The request's ``request`` record; ``status`` is None when no response was started. None
        for a 429 (module doc). The composed layers and ``protect``'s fast path both call this."""
        if status == TOO_MANY_REQUESTS:
            return
        principal = principal_of(scope)
        details: dict[str, object] = {"auth_method": principal.auth_method if principal else None}
        if principal is not None and principal.api_key_id:
            details["api_key_id"] = principal.api_key_id
        self.sink.record(
            AuditEvent(
                action="request",
                outcome=outcome_of(status),
                user_id=principal.user_id if principal else None,
                details=details,
                error_message=None if status is not None else "no response was sent",
                status_code=status,
                duration_ms=round(duration_ms, 3),
                **request_fields(scope),
            )
        )
