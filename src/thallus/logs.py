"""Log lines carrying the current correlation ID (docs/design.md §7), for the service and for
library users alike.

:class:`CorrelationIdFilter` stamps ``record.correlation_id`` from the context variable (an
explicit ``extra={"correlation_id": …}`` wins) — add it to handlers of your own;
:class:`JsonFormatter` writes one JSON object per line with every ``extra`` field, so log pipelines
need no parsing rules. Control characters and non-ASCII in messages are escaped by the JSON
encoder, so a hostile header cannot forge lines; :class:`TextFormatter` is the readable form for
a terminal, escaping them too. :func:`configure_logging` sets either up in one call. Importing
Thallus configures nothing: the layers only log through their ``thallus.*`` loggers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from thallus.correlation import correlation_id_var

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured duplicate of the message
}


class CorrelationIdFilter(logging.Filter):
    """Adds ``correlation_id`` to every record (``None`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "correlation_id", None) is None:
            record.correlation_id = correlation_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "correlation_id", …extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``12:00:00.123 INFO  thallus.csrf [<correlation id>] message key=value…`` for a terminal;
    the message and the values are escaped like :func:`repr` does, so one record stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        correlation = getattr(record, "correlation_id", None) or "-"
        message = _one_line(record.getMessage())
        extras = " ".join(
            f"{key}={_one_line(str(value))}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRIBUTES and key != "correlation_id"
        )
        line = f"{moment} {record.levelname:<5} {record.name} [{correlation}] {message}"
        if extras:
            line += " " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _one_line(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def json_handler(stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) with the filter and the JSON formatter."""
    return _handler(JsonFormatter(), stream)


def _handler(formatter: logging.Formatter, stream: Any) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(formatter)
    return handler


def configure_logging(level: str = "INFO", stream: Any = None, *, output: Literal["json", "text"] = "json") -> None:
    """One handler on the root logger (stderr by default): JSON lines carrying ``correlation_id``,
    or ``output="text"`` for reading in a terminal during development.

    Calling it again replaces the handler it added, not yours. uvicorn's loggers go to the same
    handler and its own access log is silenced: the correlation layer writes the access line, with
    the correlation ID and the final status.
    """
    if output not in ("json", "text"):
        raise ValueError(f"output must be 'json' or 'text', not {output!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_thallus", False):
            root.removeHandler(handler)
    handler = _handler(JsonFormatter() if output == "json" else TextFormatter(), stream)
    handler._thallus = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
