"""The Django project's settings: docs/frameworks/django.md shows this module, tests/frameworks/test_django.py serves it.

A real project's defaults (DEBUG off, the CSRF middleware on), plus the lines that make Django's
CSRF check agree with Thallus': the same trusted origins, and refusals in the §8 shape.
"""

import os

from thallus import Settings

THALLUS = Settings.load()  # THALLUS_* variables; asgi.py protects the application with these

SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.frameworks.apps.django_urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
CSRF_TRUSTED_ORIGINS = list(THALLUS.trusted_origins)  # Django's Origin check trusts what Thallus trusts
CSRF_FAILURE_VIEW = "thallus.integrations.django.csrf_failure"  # its refusals: 403 CSRFError with the reason
# Django logs a view's crash on django.request (the error boundary only sees the 500 page it answers
# with): as JSON lines carrying the correlation ID the client got in the §8 body.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"correlation_id": {"()": "thallus.logs.CorrelationIdFilter"}},
    "formatters": {"json": {"()": "thallus.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "filters": ["correlation_id"], "formatter": "json"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False}},
}
