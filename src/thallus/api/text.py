"""Text the service accepts: no NUL, no lone surrogate — a 400/422, never a 500 further down.

JSON lets a string carry both (``"\\u0000"``, ``"\\ud800"``) and a URL a NUL (``%00``). Neither is
text any person types, and each breaks something below the API: PostgreSQL refuses NUL in
``text`` columns (a ``DBAPIError``), a lone surrogate cannot be encoded as UTF-8 (for a hash, a
log line, a response). So they are refused at the edge: :data:`Text` for every string field of
a request body (422), :func:`refuse_nul` for the path, query and path parameters of every route (400).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from pydantic import AfterValidator

from thallus.errors import BadRequestError


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text, or ``None``."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it contains a lone surrogate)"
    return None


def _checked(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A request-body string without NUL or lone surrogates (otherwise a 422 naming the field).
Text = Annotated[str, AfterValidator(_checked)]


def refuse_nul(request: Request) -> None:
    """An app-wide dependency: a NUL in the path, the query or a path parameter is a 400."""
    values = [request.url.path, *request.query_params.keys(), *request.query_params.values()]
    values += [str(value) for value in request.path_params.values()]
    if any("\x00" in value for value in values):
        raise BadRequestError("The URL contains a NUL character.")
