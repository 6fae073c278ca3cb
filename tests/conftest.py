from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.databases import BACKENDS, create_postgres_database, drop_postgres_database, empty_postgres_database
from tests.redis_support import delete_prefix, new_prefix, require_redis


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No THALLUS_* setting of the developer's shell leaks into a test (THALLUS_TEST_* service URLs stay),
    and nothing a test does lands in the developer's own data directory."""
    for name in list(os.environ):
        if name.startswith("THALLUS_") and not name.startswith("THALLUS_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[URL]:
    """This run's own PostgreSQL database (skipped with the reason outside CI when there is no server)."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each storage test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'thallus.db'}"
        return
    url: URL = request.getfixturevalue("postgres_database")
    yield url.render_as_string(hide_password=False)
    empty_postgres_database(url)


@dataclass(frozen=True)
class RedisTarget:
    url: str
    prefix: str


@pytest.fixture
def redis_target() -> Iterator[RedisTarget]:
    """The test Redis with a key prefix of this test's own (keys deleted afterwards)."""
    url = require_redis()
    target = RedisTarget(url, new_prefix())
    yield target
    delete_prefix(url, target.prefix)


@pytest.fixture
def empty_postgres(postgres_database: URL) -> Iterator[URL]:
    """This run's PostgreSQL database, emptied after the test."""
    yield postgres_database
    empty_postgres_database(postgres_database)
