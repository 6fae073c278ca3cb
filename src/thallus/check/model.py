"""What a scan is made of: the target, the probes sent, the answers received and the results.

Nothing here does I/O or imports httpx, so every check can be tested on hand-built answers.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Literal

Environment = Literal["production", "test", "development"]
ENVIRONMENTS: tuple[Environment, ...] = ("production", "test", "development")
#: Bytes of a body kept per answer; the rest is never read.
BODY_LIMIT = 64 * 1024
#: Characters of a reason; longer ones (quoting a hostile answer) are cut.
REASON_LIMIT = 300


class ScanError(Exception):
    """The target could not be scanned (the CLI exits 2); the message is one line for the user."""


class Status(StrEnum):
    """A row's verdict, ordered PASS < WARN < FAIL."""

    PASS = "PASS"  # noqa: S105 (a verdict, not a password)
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Status.PASS: 0, Status.WARN: 1, Status.FAIL: 2}


@dataclass(frozen=True)
class Result:
    """One row of the report. ``critical`` marks a FAIL that costs double (docs/check.md, rubric)."""

    layer: str
    check: str
    status: Status
    reason: str
    critical: bool = False

    def __post_init__(self) -> None:
        # reasons quote what the target sent: one line, and bounded
        reason = " ".join(self.reason.split())
        object.__setattr__(
            self, "reason", reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 3] + "..."
        )

    def as_json(self) -> dict[str, str]:
        return {"layer": self.layer, "check": self.check, "status": self.status.value, "reason": self.reason}


@dataclass(frozen=True)
class Probe:
    """One request of the plan: always to the target's own origin, ``path`` starting with one ``/``."""

    key: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @property
    def title(self) -> str:
        path = self.path if len(self.path) <= 48 else self.path[:45] + "..."
        return f"{self.method} {path}"


@dataclass(frozen=True)
class Answer:
    """A response as received: status, header fields in order (names lower-case), the first
    :data:`BODY_LIMIT` bytes of the body."""

    probe: Probe
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def values(self, name: str) -> list[str]:
        """Every field line of ``name``, in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        """The field's combined value (RFC 9110 §5.3: lines joined with ", "), or None when absent."""
        values = self.values(name)
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> list[str]:
        """The field as a comma-separated list, lower-cased, empty members dropped."""
        return [item.strip().lower() for value in self.values(name) for item in value.split(",") if item.strip()]

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    @property
    def is_json(self) -> bool:
        """``application/json`` or a ``+json`` type (RFC 6839 §3.1)."""
        return self.media_type == "application/json" or self.media_type.endswith("+json")

    @cached_property
    def document(self) -> object | None:
        """The body parsed as JSON, or None when it is not JSON at all."""
        try:
            parsed: object = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return parsed

    @property
    def label(self) -> str:
        """How a reason names this answer: ``TRACE /health (405)``."""
        return f"{self.probe.title} ({self.status})"


Answers = Mapping[str, Answer]


@dataclass(frozen=True)
class Target:
    """What to scan and how, validated by the CLI. ``token`` is random per scan: it names the
    foreign origin and the unknown path, so no allowlist or route can match them by accident."""

    scheme: str
    host: str
    port: int | None
    path: str
    env: Environment = "production"
    allowed_origins: tuple[str, ...] = ()
    cookies: tuple[tuple[str, str], ...] = ()
    csrf_endpoint: str | None = None
    api_key: str | None = field(default=None, repr=False)
    allow_destructive: bool = False
    token: str = "0123456789"  # noqa: S105 (a probe marker, not a secret)

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + (f":{self.port}" if self.port is not None else "")

    @property
    def url(self) -> str:
        return self.origin + self.path

    @property
    def foreign_origin(self) -> str:
        """A random origin under the reserved ``example`` top-level name (RFC 2606 §2)."""
        return f"https://thallus-check-{self.token}.example"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost" or self.host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def csrf_probed(self) -> bool:
        return bool(self.cookies) and self.csrf_endpoint is not None

    def credentials(self) -> tuple[tuple[str, str], ...]:
        """The ``--api-key`` header, for probes that act as an authenticated client."""
        return (("X-API-Key", self.api_key),) if self.api_key else ()


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=lambda status: status.rank, default=Status.PASS)
