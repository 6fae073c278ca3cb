"""The letter grade (docs/check.md, "Grade"): 100 points, less 5 a WARN, 20 a FAIL, 40 a critical FAIL.

A critical FAIL is one a cross-site attacker can use at once: an origin granted by reflection with
credentials, ``*`` with credentials, a forged cookie request accepted, a header injected through
the correlation ID. The bands: A+ 100, A 90–99, B 80–89, C 70–79, D 60–69, F below 60 — so a single
FAIL caps the grade at B, a critical one at D.
"""

from __future__ import annotations

from collections.abc import Iterable

from thallus.check.model import Result, Status

WARN_PENALTY = 5
FAIL_PENALTY = 20
CRITICAL_PENALTY = 40
BANDS = ((100, "A+"), (90, "A"), (80, "B"), (70, "C"), (60, "D"), (0, "F"))


def penalty(result: Result) -> int:
    if result.status is Status.FAIL:
        return CRITICAL_PENALTY if result.critical else FAIL_PENALTY
    return WARN_PENALTY if result.status is Status.WARN else 0


def score(results: Iterable[Result]) -> int:
    return max(0, 100 - sum(penalty(result) for result in results))


def grade(points: int) -> str:
    return next(letter for floor, letter in BANDS if points >= floor)
