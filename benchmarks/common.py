"""What every benchmark prints about where it ran, and its progress lines (on stderr)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any


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
