"""A framework's tests need that framework (the ``dev`` extra). Without it a module is skipped with the
reason — except in CI (``CI=true``), where the missing framework fails the run, as a missing service
does in the rest of the suite."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

#: Test module → the distribution it needs beyond the core dependencies.
NEEDS = {"test_litestar.py": "litestar", "test_quart.py": "quart", "test_django.py": "django"}


class _MissingFramework(pytest.Module):
    """Collected in place of a module whose framework is not installed: reported as one skip."""

    framework = ""

    def collect(self) -> Iterable[Any]:
        pytest.skip(f"{self.framework} is not installed (pip install -e '.[dev]')", allow_module_level=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    framework = NEEDS.get(module_path.name)
    if framework is None or importlib.util.find_spec(framework) is not None or os.environ.get("CI") == "true":
        return None
    module = _MissingFramework.from_parent(parent, path=module_path)
    module.framework = framework
    return module
