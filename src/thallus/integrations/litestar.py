"""§8 errors for Litestar's own exceptions: ``Litestar(exception_handlers=exception_handlers(settings))``.

Litestar answers routing misses, wrong methods, validation failures and crashes itself, as JSON of
its own shape (``{"status_code": 404, "detail": "Not Found"}``). The error boundary of
:func:`thallus.protect` rewrites only *non-JSON* error responses, so without these handlers those
bodies reach the client unchanged, with no correlation ID. With them:

* every :class:`~litestar.exceptions.HTTPException` (``NotFoundException`` from routing,
  ``MethodNotAllowedException`` with its ``Allow`` header, ``NotAuthorizedException``, …) keeps its
  status and headers and gets the §8 body; below 500, an explicit ``detail`` becomes the message and
  ``extra`` the details (sensitive-looking fields redacted); a 5xx one (Litestar raises some whose
  detail describes its internals) says nothing of itself, like any 500, and is logged;
* a :class:`~litestar.exceptions.ValidationException` (Litestar's 400 for a body or parameter that
  does not validate) is the §8 ``422 ValidationError`` with ``details`` a list of
  ``{type, loc, msg, input}`` — ``input`` is always ``None``: Litestar does not say what it refused,
  and nothing of the request is echoed (a ``detail`` the application gave is the message; Litestar's
  own, which quotes the path and query string, is not); a body that cannot be decoded is a ``400 BadRequestError``;
* a :class:`~thallus.errors.ThallusError` keeps its own status and shape;
* any other exception is the JSON 500 — logged with its traceback on ``thallus.errors`` (with the
  correlation ID, where logging is set up to carry it), as the error boundary does, since Litestar
  logs exceptions only in debug mode — naming the exception in ``details`` only when ``settings``
  expose details (development).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import ClientException, HTTPException, SerializationException, ValidationException
from litestar.types import ExceptionHandlersMap

from thallus.errors import ThallusError, default_message, error_body, error_type_for, redact
from thallus.settings import Settings

__all__ = ["exception_handlers"]

logger = logging.getLogger("thallus.errors")

_MEDIA_TYPE = "application/json"
_DETAIL_TEXT_LIMIT = 1000
_VALIDATION_MESSAGE = "The request is invalid."
_MALFORMED_MESSAGE = "The request body could not be decoded."
_LITESTAR_VALIDATION_DETAIL = "Validation failed for "


def _cut(text: str) -> str:
    return text if len(text) <= _DETAIL_TEXT_LIMIT else text[:_DETAIL_TEXT_LIMIT] + "…"


def _response(status: int, error: str, message: str, details: Any = None, headers: Any = None) -> Response[bytes]:
    return Response(
        error_body(error, message, details), status_code=status, media_type=_MEDIA_TYPE, headers=headers or None
    )


def _validation_details(extra: Any) -> Any:
    """Litestar's ``extra`` (``[{"message", "key", "source"}, …]``) as §8 ``{type, loc, msg, input}`` items."""
    if not isinstance(extra, list) or not all(isinstance(item, dict) and "message" in item for item in extra):
        return redact(extra)
    return [
        {
            "type": "value_error",
            "loc": [str(part) for part in (item.get("source"), item.get("key")) if part is not None],
            "msg": str(item["message"]),
            "input": None,
        }
        for item in extra
    ]


def _thallus_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, ThallusError)
    if exc.status_code >= 500:
        logger.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in exc.headers}
    return _response(exc.status_code, exc.error, exc.message, exc.details, headers)


def exception_handlers(settings: Settings | None = None) -> ExceptionHandlersMap:
    """Handlers for ``Litestar(exception_handlers=...)`` (module doc); merge your own after them:
    ``{**exception_handlers(settings), MyError: my_handler}``. ``settings`` are the ones given to
    ``protect``; only :attr:`~thallus.settings.Settings.expose_error_details` is read (development:
    a 500 names the exception)."""
    expose_details = settings.expose_error_details if settings is not None else False

    def exception_details(exc: Exception) -> dict[str, str] | None:
        return {"exception": type(exc).__name__, "message": _cut(str(exc))} if expose_details else None

    def http_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        headers = dict(exc.headers or {})
        if isinstance(exc, ValidationException):
            # Litestar's own detail names the path and query ("Validation failed for POST /items?token=…"):
            # never echoed; a detail the application gave is its message.
            own = exc.detail.startswith(_LITESTAR_VALIDATION_DETAIL) or exc.detail == HTTPStatus(status).phrase
            message = _VALIDATION_MESSAGE if own else exc.detail
            return _response(422, "ValidationError", message, _validation_details(exc.extra), headers)
        if isinstance(exc, ClientException) and isinstance(exc.__cause__, SerializationException):
            malformed = [{"type": "json_invalid", "loc": ["body"], "msg": _cut(exc.detail), "input": None}]
            return _response(400, "BadRequestError", _MALFORMED_MESSAGE, malformed, headers)
        if status >= 500:
            # Litestar raises 5xx HTTPExceptions of its own whose detail describes internals
            # (ImproperlyConfiguredException, TemplateNotFoundException): a 500 says nothing of them.
            logger.error("%s: %s", type(exc).__name__, exc.detail, exc_info=exc)
            return _response(status, error_type_for(status), default_message(status), exception_details(exc), headers)
        message = exc.detail if exc.detail and exc.detail != HTTPStatus(status).phrase else default_message(status)
        details: Any = redact(exc.extra) if exc.extra else None
        if status == 405:
            allow = next((value for name, value in headers.items() if name.lower() == "allow"), None)
            if allow is not None:
                details = {"allowed_methods": [method.strip() for method in allow.split(",") if method.strip()]}
        return _response(status, error_type_for(status), message, details, headers)

    def unhandled(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        logger.error("unhandled exception: %s", type(exc).__name__, exc_info=exc)
        return _response(500, "InternalServerError", default_message(500), exception_details(exc))

    return {HTTPException: http_exception, ThallusError: _thallus_error, Exception: unhandled}
