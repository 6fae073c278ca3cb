"""The benchmarks still run: ``./run bench``'s entry point loads, and bench_core's requests are
answered as it expects (its pre-flight check fails the run on a wrong status or a missing header).

Benchmarks report; they never gate on a duration, and neither does this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_entry_point_loads_every_part() -> None:
    result = run("-m", "benchmarks", "--help")
    assert result.returncode == 0, result.stderr
    assert "--parts" in result.stdout


def test_bench_core_runs_and_checks_its_requests() -> None:
    result = run(
        "benchmarks/bench_core.py",
        *("--seconds", "0.02", "--repeat", "1", "--warmup", "0", "--no-scaling", "--no-breakdown", "--json"),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    scenarios = {row["scenario"]: row for row in document["results"]}
    assert set(scenarios) == {
        "get",
        "get_cors",
        "get_refused",
        "preflight",
        "post_csrf",
        "post_api_key",
        "not_found",
    }
    assert scenarios["preflight"]["thallus"]["status"] == 204
    assert {row["scenario"] for row in document["layers"]} == {"get", "get_cors", "post_csrf", "not_found"}
