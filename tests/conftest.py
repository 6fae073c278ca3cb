from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No THALLUS_* setting of the developer's shell leaks into a test (THALLUS_TEST_* service URLs stay)."""
    for name in list(os.environ):
        if name.startswith("THALLUS_") and not name.startswith("THALLUS_TEST_"):
            monkeypatch.delenv(name)
