"""End-to-end tests in a real Chromium: what headers, CORS, CSRF and cookies do in a browser.

Every scenario runs a page against the real service (``thallus serve`` as a process, or an app
wrapped by :func:`thallus.protect` under uvicorn) and, as a negative control, the same page against
a deliberately misconfigured app (:mod:`tests.browser.naive`), so each check is shown to be able to
fail. Run them alone with ``pytest -m browser``; screenshots land in ``test-artifacts/browser/``.
"""
