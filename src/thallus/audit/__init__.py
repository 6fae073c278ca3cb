"""Audit events (docs/design.md §11): what happened, to whom, with which correlation ID.

Producers (identity, CSRF, CORS, …) describe an event with :class:`AuditEvent` and hand it to an
:class:`AuditSink`, whose ``record`` never blocks and never raises — an audit problem must not fail
the request. :class:`LogAuditSink` writes each event as a structured log line; the persistent,
hash-chained store plugs in behind the same protocol.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from thallus._asgi import Scope
from thallus.correlation import correlation_id_var

Outcome = Literal["success", "failure", "partial", "denied"]

logger = logging.getLogger("thallus.audit")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str
    outcome: Outcome
    user_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    details: dict[str, Any] | None = None
    error_message: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None
    status_code: int | None = None
    duration_ms: float | None = None
    correlation_id: str | None = field(default_factory=correlation_id_var.get)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class AuditSink(Protocol):
    def record(self, event: AuditEvent) -> None:
        """Accept an event without blocking or raising."""


class LogAuditSink:
    """Writes every event as one JSON log line on the ``thallus.audit`` logger."""

    def record(self, event: AuditEvent) -> None:
        try:
            fields = asdict(event)
            fields["created_at"] = event.created_at.isoformat()
            logger.info("audit %s %s", event.action, event.outcome, extra={"audit": fields})
        except Exception:  # an audit problem must never fail the request
            logger.exception("could not record audit event %s", event.action)


def request_fields(scope: Scope) -> dict[str, Any]:
    """The request columns of an audit record, read from an ASGI scope."""
    client = scope.get("client")
    resolved_ip = (scope.get("state") or {}).get("client_ip")  # set by the rate-limit layer
    user_agent = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"user-agent":
            user_agent = value.decode("latin-1")[:512]
            break
    return {
        "ip_address": resolved_ip or (client[0] if client else None),
        "user_agent": user_agent,
        "method": scope.get("method"),
        "path": scope.get("path"),
    }


class FanOutSink:
    """Hands every event to several sinks (e.g. the persistent writer and a log)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = sinks

    def record(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            sink.record(event)
