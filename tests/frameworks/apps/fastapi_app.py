"""FastAPI behind Thallus: docs/frameworks/fastapi.md shows this module, tests/frameworks/test_fastapi.py serves it."""

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from thallus import Settings, protect

api = FastAPI()


class Item(BaseModel):
    name: str


@api.get("/items")
async def list_items() -> dict[str, list[str]]:
    return {"items": []}


@api.post("/items")
async def create_item(item: Item) -> dict[str, str]:
    return {"created": item.name}


@api.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, str]:
    raise HTTPException(404, f"No item {item_id}.")


@api.get("/boom")
async def boom() -> None:
    raise RuntimeError("kaboom")


app = protect(api, Settings.load())  # THALLUS_* variables; serve `app`
