"""Structured JSON log lines, each carrying the current correlation ID (docs/design.md §7).

:class:`CorrelationIdFilter` stamps ``record.correlation_id`` from the context variable (an
explicit ``extra={"correlation_id": …}`` wins); :class:`JsonFormatter` writes one JSON object per
line with every ``extra`` field, so log pipelines need no parsing rules. Control characters and
non-ASCII in messages are escaped by the JSON encoder, so a hostile header cannot forge lines.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

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


def json_handler(stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) with the filter and the JSON formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(CorrelationIdFilter())
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Route ``thallus`` and ``uvicorn`` loggers to one JSON handler on the root logger.

    uvicorn's own access log is silenced: the correlation layer writes the access line, with
    the correlation ID and the final status.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_thallus", False):
            root.removeHandler(handler)
    handler = json_handler(stream)
    handler._thallus = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
