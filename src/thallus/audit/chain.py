"""The hash chain: each record's hash covers its content, its sequence number and the previous hash.

``hash = SHA-256(prev_hash + "\\n" + canonical JSON of the record with its seq)``. Changing, removing,
inserting or reordering a row breaks the chain at that row, which ``verify`` reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

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


def timestamp(value: datetime) -> str:
    """The one spelling of a time in hashes, journals and exports: UTC, microseconds."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def canonical(record: Mapping[str, Any], seq: int) -> str:
    """Canonical JSON of a record's §11 fields and its ``seq`` (sorted keys, no spaces, ASCII)."""
    document = {name: record.get(name) for name in FIELDS}
    created_at = document["created_at"]
    if isinstance(created_at, datetime):
        document["created_at"] = timestamp(created_at)
    document["seq"] = seq
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def link_hash(prev_hash: str, record: Mapping[str, Any], seq: int) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical(record, seq)}".encode()).hexdigest()
