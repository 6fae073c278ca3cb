"""What every benchmark prints about where it ran, and its progress lines (on stderr)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def environment(packages: Sequence[str]) -> dict[str, Any]:
    """Python, platform, CPUs and the installed versions of ``packages`` (``None`` when absent)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }


def describe(env: dict[str, Any], extra: str = "") -> list[str]:
    """The two header lines of every report: interpreter and machine, then package versions."""
    packages = ", ".join(f"{name} {version or '(not installed)'}" for name, version in env["packages"].items())
    return [
        f"Python {env['python']} ({env['implementation']}) on {env['platform']}, {env['cpus']} CPUs",
        f"packages: {packages}{extra}",
    ]


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    """A plain-text table, columns padded to their widest cell and a rule under the header;
    ``align`` has one ``l`` (left) or ``r`` (right) per column (default: the first left, the rest right)."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    sides = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        cells = [
            value.ljust(width) if side == "l" else value.rjust(width)
            for value, width, side in zip(row, widths, sides, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def redacted_url(url: str) -> str:
    """``url`` without its credentials, for a report."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
