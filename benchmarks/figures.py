"""The figures the benchmarks report over their samples and rounds, and how they are printed:
nearest-rank percentiles, medians, the spread (min, median, max) of a figure over the rounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence

from common import text_table

#: a figure's spread over the rounds (:func:`spread_of`): min, median, max and how many rounds had it
Spread = dict[str, float | int]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below it (of
    100 values, p99 is the 99th smallest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spread_of(values: Sequence[float | None]) -> Spread | None:
    """Min, median and max of the rounds that have the figure, and their number (``None``: none has it)."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return {"min": min(present), "median": statistics.median(present), "max": max(present), "n": len(present)}


def number(value: float | None, form: str = ",.1f") -> str:
    return "-" if value is None else format(value, form)


def ms(value: float | None) -> str:
    """A duration in ms for a progress line: whole from 100 ms, to a tenth below."""
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def spread_table(
    spread: Mapping[str, Spread | None], form: Callable[[str, Spread], str] = lambda name, values: ",.1f"
) -> list[str]:
    """The report's last table: every figure's spread over the rounds (:func:`spread_of`), each
    printed in the ``form`` given for its name and values, preceded by a blank line and its title."""
    rows = []
    for name, values in spread.items():
        if values is None:
            rows.append((name, "-", "-", "-", "0"))
            continue
        low, middle, high = (number(values[key], form(name, values)) for key in ("min", "median", "max"))
        rows.append((name, low, middle, high, str(values["n"])))
    return [
        "",
        "Spread over the rounds (min, median, max)",
        *text_table(("figure", "min", "median", "max", "rounds"), rows),
    ]
