"""Logging for library users: nothing configured on import, ``configure_logging()`` in one call
(JSON lines or readable text, each with the correlation ID), and a filter for handlers of one's own."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.asgi import call
from thallus import CorrelationIdFilter, Settings, configure_logging, protect
from thallus._asgi import Receive, Scope, Send

app_logger = logging.getLogger("tests.app")


async def logging_app(scope: Scope, receive: Receive, send: Send) -> None:
    app_logger.info("handling\nforged line", extra={"item": 7})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_importing_thallus_configures_no_logging() -> None:
    script = (
        "import logging\n"
        "root = logging.getLogger()\n"
        "before = (list(root.handlers), root.level)\n"
        "import thallus, thallus.stack, thallus.logs\n"
        "thallus.protect(lambda s, r, q: None, thallus.Settings())\n"
        "assert (list(root.handlers), root.level) == before, (root.handlers, root.level)\n"
        "assert all(not logging.getLogger(n).handlers for n in logging.root.manager.loggerDict if n.startswith('thallus'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={"THALLUS_ENV_FILE": ""})


def test_json_lines_carry_the_correlation_id(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    response = call(protect(logging_app, Settings(rate_limit_enabled=False)), "GET", "/items")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    handled = next(line for line in lines if line["logger"] == "tests.app")
    assert handled["correlation_id"] == response.header("x-correlation-id")
    assert handled["message"] == "handling\nforged line"  # escaped by the encoder: still one line
    assert handled["item"] == 7
    assert len(stream.getvalue().splitlines()) == len(lines)


def test_text_output_is_one_readable_line_per_record(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream, output="text")
    response = call(protect(logging_app, Settings(rate_limit_enabled=False)), "GET", "/items")
    [handled] = [line for line in stream.getvalue().splitlines() if " tests.app " in line]
    assert f"[{response.header('x-correlation-id')}]" in handled
    assert "handling\\nforged line" in handled
    assert handled.endswith("item=7")


def test_configuring_again_replaces_only_its_own_handler(restore_root: None) -> None:
    mine = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(mine)
    configure_logging("INFO", io.StringIO())
    configure_logging("INFO", io.StringIO())
    ours = [handler for handler in logging.getLogger().handlers if getattr(handler, "_thallus", False)]
    assert len(ours) == 1
    assert mine in logging.getLogger().handlers
    with pytest.raises(ValueError, match="output"):
        configure_logging("INFO", output="xml")  # type: ignore[arg-type]


def test_the_filter_stamps_records_of_a_users_own_handler() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(logging.Formatter("%(correlation_id)s %(message)s"))
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    try:
        response = call(protect(logging_app, Settings(rate_limit_enabled=False)), "GET", "/items")
    finally:
        app_logger.removeHandler(handler)
    assert stream.getvalue().startswith(f"{response.header('x-correlation-id')} handling")
