"""Small helpers that give a framework's *own* error responses the §8 shape (docs/design.md §8).

``protect(app, settings)`` already wraps any ASGI application; these modules cover what a
framework answers by itself before the layers can help, each importing only its framework and
Thallus' layer modules, never each other:

* :mod:`thallus.integrations.litestar` — ``exception_handlers(settings)`` for
  ``Litestar(exception_handlers=...)``: Litestar's 404, 405, validation errors and crashes are JSON of
  Litestar's own shape, which the error boundary (rewriting only non-JSON errors) keeps as it is;
* :mod:`thallus.integrations.django` — ``csrf_failure`` for ``CSRF_FAILURE_VIEW``: Django's own CSRF
  refusals as a ``403 CSRFError`` with Django's reason instead of its HTML page;
* :mod:`thallus.integrations.quart` — ``install_error_handlers(app)``: ``abort(404, "…")`` keeps its
  message and a raised :class:`~thallus.errors.ThallusError` keeps its status.

Starlette and FastAPI need none: ``protect`` installs their handlers
(:func:`thallus.errors.install_error_handlers`). docs/frameworks/ has a page per framework.
"""
