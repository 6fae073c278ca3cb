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
    except ValueError:
        raise BadRequestError("The CSP report is not valid JSON.") from None
    report_logger.warning("CSP violation reported", extra={"csp_report": report})
    return Response(status_code=204)
