"""Fixtures for the usage tests: a migrated engine on each database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.db.engine import create_engine, migrate
from tests.usage.factory import settings_for


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated engine on the session's database (SQLite or PostgreSQL)."""
    eng = create_engine(settings_for(database_url, tmp_path / "data"))
    await migrate(eng)
    yield eng
    await eng.dispose()
