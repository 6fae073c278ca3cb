"""Starlette behind Thallus: docs/frameworks/starlette.md shows this module, tests/frameworks/test_starlette.py serves it."""

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from thallus import Settings, protect


async def items(request: Request) -> JSONResponse:
    if request.method == "POST":
        item = await request.json()
        return JSONResponse({"created": item["name"]})
    return JSONResponse({"items": []})


async def get_item(request: Request) -> JSONResponse:
    raise HTTPException(404, f"No item {request.path_params['item_id']}.")


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("kaboom")


api = Starlette(
    routes=[
        Route("/items", items, methods=["GET", "POST"]),
        Route("/items/{item_id:int}", get_item),
        Route("/boom", boom),
    ]
)

app = protect(api, Settings.load())  # THALLUS_* variables; serve `app`
