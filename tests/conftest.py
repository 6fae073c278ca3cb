from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.databases import BACKENDS, create_postgres_database, drop_postgres_database, empty_postgres_database
from tests.leaks import leaking_lines
from tests.redis_support import delete_prefix, new_prefix, require_redis
from thallus.logs import JsonFormatter


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No THALLUS_* setting of the developer's shell leaks into a test (THALLUS_TEST_* service URLs stay),
    and nothing a test does lands in the developer's own data directory."""
    for name in list(os.environ):
        if name.startswith("THALLUS_") and not name.startswith("THALLUS_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("THALLUS_ENV_FILE", "")  # nor a .env file of the working directory


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


class _LogRecorder(logging.Handler):
    """Every record the suite's own processes log, formatted as the service's JSON lines (extras too)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not a leak; never fail logging
            self.lines.append(record.getMessage())


@pytest.fixture(scope="session", autouse=True)
def _no_secret_in_any_log_line() -> Iterator[None]:
    """A test scans every log line the suite writes in process for the secrets it used (the
    passwords, tokens and keys of tests/service.py) and for anything shaped like a hash, key or token;
    served processes are scanned by tests.server.running_server."""
    recorder = _LogRecorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        yield
    finally:
        root.removeHandler(recorder)
    from tests.service import SECRETS_USED

    leaks = leaking_lines(recorder.lines, SECRETS_USED)
    assert not leaks, f"{len(leaks)} log lines carry a secret, e.g. {leaks[:3]}"
