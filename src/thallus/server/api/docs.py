"""``/docs`` (Swagger UI) and ``/openapi.json`` under a CSP of their own, without loosening the service's.

The Swagger UI assets are served from the installed package (``fastapi-offline`` ships them), so no
CDN is needed; the page's one inline script carries a per-response nonce. Only this page gets the
extra ``img-src data:`` (Swagger's icons) and the nonce — every other response keeps the baseline.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from thallus.errors import NotFoundError
from thallus.headers import CSP_HEADER, csp_nonce, override_header

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; "
    "form-action 'self'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} — API documentation</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script nonce="{nonce}">
window.ui = SwaggerUIBundle({{
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  persistAuthorization: false
}});
</script>
</body>
</html>
"""


def _asset(name: str) -> bytes:
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


def mount_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/docs/assets/{name}`` and ``/openapi.json`` to ``app``."""
    assets = {name: _asset(name) for name in ASSETS}  # read once, at start-up

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        document: dict[str, Any] = app.openapi()
        return JSONResponse(document)

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        nonce = csp_nonce(request.scope)
        override_header(request.scope, CSP_HEADER.decode(), DOCS_CSP.format(nonce=nonce))
        return HTMLResponse(_PAGE.format(title=app.title, nonce=nonce))

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in assets:
            raise NotFoundError("No such documentation asset.")
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
