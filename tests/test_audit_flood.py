"""One client cannot fill the audit log (docs/design.md §11), in process.

1. Denials coalesced per client (:mod:`thallus.server.audit.coalesce`): the first at once, one summary per
   window with exact counts, groups independent, a cap on open windows, nothing lost at flush/stop.
2. A request answered 429 writes no ``request`` record (its ``rate_limited`` record stands for it).
3. Every stored text is bounded (:mod:`thallus.server.audit.bounds`), and the chain still verifies.

The black-box figures against a real ``thallus serve`` are in ``test_audit_flood_served.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.service import SAME_ORIGIN, Api, running_api, settings_for
from thallus._asgi import Message, Receive, Scope, Send
from thallus.audit import AuditEvent
from thallus.audit.middleware import AuditRequestMiddleware
from thallus.server.audit.bounds import COLUMN_LIMITS, MAX_TEXT, bounded, bounded_json, marker
from thallus.server.audit.chain import FIELDS
from thallus.server.audit.coalesce import COALESCED_ACTIONS, CoalescingSink, coalescing_key
from thallus.server.audit.journal import Journal, read_records
from thallus.server.audit.store import AuditFilter, AuditStore
from thallus.server.audit.writer import AuditWriter, prepare
from thallus.server.storage import Database
from thallus.server.storage.models import AuditLog

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Collected:
    """The inner sink: what the coalescing sink handed on, in order."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    def counts(self) -> list[int]:
        return [int((event.details or {})["count"]) for event in self.events]


def denial(action: str = "rate_limited", ip: str | None = "203.0.113.7", number: int = 0, **fields: Any) -> AuditEvent:
    fields.setdefault("outcome", "denied")
    fields.setdefault("details", {"policy": "general"})
    return AuditEvent(
        action=action,
        ip_address=ip,
        correlation_id=f"cid-{number}",
        created_at=T0 + timedelta(seconds=number),
        path=f"/p/{number}",
        method="POST",
        status_code=429,
        **fields,
    )


def sink(window: float = 60.0, **options: Any) -> tuple[CoalescingSink, Collected, Clock]:
    clock, inner = Clock(), Collected()
    return CoalescingSink(inner, window=window, clock=clock, **options), inner, clock


# -- coalescing -----------------------------------------------------------------------------------


def test_first_event_is_written_at_once_unchanged_but_for_its_count() -> None:
    coalescer, inner, _ = sink()
    first = denial()
    coalescer.record(first)
    [written] = inner.events
    assert written.details == {"policy": "general", "count": 1}
    assert {name: getattr(written, name) for name in FIELDS if name not in ("id", "details")} == {
        name: getattr(first, name) for name in FIELDS if name not in ("id", "details")
    }
    assert coalescer.flush() == 0, "a lone event needs no summary"
    assert inner.events == [written]


def test_one_summary_per_window_with_exact_counts() -> None:
    coalescer, inner, clock = sink(window=60)
    for number in range(12):
        clock.now = number
        coalescer.record(denial(number=number))
    assert len(inner.events) == 1, "the rest wait for the end of the window"
    clock.now = 59.9
    assert coalescer.flush_due() == 0
    clock.now = 60.0
    assert coalescer.flush_due() == 1
    summary = inner.events[1]
    assert summary.details == {
        "policy": "general",
        "count": 11,
        "first_at": (T0 + timedelta(seconds=1)).isoformat(timespec="microseconds"),
        "last_at": (T0 + timedelta(seconds=11)).isoformat(timespec="microseconds"),
        "correlation_ids": [f"cid-{n}" for n in range(1, 11)],  # the first ten it stands for
    }
    assert (summary.path, summary.correlation_id, summary.created_at) == (
        "/p/11",
        "cid-11",
        T0 + timedelta(seconds=11),
    ), "the fields of the window's latest event"
    assert sum(inner.counts()) == 12
    assert coalescer.open_windows == 0


def test_a_window_that_ended_is_closed_by_the_next_event_which_opens_another() -> None:
    coalescer, inner, clock = sink(window=10)
    coalescer.record(denial(number=0))
    coalescer.record(denial(number=1))
    clock.now = 10
    coalescer.record(denial(number=2))
    assert [event.correlation_id for event in inner.events] == ["cid-0", "cid-1", "cid-2"]
    assert inner.counts() == [1, 1, 1], "the summary of the first window, then the next window's first"
    assert coalescer.open_windows == 1


@pytest.mark.parametrize(
    ("first", "second", "together"),
    [
        (denial("rate_limited"), denial("rate_limited", number=1), True),
        (denial("rate_limited"), denial("rate_limited", ip="198.51.100.1"), False),
        (denial("rate_limited"), denial("cors_rejected"), False),
        (denial("csrf_rejected"), denial("cors_rejected"), False),
        (denial("csrf_rejected"), denial("csrf_rejected", number=5), True),
        (
            denial("login_failed", outcome="failure", details={"email": "a@example.com"}),
            denial("login_failed", outcome="failure", details={"email": "a@example.com"}),
            True,
        ),
        (
            denial("login_failed", outcome="failure", details={"email": "a@example.com"}),
            denial("login_failed", outcome="failure", details={"email": "b@example.com"}),
            False,
        ),
        (
            denial("login_failed", outcome="failure", details={"identifier_hash": "ab" * 16}),
            denial("login_failed", outcome="failure", details={"identifier_hash": "cd" * 16}),
            False,
        ),
        (
            denial("login_failed", outcome="failure", details={"email": "a@example.com"}),
            denial("login_failed", outcome="denied", details={"email": "a@example.com", "reason": "locked"}),
            False,
        ),
    ],
)
def test_groups_are_independent(first: AuditEvent, second: AuditEvent, together: bool) -> None:
    coalescer, inner, _ = sink()
    coalescer.record(first)
    coalescer.record(second)
    assert len(inner.events) == (1 if together else 2)
    coalescer.flush()
    assert sum(inner.counts()) == 2


@pytest.mark.parametrize(
    "event",
    [
        AuditEvent(action="request", outcome="denied", status_code=403),
        AuditEvent(action="login", outcome="success"),
        AuditEvent(action="permission_denied", outcome="denied"),
        AuditEvent(action="account_locked", outcome="denied"),
        AuditEvent(action="rate_limited", outcome="success"),  # not a denial outcome
    ],
)
def test_other_events_pass_straight_through(event: AuditEvent) -> None:
    coalescer, inner, _ = sink()
    assert coalescing_key(event) is None
    coalescer.record(event)
    coalescer.record(event)
    assert inner.events == [event, event]
    assert coalescer.open_windows == 0


def test_the_cap_on_open_windows_closes_the_oldest_early() -> None:
    coalescer, inner, clock = sink(max_windows=3)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        coalescer.record(denial(ip=ip))
        coalescer.record(denial(ip=ip))
    clock.now = 1
    coalescer.record(denial(ip="10.0.0.4"))
    assert coalescer.open_windows == 3
    assert [(event.ip_address, inner.counts()[i]) for i, event in enumerate(inner.events)] == [
        ("10.0.0.1", 1),
        ("10.0.0.2", 1),
        ("10.0.0.3", 1),
        ("10.0.0.1", 1),  # closed early, its tally written, not dropped
        ("10.0.0.4", 1),
    ]
    coalescer.flush()
    assert sum(inner.counts()) == 7


def test_flush_hands_on_every_window() -> None:
    coalescer, inner, _ = sink()
    for number in range(30):
        coalescer.record(denial(ip=f"10.0.0.{number % 3}", number=number))
    assert coalescer.flush() == 3
    assert coalescer.open_windows == 0
    assert sum(inner.counts()) == 30


def test_records_from_several_threads_add_up() -> None:
    coalescer, inner, _ = sink()

    def flood(ip: str) -> None:
        for number in range(500):
            coalescer.record(denial(ip=ip, number=number))

    threads = [threading.Thread(target=flood, args=(f"10.0.0.{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    coalescer.flush()
    assert len(inner.events) == 8
    assert sum(inner.counts()) == 2000


@dataclass(frozen=True)
class Step:
    action: str
    client: int
    identifier: int
    advance: float


STEPS = st.builds(
    Step,
    action=st.sampled_from(sorted(COALESCED_ACTIONS)),
    client=st.integers(0, 3),
    identifier=st.integers(0, 2),
    advance=st.sampled_from([0.0, 0.0, 0.5, 3.0, 11.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(STEPS, max_size=120),
    window=st.sampled_from([1.0, 5.0, 10.0]),
    cap=st.integers(1, 6),
    ticks=st.booleans(),
)
def test_counts_always_add_up(steps: list[Step], window: float, cap: int, ticks: bool) -> None:
    coalescer, inner, clock = sink(window=window, max_windows=cap)
    sent: Counter[tuple[str, str | None, str | None]] = Counter()
    for number, step in enumerate(steps):
        clock.now += step.advance
        if ticks:
            coalescer.flush_due()
        details = {"email": f"u{step.identifier}@example.com"} if step.action == "login_failed" else {}
        event = denial(step.action, ip=f"10.0.0.{step.client}", number=number, details=details)
        coalescer.record(event)
        key = coalescing_key(event)
        assert key is not None
        sent[(key[0], key[2], key[3])] += 1
        assert coalescer.open_windows <= cap
    coalescer.flush()
    assert coalescer.open_windows == 0
    stored: Counter[tuple[str, str | None, str | None]] = Counter()
    for event in inner.events:
        key = coalescing_key(event)
        assert key is not None
        count = int((event.details or {})["count"])
        assert count >= 1
        stored[(key[0], key[2], key[3])] += count
    assert stored == sent
    assert len(inner.events) <= len(steps)


# -- through the writer ---------------------------------------------------------------------------


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


async def coalescing_writer(url: str, journal_dir: Path, window: float) -> tuple[Database, AuditWriter, CoalescingSink]:
    database = Database(url)
    await database.migrate()
    writer = AuditWriter(AuditStore(database), journal_dir, retry_interval=0.05)
    coalescer = CoalescingSink(writer, window=window)
    writer.add_source(coalescer)
    await writer.start()
    return database, writer, coalescer


async def stored_rows(database: Database) -> list[AuditLog]:
    return [row async for row in AuditStore(database).stream(AuditFilter())]


def test_the_writer_writes_a_summary_when_no_further_event_comes(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        database, writer, coalescer = await coalescing_writer(database_url, journal_dir, window=0.3)
        for number in range(50):
            coalescer.record(denial(number=number))
        await asyncio.sleep(1.0)  # no flush, no further event: the writer's own turns close the window
        rows = await stored_rows(database)
        assert [row.details["count"] for row in rows] == [1, 49]
        await writer.stop()
        await database.dispose()

    asyncio.run(scenario())


def test_stop_and_flush_write_what_is_held(database_url: str, journal_dir: Path) -> None:
    async def scenario() -> None:
        database, writer, coalescer = await coalescing_writer(database_url, journal_dir, window=3600)
        for number in range(20):
            coalescer.record(denial(number=number))
        await writer.flush()
        assert [row.details["count"] for row in await stored_rows(database)] == [1, 19]
        for number in range(7):
            coalescer.record(denial("cors_rejected", number=number))
        await writer.stop()
        rows = await stored_rows(database)
        assert [(row.action, row.details["count"]) for row in rows[2:]] == [("cors_rejected", 1), ("cors_rejected", 6)]
        assert (await AuditStore(database).verify()).ok
        await database.dispose()

    asyncio.run(scenario())


# -- 429: no separate request record --------------------------------------------------------------


def answering(status: int) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize(("status", "recorded"), [(429, False), (404, True), (403, True), (204, True), (500, True)])
def test_request_record_unless_answered_429(status: int, recorded: bool) -> None:
    inner = Collected()
    middleware = AuditRequestMiddleware(answering(status), inner)
    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": [], "client": ("10.0.0.1", 1)}

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        return None

    asyncio.run(middleware(scope, receive, send))
    assert [event.status_code for event in inner.events] == ([status] if recorded else [])


@pytest.fixture
def limited_api(database_url: str) -> Iterator[Api]:
    with running_api(settings_for(database_url, rate_limit="3/minute")) as api:
        yield api


def test_served_429s_write_rate_limited_records_only(limited_api: Api) -> None:
    api = limited_api
    statuses = [api.client.post("/api/v1/nowhere", headers=SAME_ORIGIN).status_code for _ in range(10)]
    assert statuses == [404] * 3 + [429] * 7
    raw = Counter((event.action, event.status_code) for event in api.audit.events)
    assert raw == {("request", 404): 3, ("rate_limited", 429): 7}, "the recording sink sees every raw event"
    rows = api.stored_audit()
    assert [(row.action, row.status_code) for row in rows if row.action == "request"] == [("request", 404)] * 3
    assert [row.details["count"] for row in rows if row.action == "rate_limited"] == [1, 6]


def test_a_refused_preflight_flood_is_two_rows(limited_api: Api) -> None:
    api = limited_api
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    for number in range(300):
        assert api.client.options(f"/api/v1/x{number}", headers=preflight).status_code == 403
    rows = [row for row in api.stored_audit() if row.action == "cors_rejected"]
    assert [row.details["count"] for row in rows] == [1, 299]
    assert rows[1].path == "/api/v1/x299" and len(rows[1].details["correlation_ids"]) == 10
    assert len(api.audit.events) == 300


def test_failed_sign_ins_are_coalesced_per_identifier(limited_api: Api) -> None:
    api = limited_api
    for email in ["ada@example.com"] * 4 + ["bob@example.com"] * 2 + ["not an address"] * 2:
        assert api.login(email, password="Wrong-Password-123!").status_code == 401
    rows = [row for row in api.stored_audit() if row.action == "login_failed"]
    by_name: Counter[str] = Counter()
    for row in rows:
        by_name[row.details.get("email") or row.details["identifier_hash"]] += row.details["count"]
    assert by_name["ada@example.com"] == 4 and by_name["bob@example.com"] == 2 and len(by_name) == 3
    assert sum(by_name.values()) == sum(event.action == "login_failed" for event in api.audit.events)
    assert [row.details["count"] for row in rows if row.details.get("email") == "ada@example.com"] == [1, 3]


# -- bounded text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("x" * 10, 10, "x" * 10),
        ("x" * 100, 50, "x" * 29 + "…[truncated 71 chars]"),
        ("x" * 1000, 50, "x" * 28 + "…[truncated 972 chars]"),
        ("x" * 100, 30, "x" * 29 + "…"),  # too narrow to say how much
        ("x" * 100, 16, "x" * 15 + "…"),
        ("é" * 5000, 2048, "é" * 2025 + "…[truncated 2975 chars]"),
    ],
)
def test_bounded_cuts_with_a_marker(text: str, limit: int, expected: str) -> None:
    assert bounded(text, limit) == expected
    assert len(expected) <= limit


@settings(max_examples=400)
@given(length=st.integers(0, 20_000), limit=st.integers(1, 3000))
def test_bounded_is_a_marked_prefix_within_the_limit(length: int, limit: int) -> None:
    text = "".join(chr(ord("a") + n % 26) for n in range(length))
    cut = bounded(text, limit)
    assert len(cut) <= limit
    if length <= limit:
        assert cut == text
    else:
        kept = cut.rsplit("…", 1)[0]
        assert text.startswith(kept) and cut != text
        assert cut in (kept + marker(length - len(kept)), kept + "…")
    assert bounded(cut, limit) == cut, "idempotent"


LONG = 10_000


@pytest.mark.parametrize("name", sorted(COLUMN_LIMITS))
def test_every_text_field_is_bounded_when_prepared(name: str) -> None:
    fields: dict[str, Any] = {"action": "request", "outcome": "success", name: "z" * LONG}
    record = prepare(AuditEvent(**fields))
    limit = COLUMN_LIMITS[name]
    assert len(record[name]) == limit <= MAX_TEXT
    assert record[name].startswith("z") and record[name].endswith("…" if limit < 48 else " chars]")


def test_strings_inside_details_are_bounded_at_every_depth() -> None:
    details = {
        "origin": "o" * LONG,
        "k" * 3000: 1,
        "nested": {"list": ["x" * 5000, {"deep": "y" * 3000}, 7, None], "ok": "fine"},
    }
    record = prepare(AuditEvent(action="cors_rejected", outcome="denied", details=details))
    stored = record["details"]

    def texts(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from texts(item)
        elif isinstance(value, list):
            for item in value:
                yield from texts(item)

    assert all(len(text) <= MAX_TEXT for text in texts(stored))
    assert stored["origin"].endswith(f"…[truncated {LONG - 2048 + 23} chars]")
    assert stored["nested"]["list"][1]["deep"].startswith("y" * 2000)
    assert stored["nested"]["list"][2:] == [7, None] and stored["nested"]["ok"] == "fine"
    assert details["origin"] == "o" * LONG, "the producer's dict is not changed"
    short = {"a": "b", "n": [1, "c"]}
    assert bounded_json(short) is short, "nothing to cut: no copy"


def huge_event(number: int) -> AuditEvent:
    return AuditEvent(
        action="cors_rejected",
        outcome="denied",
        path="/" + "é" * 5000 + str(number),
        user_agent="ü" * 4000,
        error_message="e\x00" * 3000,  # NUL is made storable, then the text bounded
        resource_id="r" * 500,
        method="M" * 40,
        details={"origin": "🙂" * 3000, "nested": {"values": ["v" * 9000]}},
    )


def test_the_journal_holds_the_bounded_record(tmp_path: Path) -> None:
    record = prepare(huge_event(0))
    journal = Journal(tmp_path)
    journal.append([record])
    journal.close()
    [read] = read_records(journal.path)
    assert read == record


def test_bounded_records_chain_and_verify(database_url: str) -> None:
    async def scenario() -> None:
        database = Database(database_url)
        await database.migrate()
        store = AuditStore(database)
        await store.append([prepare(huge_event(number)) for number in range(5)])
        rows = [row async for row in store.stream(AuditFilter())]
        assert all(len(row.path or "") == 2048 and len(row.user_agent or "") == 512 for row in rows)
        assert all(len(row.details["origin"]) <= MAX_TEXT for row in rows)
        assert (await store.verify()).ok
        await database.dispose()

    asyncio.run(scenario())
