"""The PostgreSQL pool is sized by settings (CHATGATE_DB_POOL_SIZE / _MAX_OVERFLOW)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from chatgate.db.engine import create_engine
from chatgate.settings import Settings


def test_pool_is_sized_by_settings(pg_url: str, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(tmp_path),
            "CHATGATE_DATABASE_URL": pg_url,
            "CHATGATE_DB_POOL_SIZE": "2",
            "CHATGATE_DB_MAX_OVERFLOW": "1",
        }
    )
    assert (settings.db_pool_size, settings.db_max_overflow) == (2, 1)

    async def go() -> tuple[int, int, bool]:
        engine = create_engine(settings)
        try:
            pool = engine.sync_engine.pool
            held = [await engine.connect() for _ in range(3)]  # 2 kept + 1 overflow
            for conn in held:
                await conn.execute(sa.text("select 1"))
            checked_out = pool.checkedout()  # type: ignore[attr-defined]
            # A fourth connection would wait for one of the three (pool exhausted): time out.
            engine.sync_engine.pool._timeout = 0.2  # type: ignore[attr-defined]
            try:
                await engine.connect()
                exhausted = False
            except sa.exc.TimeoutError:
                exhausted = True
            for conn in held:
                await conn.close()
            return pool.size(), checked_out, exhausted  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    size, checked_out, exhausted = asyncio.run(go())
    assert size == 2 and checked_out == 3 and exhausted
