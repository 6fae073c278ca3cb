"""Denials from one client coalesced into few records (docs/design.md §11).

The rule. Events of a denial action — ``rate_limited``, ``cors_rejected``, ``csrf_rejected`` and
failed sign-ins (``login_failed``) — with a denial outcome (``denied`` or ``failure``) are grouped by
:func:`coalescing_key`: the action, the outcome, the client's address and, for ``login_failed``, the
sign-in identifier in ``details`` (the e-mail address or the identifier's keyed hash). For each
group, a window of ``window`` seconds opens at its first event:

* the **first** event is handed on at once, as it came, with ``count: 1`` added to its ``details``;
* the others are held back as a tally; when the window ends (or earlier: :meth:`CoalescingSink.flush`,
  the writer's ``flush``/``stop``, or the cap below), **one summary** is handed on: the window's
  latest event (its path, method, status, user agent, correlation ID and time) with ``details``
  carrying ``count`` — how many events it stands for, the first excluded — ``first_at`` and
  ``last_at`` (the ISO times of the first and last of them) and ``correlation_ids``, the IDs of the
  first :data:`SAMPLE_SIZE` of them;
* the next event after the window opens a new one (written at once again).

So every row of a coalesced action says how many events it stands for, and the ``count`` values of
those rows add up exactly to the number of events: 10,000 refused requests from one client in a
minute are two rows (``1`` and ``9999``) per kind, not 10,000. Other events pass straight through.
Nothing is dropped: a window's tally is written when it ends, or sooner, never forgotten.

Why 60 s (:data:`DEFAULT_WINDOW`): it is the limiter's own window (per-minute limits,
``Retry-After: 60``), so a client held at its limit costs at most two rows a minute per kind; the
first refusal is never delayed (alerts on it fire at once), and the tally follows within a minute.
Outcome is part of the key so that a wrong password (``failure``) and a refusal during a lock
(``denied``) are never summed into one row under one outcome.

Memory is bounded: at most ``max_windows`` (:data:`DEFAULT_MAX_WINDOWS`) windows are open at once;
opening one more first closes the oldest early (its summary is written, nothing is dropped), and each
window keeps one event, its text fields :mod:`bounded <thallus.server.audit.bounds>` as they will be stored.

Timing needs no thread or task of its own: a window that has ended is closed by the next event that
arrives, or by :meth:`CoalescingSink.flush_due`, which the audit writer calls on every turn of its
loop (at least once a second when idle: :meth:`thallus.server.audit.writer.AuditWriter.add_source`), so a
summary is written even when no further event comes. ``record`` may be called from worker threads
(sync FastAPI dependencies record events); a lock keeps the windows consistent and hands events on
in order. Like every sink, ``record`` never blocks on I/O and never raises.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from thallus.audit import AuditEvent, AuditSink
from thallus.server.audit.bounds import COLUMN_LIMITS, bounded, bounded_json
from thallus.server.audit.chain import timestamp

logger = logging.getLogger("thallus.audit")

#: The denial actions that are coalesced (failed authentication is ``login_failed``: an invalid
#: token or API key is a 401 with no event of its own, recorded only as its ``request``).
COALESCED_ACTIONS = frozenset({"rate_limited", "cors_rejected", "csrf_rejected", "login_failed"})
DENIAL_OUTCOMES = frozenset({"denied", "failure"})
DEFAULT_WINDOW = 60.0
DEFAULT_MAX_WINDOWS = 10_000
SAMPLE_SIZE = 10

#: (action, outcome, client address, sign-in identifier or None)
Key = tuple[str, str, str | None, str | None]


def coalescing_key(event: AuditEvent) -> Key | None:
    """The group an event is coalesced in, or None when it is not coalesced (module doc)."""
    if event.action not in COALESCED_ACTIONS or event.outcome not in DENIAL_OUTCOMES:
        return None
    identifier = None
    if event.action == "login_failed" and event.details:
        named = event.details.get("email") or event.details.get("identifier_hash")
        identifier = None if named is None else str(named)
    return (event.action, event.outcome, event.ip_address, identifier)


@dataclass(slots=True)
class _Window:
    """One group's open window: when it opened, and the tally of the events after its first."""

    opened: float
    count: int = 0
    first_at: datetime | None = None
    latest: AuditEvent | None = None
    sample: list[str] = field(default_factory=list)


class CoalescingSink:
    """Coalesces denials per client before ``inner`` (module doc: the rule, the window, the cap)."""

    def __init__(
        self,
        inner: AuditSink,
        *,
        window: float = DEFAULT_WINDOW,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        sample_size: int = SAMPLE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or max_windows < 1 or sample_size < 0:
            raise ValueError("window must be positive, max_windows at least 1, sample_size not negative")
        self.inner = inner
        self.window = window
        self.max_windows = max_windows
        self.sample_size = sample_size
        self.clock = clock
        self._windows: dict[Key, _Window] = {}  # in opening order: the oldest first
        self._lock = threading.Lock()

    @property
    def open_windows(self) -> int:
        return len(self._windows)

    def record(self, event: AuditEvent) -> None:
        key = coalescing_key(event)
        if key is None:
            self.inner.record(event)
            return
        try:
            with self._lock:
                now = self.clock()
                self._close_ended(now)
                window = self._windows.get(key)
                if window is None:
                    if len(self._windows) >= self.max_windows:
                        self._close(next(iter(self._windows)))  # the oldest, early: written, not dropped
                    self._windows[key] = _Window(now)
                    self.inner.record(_with_details(event, count=1))
                    return
                if window.first_at is None:
                    window.first_at = event.created_at
                window.count += 1
                window.latest = _retained(event)
                if event.correlation_id is not None and len(window.sample) < self.sample_size:
                    window.sample.append(event.correlation_id)
        except Exception:  # never fail the request; never lose the event either
            logger.exception("could not coalesce audit event %s; recording it alone", event.action)
            self.inner.record(event)

    def flush_due(self) -> int:
        """Close the windows that have ended and hand on their summaries; how many were written."""
        with self._lock:
            return self._close_ended(self.clock())

    def flush(self) -> int:
        """Close every window now (shutdown, the writer's ``flush``); how many summaries were written."""
        with self._lock:
            written = 0
            while self._windows:
                written += self._close(next(iter(self._windows)))
            return written

    def _close_ended(self, now: float) -> int:
        written = 0
        while self._windows:
            key = next(iter(self._windows))
            if now - self._windows[key].opened < self.window:
                break  # opened in order: every later window has longer to run
            written += self._close(key)
        return written

    def _close(self, key: Key) -> int:
        window = self._windows.pop(key)
        if window.latest is None or window.first_at is None:
            return 0  # only the first event came: it is written already
        summary = _with_details(
            window.latest,
            count=window.count,
            first_at=timestamp(window.first_at),
            last_at=timestamp(window.latest.created_at),
            correlation_ids=window.sample,
        )
        self.inner.record(summary)
        return 1


def _with_details(event: AuditEvent, **extra: object) -> AuditEvent:
    return dataclasses.replace(event, details={**(event.details or {}), **extra})


def _retained(event: AuditEvent) -> AuditEvent:
    """``event`` with its text as it will be stored (bounded), so a held window's memory is bounded
    whatever the client sent; the same event when nothing needs a cut (the usual case)."""
    changes: dict[str, Any] = {}
    for name, limit in COLUMN_LIMITS.items():
        value = getattr(event, name, None)
        if isinstance(value, str) and len(value) > limit:
            changes[name] = bounded(value, limit)
    details = bounded_json(event.details) if event.details is not None else None
    if details is not event.details:
        changes["details"] = details
    return dataclasses.replace(event, **changes) if changes else event
