"""The error responses every route documents in ``/openapi.json``: the §8 shape, by status.

FastAPI documents only its own 422 (``{"detail": …}``, which this service never sends); clients
generated from the schema, and schema-driven tests, need the statuses and the body they will
really get.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field

from thallus.errors import error_type_for


class ErrorResponse(BaseModel):
    """Every error, from any layer (docs/design.md §8)."""

    error: str = Field(description="the error type, e.g. ValidationError")
    message: str = Field(description="human-readable text")
    details: Any = Field(None, description="an object, a list of {type, loc, msg, input}, or null")
    correlation_id: str | None = Field(description="the X-Correlation-ID of the request")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router: each status with the §8 body and its ``error`` type named."""
    return {
        status: {"model": ErrorResponse, "description": f"{HTTPStatus(status).phrase} ({error_type_for(status)})"}
        for status in statuses
    }


#: What any route can answer whatever it does: malformed or hostile input, bodies, limits, outages.
COMMON = (400, 408, 413, 422, 429, 500, 503)
AUTHENTICATED = (*COMMON, 401, 403)
