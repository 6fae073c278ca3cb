"""``POST /csp-report``: receives browsers' CSP violation reports and logs them (never stores them).

Set ``THALLUS_CSP_REPORT_URI=/csp-report`` to have browsers send them here.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request, Response

from thallus.errors import BadRequestError, PayloadTooLargeError, ThallusError

router = APIRouter(tags=["csp"])

CSP_REPORT_PATH = "/csp-report"
CSP_REPORT_MAX_BYTES = 64 * 1024
#: A report is an object of strings and numbers (two levels; a Reporting API batch, three).
CSP_REPORT_MAX_DEPTH = 8
REPORT_TYPES = frozenset({"application/csp-report", "application/reports+json", "application/json"})

report_logger = logging.getLogger("thallus.csp")


@router.post(CSP_REPORT_PATH, status_code=204, include_in_schema=False)
async def csp_report(request: Request) -> Response:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in REPORT_TYPES:
        raise ThallusError("CSP reports must be JSON.", status_code=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > CSP_REPORT_MAX_BYTES:
            raise PayloadTooLargeError(f"A CSP report may be at most {CSP_REPORT_MAX_BYTES} bytes.")
    try:
        report = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequestError("The CSP report is not valid JSON.") from None
    if nesting(report) > CSP_REPORT_MAX_DEPTH:
        raise BadRequestError(f"A CSP report is nested at most {CSP_REPORT_MAX_DEPTH} levels deep.")
    report_logger.warning("CSP violation reported", extra={"csp_report": report})
    return Response(status_code=204)


def nesting(value: object) -> int:
    """How many levels of objects and arrays ``value`` has (iteratively: no recursion to exhaust)."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item)
    return deepest
