"""docs/frameworks/ shows the code the tests serve: each ``<!-- file: PATH -->`` marker is followed by a
Python block equal to that file (its module docstring aside), every app module is shown on a page,
and the index links every page."""

from __future__ import annotations

import ast
import re

import pytest

from tests.frameworks.support import ROOT

DOCS = ROOT / "docs" / "frameworks"
APPS = ROOT / "tests" / "frameworks" / "apps"
PAGES = ["fastapi", "starlette", "litestar", "django", "quart", "asgi"]
SHOWN = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n+```python\n(?P<code>.*?)```", re.S)


def without_docstring(source: str) -> str:
    """``source`` from its first statement after the module docstring on."""
    module = ast.parse(source)
    if module.body and isinstance(module.body[0], ast.Expr) and isinstance(module.body[0].value, ast.Constant):
        rest = source.splitlines(keepends=True)[module.body[0].end_lineno or 0 :]
        return "".join(rest).lstrip("\n")
    return source


def shown_files() -> dict[str, str]:
    shown: dict[str, str] = {}
    for page in DOCS.glob("*.md"):
        for match in SHOWN.finditer(page.read_text(encoding="utf-8")):
            shown[match["path"]] = match["code"]
    return shown


@pytest.mark.parametrize("path", sorted(shown_files()))
def test_shown_code_is_the_served_code(path: str) -> None:
    source = (ROOT / path).read_text(encoding="utf-8")
    assert shown_files()[path] == without_docstring(source), f"docs/frameworks shows an old {path}"


def test_every_app_module_is_shown() -> None:
    modules = {f"tests/frameworks/apps/{module.name}" for module in APPS.glob("*.py") if module.name != "__init__.py"}
    assert modules <= set(shown_files())


@pytest.mark.parametrize("page", PAGES)
def test_index_links_every_page(page: str) -> None:
    assert (DOCS / f"{page}.md").is_file()
    assert f"]({page}.md)" in (DOCS / "README.md").read_text(encoding="utf-8")
