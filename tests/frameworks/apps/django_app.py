"""The Django project's ASGI entry point (its asgi.py): docs/frameworks/django.md shows this module, tests/frameworks/test_django.py serves it."""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

from thallus import protect

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.frameworks.apps.django_settings")

application = protect(get_asgi_application(), settings.THALLUS)  # serve `application`
