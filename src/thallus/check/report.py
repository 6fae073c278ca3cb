"""The report: a Rich table grouped by layer, or one JSON document for CI.

Reasons can quote what the target sent, so the table shows them as plain text (never Rich markup)
with non-printable characters escaped. Rich (the ``check`` extra) is imported only to draw.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import TYPE_CHECKING

from thallus.check import grading
from thallus.check.model import Result, Status, Target

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

STYLES = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def printable(text: str) -> str:
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


def to_json(target: Target, results: list[Result]) -> str:
    """``{"target", "grade", "results": [{"layer", "check", "status", "reason"}]}``."""
    document = {
        "target": target.url,
        "grade": grading.grade(grading.score(results)),
        "results": [result.as_json() for result in results],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def table(results: list[Result]) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    grid.add_column("Layer", style="bold")
    grid.add_column("Check")
    grid.add_column("Status")
    grid.add_column("Reason", overflow="fold")
    for index, (layer, rows) in enumerate(groupby(results, key=lambda result: result.layer)):
        if index:
            grid.add_section()
        for position, row in enumerate(rows):
            status = Text(row.status.value, style=STYLES[row.status])
            grid.add_row(Text(layer if position == 0 else ""), Text(row.check), status, Text(printable(row.reason)))
    return grid


def render(console: Console, target: Target, results: list[Result], requests: int) -> None:
    from rich.text import Text

    points = grading.score(results)
    counts = {status: sum(result.status is status for result in results) for status in Status}
    console.print(Text(f"thallus check {target.url}  ({target.env} profile, {requests} requests)", style="bold"))
    console.print(table(results))
    summary = Text(f"Grade {grading.grade(points)} ({points}/100): ", style="bold")
    summary.append(", ".join(f"{counts[status]} {status.value}" for status in (Status.FAIL, Status.WARN, Status.PASS)))
    console.print(summary)
    if not target.csrf_probed:
        console.print(Text("CSRF not probed: it needs --cookie NAME=VALUE and --csrf-endpoint PATH.", style="dim"))
