"""Real databases for tests: a SQLite file per test, and a PostgreSQL database per test run.

PostgreSQL comes from ``THALLUS_TEST_DATABASE_URL`` (default: the machine's server, database
``test``). Each run creates its own database there and drops it at the end; tables are emptied
between tests. When no server answers, tests skip with the reason — except in CI (``CI=true``),
where a missing service fails the run.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip outside CI, fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing service fails the run)")
    pytest.skip(reason)


def postgres_url() -> URL:
    return make_url(os.environ.get("THALLUS_TEST_DATABASE_URL", DEFAULT_POSTGRES_URL))


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _execute(url: URL, *statements: str) -> list[str]:
    connection = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        results = []
        for statement in statements:
            results.append(await connection.execute(statement))
        return results
    finally:
        await connection.close()


def create_postgres_database() -> URL:
    """A fresh database of this run's own on the configured server."""
    server = postgres_url()
    name = f"thallus_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        asyncio.run(_execute(server, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {server.render_as_string(hide_password=True)} is not reachable: {exc}")
    return server.set(database=name)


def drop_postgres_database(url: URL) -> None:
    asyncio.run(_execute(postgres_url(), f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))


async def _truncate(url: URL) -> None:
    connection = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        tables = [
            row["tablename"]
            for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if row["tablename"] not in ("alembic_version", "audit_chain_head")
        ]
        if tables:
            await connection.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")
            await connection.execute("UPDATE audit_chain_head SET seq = 0, hash = $1", "0" * 64)  # the empty chain
    finally:
        await connection.close()


def empty_postgres_database(url: URL) -> None:
    asyncio.run(_truncate(url))
