"""Bounded text in stored audit records (docs/design.md §11: "stored text fields are bounded in length").

Rule: every text a record stores — each text column and every string inside ``details``, keys and
values, at any depth — is at most :data:`MAX_TEXT` (2048) **characters**, or its column's narrower
width (``user_agent`` 512, ``resource_id`` 128, …: PostgreSQL's ``varchar(n)`` counts characters,
so this is the one unit both databases agree on; in UTF-8 a stored character is at most 4 bytes).
A longer text keeps its beginning and ends with a visible marker that says how much was cut,
``…[truncated 1234 chars]``, the marker counted inside the bound (a bound too narrow for the marker,
such as ``method``'s 16, ends with a bare ``…``).

Why: a client chooses the path, the user agent, the ``Origin`` and the sign-in name it sends, and
before this bound ``details`` copied them at any length — one client sending long paths could grow
the log by tens of megabytes in seconds. The bound is applied once, in
:func:`thallus.server.audit.writer.prepare`, before the record is hashed, journalled or stored, so the
journal and every backend hold the same bounded text and ``thallus audit verify`` (which hashes what
is stored) agrees with the hash made on the way in.
"""

from __future__ import annotations

from typing import Any

#: The ceiling for any stored text, in characters.
MAX_TEXT = 2048
#: The narrower bounds of the text columns (their widths in :class:`thallus.server.storage.models.AuditLog`).
COLUMN_LIMITS: dict[str, int] = {
    "action": 64,
    "user_id": 36,
    "outcome": 16,
    "resource_type": 64,
    "resource_id": 128,
    "correlation_id": 128,
    "ip_address": 64,
    "user_agent": 512,
    "method": 16,
    "path": MAX_TEXT,
    "error_message": MAX_TEXT,
}
SHORT_MARKER = "…"


def marker(cut: int) -> str:
    """What replaces the ``cut`` characters removed from the end of a text."""
    return f"…[truncated {cut} chars]"


def bounded(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` itself when it fits in ``limit`` characters, else its beginning and a :func:`marker`,
    ``limit`` characters in all."""
    length = len(text)
    if length <= limit:
        return text
    keep = limit
    while True:  # the marker's digits depend on how much it cuts: settle the two (at most a few turns)
        fitted = limit - len(marker(length - keep))
        if fitted == keep or fitted < limit // 2:
            break
        keep = fitted
    if fitted < limit // 2:  # too narrow to say how much: a bare ellipsis still shows the cut
        return text[: limit - len(SHORT_MARKER)] + SHORT_MARKER
    return text[:keep] + marker(length - keep)


def bounded_json(value: Any, limit: int = MAX_TEXT) -> Any:
    """``value`` (JSON-shaped: dicts, lists, scalars) with every string in it :func:`bounded`; dict
    keys too (they are the producers' names, but nothing is left unbounded). With nothing to cut —
    the usual short ``details`` — ``value`` itself is returned: one walk, no copy."""
    return _cut(value, limit) if _too_long(value, limit) else value


def _too_long(value: Any, limit: int) -> bool:
    """Whether anything in ``value`` needs a cut (plain loops: this runs for every record)."""
    if isinstance(value, str):
        return len(value) > limit
    if isinstance(value, dict):
        for key, item in value.items():  # noqa: SIM110 - a loop measured twice as fast as any()
            if (isinstance(key, str) and len(key) > limit) or _too_long(item, limit):
                return True
        return False
    if isinstance(value, list):
        for item in value:
            if _too_long(item, limit):
                return True
    return False


def _cut(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return bounded(value, limit)
    if isinstance(value, dict):
        return {_cut(key, limit): _cut(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut(item, limit) for item in value]
    return value


def bound_record(record: dict[str, Any]) -> dict[str, Any]:
    """A :func:`~thallus.server.audit.chain.normalised` record with its text fields and ``details`` bounded,
    in place (the bound keeps text storable: it cuts between code points and adds ASCII)."""
    for name, limit in COLUMN_LIMITS.items():
        value = record.get(name)
        if isinstance(value, str) and len(value) > limit:
            record[name] = bounded(value, limit)
    details = record.get("details")
    if details is not None:
        record["details"] = bounded_json(details)
    return record
