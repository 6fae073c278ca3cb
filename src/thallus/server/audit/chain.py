"""The hash chain: each record's hash covers its content, its sequence number and the previous hash.

``hash = SHA-256(prev_hash + "\\n" + canonical JSON of the record with its seq)``. Changing, removing,
inserting or reordering a row breaks the chain at that row, which ``verify`` reports. The canonical
JSON is built from two halves around the ``seq``, so that everything but the SHA-256 can be done
before a record's place in the chain is known (:class:`Prepared`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from json.encoder import c_encode_basestring_ascii, c_make_encoder  # type: ignore[attr-defined]
from typing import Any, NamedTuple

#: The §11 fields, in the order records are exported.
FIELDS = (
    "id",
    "action",
    "user_id",
    "outcome",
    "resource_type",
    "resource_id",
    "correlation_id",
    "details",
    "error_message",
    "ip_address",
    "user_agent",
    "method",
    "path",
    "status_code",
    "duration_ms",
    "created_at",
)


#: The canonical JSON encoder (sorted keys, no spaces, ASCII, ``default=str``), built once: the C
#: encoder ``json.dumps`` with those options builds on every call. It checks no circular references:
#: records are trees (:func:`normalised`, rows of the database, ``json_safe``).
_ENCODE = c_make_encoder(None, str, c_encode_basestring_ascii, None, ":", ",", True, False, True)


def _canonical_json(value: Any) -> str:
    return "".join(_ENCODE(value, 0))


#: The fields sorted before and after ``seq``: the canonical JSON is encoded as these two halves.
_BEFORE_SEQ = tuple(name for name in sorted(FIELDS) if name < "seq")
_AFTER_SEQ = tuple(name for name in sorted(FIELDS) if name > "seq")


def timestamp(value: datetime) -> str:
    """The one spelling of a time in hashes, journals and exports: UTC, microseconds."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def utc_text(value: Any) -> str:
    """``created_at`` as :func:`timestamp` spells it (prepared records do already)."""
    if isinstance(value, str) and len(value) == 32 and value[10] == "T" and value.endswith("+00:00"):
        return value
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; use UTC-aware ones")
    return timestamp(moment)


#: The §11 fields stored as text.
TEXT_FIELDS = tuple(
    name for name in FIELDS if name not in ("id", "details", "status_code", "duration_ms", "created_at")
)
#: Text neither database can store: NUL (PostgreSQL text and jsonb refuse it) and lone UTF-16
#: surrogates (not encodable as UTF-8). A request can carry either (``%00`` in a path, ``\\u0000`` or
#: ``\\ud800`` in a JSON body); before they were replaced, one such record made every later append fail.
_NUL, _REPLACEMENT = "\x00", "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalised(record: Mapping[str, Any]) -> dict[str, Any]:
    """The §11 fields of a record (in :data:`FIELDS` order) as they are stored and read back, so that
    what is hashed on the way in is what ``verify`` hashes on the way out, on either backend:
    ``id`` and the text fields strings (or None), NUL and lone surrogates replaced by U+FFFD (in
    ``details`` too), ``created_at`` spelled by :func:`timestamp`, ``duration_ms`` a finite float or None (NaN
    and infinities are stored as NULL — SQLite's own rule, and JSON has no spelling for them)."""
    return normalise({name: record.get(name) for name in FIELDS})


def normalise(document: dict[str, Any]) -> dict[str, Any]:
    """:func:`normalised`, in place, for a fresh dict of the §11 fields in :data:`FIELDS` order."""
    document["id"] = _text(document["id"])
    for name in TEXT_FIELDS:
        value = document[name]
        if value is not None:
            document[name] = _text(value)
    if document["details"] is not None:
        document["details"] = _storable_json(document["details"])
    document["created_at"] = utc_text(document["created_at"])
    duration = document["duration_ms"]
    if duration is not None:
        document["duration_ms"] = float(duration) if math.isfinite(duration) else None
    return document


def _text(value: Any) -> str:
    return _storable(value if isinstance(value, str) else str(value))


def _storable(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD (the usual ASCII text costs a flag test)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = _SURROGATE.sub(_REPLACEMENT, text)
    return text.replace(_NUL, _REPLACEMENT) if _NUL in text else text


def _storable_json(value: Any) -> Any:
    if isinstance(value, str):
        return _storable(value)
    if isinstance(value, dict):
        return {_storable_json(key): _storable_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable_json(item) for item in value]
    return value


def canonical_halves(record: Mapping[str, Any]) -> tuple[str, str]:
    """The canonical JSON of a record without its ``seq``: the text before ``,"seq":N,`` and after it.

    Keys sort the same way in halves as in the whole (every key of the first half sorts before
    ``seq``, every key of the second after it), so the halves joined around the ``seq`` are
    byte for byte the canonical JSON — most of the hashing work, done before ``seq`` is known.
    """
    created_at = record.get("created_at")
    before = {name: record.get(name) for name in _BEFORE_SEQ}
    if isinstance(created_at, datetime):
        before["created_at"] = timestamp(created_at)
    after = {name: record.get(name) for name in _AFTER_SEQ}
    return _canonical_json(before)[:-1], _canonical_json(after)[1:]


def canonical(record: Mapping[str, Any], seq: int) -> str:
    """Canonical JSON of a record's §11 fields and its ``seq`` (sorted keys, no spaces, ASCII)."""
    before, after = canonical_halves(record)
    return f'{before},"seq":{seq},{after}'


def link_hash(prev_hash: str, record: Mapping[str, Any], seq: int) -> str:
    return halves_hash(prev_hash, canonical_halves(record), seq)


def halves_hash(prev_hash: str, halves: tuple[str, str], seq: int) -> str:
    """:func:`link_hash` of a record whose :func:`canonical_halves` are known."""
    return hashlib.sha256(f'{prev_hash}\n{halves[0]},"seq":{seq},{halves[1]}'.encode()).hexdigest()


class Prepared(NamedTuple):
    """A :func:`normalised` record with its :func:`canonical_halves`: all that linking it has left
    to do is one SHA-256. The writer prepares each record this way as it is recorded, so the batch
    that appends it — a stretch of work the event loop cannot interrupt — stays short."""

    record: dict[str, Any]
    halves: tuple[str, str]

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Prepared:
        document = normalised(record)
        return cls(document, canonical_halves(document))
