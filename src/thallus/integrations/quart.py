"""§8 errors for Quart's own exceptions that keep what the application said: ``install_error_handlers(app)``.

Behind :func:`thallus.protect` every Quart error response is already the §8 shape: Quart answers
``404``, ``405``, ``abort(…)`` and crashes with HTML pages, which the error boundary rewrites. The
rewrite knows only the status, so ``abort(404, "No such item")`` reaches the client as the generic
"The requested resource was not found.", and a :class:`~thallus.errors.ThallusError` raised in a
view becomes a 500 (Quart turns every exception it does not know into one). With the handlers:

* a Werkzeug :class:`~werkzeug.exceptions.HTTPException` (what ``abort`` raises, and routing's
  ``NotFound``/``MethodNotAllowed``) keeps its status and headers (``Allow``, ``WWW-Authenticate``);
  below 500 a description given to it becomes the message (the class's stock description does not;
  a 5xx says nothing of its cause), and the allowed methods of a 405 become the details;
  ``abort(response)`` sends that response;
* a :class:`~thallus.errors.ThallusError` keeps its own status and shape;
* an unhandled exception stays Quart's: logged by ``app.logger`` and answered as a 500, now the §8
  JSON with no detail of the exception.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from thallus.errors import ThallusError, default_message, error_body, error_type_for

__all__ = ["install_error_handlers"]

logger = logging.getLogger("thallus.errors")

_MEDIA_TYPE = "application/json"
_DROPPED = frozenset({"content-type", "content-length"})


def _response(status: int, error: str, message: str, details: Any, headers: list[tuple[str, str]]) -> Response:
    body = error_body(error, message, details)
    return Response(body, status=status, headers=Headers(headers), content_type=_MEDIA_TYPE)


async def _http_exception(exc: HTTPException) -> Any:
    if exc.response is not None:  # abort(response): the application's own answer
        return exc.response
    status = exc.code or 500
    headers = [(name, value) for name, value in exc.get_headers() if name.lower() not in _DROPPED]
    # A 5xx says nothing of its cause (Quart wraps every unhandled exception in InternalServerError).
    described = status < 500 and exc.description is not None and exc.description != type(exc).description
    message = exc.description if described and exc.description else default_message(status)
    details = None
    if status == 405:
        allow = next((value for name, value in headers if name.lower() == "allow"), None)
        if allow is not None:
            details = {"allowed_methods": [method.strip() for method in allow.split(",") if method.strip()]}
    return _response(status, error_type_for(status), message, details, headers)


async def _thallus_error(exc: ThallusError) -> Response:
    if exc.status_code >= 500:
        logger.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in exc.headers]
    return _response(exc.status_code, exc.error, exc.message, exc.details, headers)


def install_error_handlers(app: Quart) -> None:
    """Register the handlers (module doc) on ``app``; handlers it registered itself for these
    exception classes are kept."""
    handlers = app.error_handler_spec[None][None]
    if HTTPException not in handlers:
        app.register_error_handler(HTTPException, _http_exception)
    if ThallusError not in handlers:
        app.register_error_handler(ThallusError, _thallus_error)
