"""Django's own CSRF refusals in the §8 shape: ``CSRF_FAILURE_VIEW = "thallus.integrations.django.csrf_failure"``.

Behind :func:`thallus.protect`, two CSRF checks run on a Django project that keeps
``django.middleware.csrf.CsrfViewMiddleware``: Thallus' origin check first (cookie-carrying unsafe
requests only), then Django's own (every unsafe request to a view that is not ``csrf_exempt``: the
``Origin`` against ``CSRF_TRUSTED_ORIGINS``, then the ``csrftoken`` cookie against the submitted
token). Django answers its refusals with an HTML page; the error boundary rewrites any non-JSON error
to the §8 shape, but only as a generic ``403 PermissionDeniedError`` — Django's reason ("CSRF cookie
not set.", "Origin checking failed - …") is lost. Set as ``CSRF_FAILURE_VIEW``, :func:`csrf_failure`
answers ``403 CSRFError`` with that reason instead, carrying the request's correlation ID.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from thallus.errors import error_body

__all__ = ["csrf_failure"]

_TEXT_LIMIT = 200


def _cut(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "…"


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """Django's ``CSRF_FAILURE_VIEW``: ``403 CSRFError`` with ``details = {"reason", "origin"}``.

    ``reason`` is Django's (it names the refused ``Origin`` or ``Referer`` origin, never a token);
    ``origin`` is the request's ``Origin`` header, or ``None``. Both are cut at 200 characters.
    """
    reason = _cut(reason.strip() or "CSRF verification failed.")
    origin = request.headers.get("Origin")
    details = {"reason": reason, "origin": _cut(origin) if origin is not None else None}
    message = "Cross-site request refused: " + reason.rstrip(".") + "."
    return HttpResponse(error_body("CSRFError", message, details), status=403, content_type="application/json")
