"""Alembic environment: migrations run only through ``Database.migrate`` on a given connection."""

from alembic import context

from thallus.server.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `thallus db upgrade` or Database.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
