"""Persistence: SQLAlchemy 2 (async) models, engines for SQLite and PostgreSQL, Alembic migrations."""

from thallus.server.storage.database import Database, DatabaseUnavailableError

__all__ = ["Database", "DatabaseUnavailableError"]
