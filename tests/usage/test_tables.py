"""Migration 0002 creates exactly the tables defined in ``chatgate/usage/tables.py``."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.db.tables import metadata
from chatgate.usage.tables import usage_records, usage_rollups

USAGE_TABLES = {usage_records.name, usage_rollups.name}


def _touches_usage(diff: Any) -> bool:
    """Whether an autogenerate diff entry (a tuple, or a list of them) is about our tables."""
    if isinstance(diff, list):
        return any(_touches_usage(d) for d in diff)
    for part in diff:
        name = getattr(part, "name", None) or getattr(getattr(part, "table", None), "name", None)
        if name in USAGE_TABLES or part in USAGE_TABLES:
            return True
    return False


async def test_migration_matches_the_table_definitions(engine: AsyncEngine) -> None:
    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(context, metadata) if _touches_usage(d)]

    async with engine.connect() as conn:
        assert await conn.run_sync(compare) == []
