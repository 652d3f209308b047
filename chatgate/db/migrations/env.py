"""Alembic environment: runs on the connection handed over by ``chatgate.db.engine.migrate``."""

from __future__ import annotations

from alembic import context

import chatgate.sessions.tables
import chatgate.usage.tables  # noqa: F401 - registers their tables on the metadata
from chatgate.db.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
