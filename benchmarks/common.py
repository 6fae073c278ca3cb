"""What every benchmark prints about where it ran, its progress lines (on stderr), and how a
benchmark's run ends (its report, its JSON, its exit status)."""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: the repository (the benchmarks live in its ``benchmarks/``)
ROOT = Path(__file__).resolve().parent.parent
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class BenchmarkError(Exception):
    """A set-up step or check that failed: reported in one message, the servers stopped, exit 1."""


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


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers are stopped and their data directories removed."""
    raise KeyboardInterrupt


def conclude(
    name: str,
    run: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    *,
    json_path: Path | None = None,
    print_json: bool = False,
    invalid: Callable[[dict[str, Any]], bool] | None = None,
    stopped: str = "server stopped",
) -> None:
    """A benchmark's ``main`` once its options are parsed: ``run`` (SIGTERM unwinds it like Ctrl-C:
    exit 130; a :class:`BenchmarkError` is one message on stderr: exit 1), every raw figure written
    to ``json_path`` if given, then the report (``render``, or the figures as JSON with
    ``print_json``) on stdout; exit 1 if ``invalid`` says the figures must not be trusted."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        document = run()
    except BenchmarkError as exc:
        progress(f"{name}: {exc}")
        raise SystemExit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        progress(f"{name}: interrupted; {stopped}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    if json_path is not None:
        json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        progress(f"raw figures written to {json_path}")
    print(json.dumps(document, indent=2, default=str) if print_json else render(document))
    if invalid is not None and invalid(document):
        raise SystemExit(EXIT_FAILED)
