"""Quart behind Thallus: docs/frameworks/quart.md shows this module, tests/frameworks/test_quart.py serves it."""

from typing import Any

from quart import Quart, abort, request

from thallus import Settings, protect
from thallus.integrations.quart import install_error_handlers

api = Quart(__name__)
install_error_handlers(api)  # keeps abort()'s messages and ThallusError's statuses


@api.get("/items")
async def list_items() -> dict[str, Any]:
    return {"items": []}


@api.post("/items")
async def create_item() -> dict[str, Any]:
    item = await request.get_json()
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        abort(400, "The body must be a JSON object with a string 'name'.")
    return {"created": item["name"]}


@api.get("/items/<int:item_id>")
async def get_item(item_id: int) -> dict[str, Any]:
    abort(404, f"No item {item_id}.")


@api.get("/boom")
async def boom() -> dict[str, Any]:
    raise RuntimeError("kaboom")


app = protect(api, Settings.load())  # THALLUS_* variables; serve `app`
