"""The Django project's views: docs/frameworks/django.md shows this module, tests/frameworks/test_django.py serves it.

``/items`` is a JSON API for cookie-authenticated single-page apps: Thallus' origin check is its CSRF
protection, so it is ``csrf_exempt`` from Django's token check. ``/form`` keeps Django's token check
as a server-rendered form would (GET hands out the token, POST needs it back).
"""

import json

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods


@csrf_exempt  # Thallus checks the origin of every cookie-carrying unsafe request before Django runs
@require_http_methods(["GET", "POST"])
def items(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return JsonResponse({"created": json.loads(request.body)["name"]})
    return JsonResponse({"items": []})


@require_http_methods(["GET", "POST"])
def form(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return JsonResponse({"accepted": True})
    return JsonResponse({"csrf_token": get_token(request)})  # also sets the csrftoken cookie


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("kaboom")


urlpatterns = [path("items", items), path("form", form), path("boom", boom)]
