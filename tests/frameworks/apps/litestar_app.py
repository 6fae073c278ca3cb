"""Litestar behind Thallus: docs/frameworks/litestar.md shows this module, tests/frameworks/test_litestar.py serves it."""

from dataclasses import dataclass

from litestar import Litestar, get, post
from litestar.exceptions import NotFoundException

from thallus import Settings, protect
from thallus.integrations.litestar import exception_handlers


@dataclass
class Item:
    name: str


@get("/items")
async def list_items() -> dict[str, list[str]]:
    return {"items": []}


@post("/items", status_code=200)
async def create_item(data: Item) -> dict[str, str]:
    return {"created": data.name}


@get("/items/{item_id:int}")
async def get_item(item_id: int) -> dict[str, str]:
    raise NotFoundException(f"No item {item_id}.")


@get("/boom")
async def boom() -> None:
    raise RuntimeError("kaboom")


settings = Settings.load()  # THALLUS_* variables
api = Litestar([list_items, create_item, get_item, boom], exception_handlers=exception_handlers(settings))
app = protect(api, settings)  # serve `app`
