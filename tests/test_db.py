"""The database engine: the pool sized by settings, and migrations skipped when already at head."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import requests
import sqlalchemy as sa

from chatgate.db.engine import create_engine, head_revision, migrate, schema
from chatgate.settings import Settings
from tests.helpers import create_pg_database, drop_pg_database, make_gateway
from tests.usage.pgserver import PgServer


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


def test_migrate_knows_the_head_without_alembic(own_database: dict[str, str]) -> None:
    """``schema`` reads the newest revision from the migration files; a database behind it (a
    new one, or one a migration short) is upgraded by Alembic, one at the head is left alone.
    On a database of its own: taken down to nothing under the session's gateways, the shared
    one lost their keys, and its invalidation feed started over below what they had read."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from chatgate.db.engine import _alembic_config

    settings = Settings.from_env(own_database)

    async def go() -> list[bool]:
        engine = create_engine(settings)
        seen = []
        try:
            async with engine.begin() as conn:  # start from an empty database
                await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "base"))
            seen.append((await schema(engine)).state == "current")
            await migrate(engine)
            seen.append((await schema(engine)).state == "current")
            async with engine.begin() as conn:  # one migration short of the head
                await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "-1"))
            seen.append((await schema(engine)).state == "current")
            await migrate(engine)
            seen.append((await schema(engine)).state == "current")
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            seen.append("usage_records" in names and "api_keys" in names)
        finally:
            await engine.dispose()
        return seen

    async def head_by_alembic() -> str | None:
        engine = create_engine(settings)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: ScriptDirectory.from_config(_alembic_config(c)).get_current_head()
                )
        finally:
            await engine.dispose()

    assert head_revision() == asyncio.run(head_by_alembic())
    assert asyncio.run(go()) == [False, True, False, True, True]


def test_a_database_with_accounts_and_keys_downgrades(tmp_path: Path) -> None:
    """Each migration's downgrade runs on a database in use (SQLite refuses to drop a table
    that rows refer to, which copying ``accounts`` to drop a column would do)."""
    from alembic import command

    from chatgate.accounts import AccountStore
    from chatgate.db.engine import _alembic_config
    from chatgate.keys.store import KeyStore

    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path)})

    async def go() -> list[str]:
        engine = create_engine(settings)
        try:
            await migrate(engine)
            account = await AccountStore(engine).create("in-use@example.com")
            await KeyStore(engine, settings.resolved_secret()).create(account.id)
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "base"))
            async with engine.connect() as conn:
                return list(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    assert set(asyncio.run(go())) <= {"alembic_version"}


def test_schema_tells_behind_current_and_ahead(tmp_path: Path) -> None:
    """What ``serve --no-migrate`` and ``/readyz`` go by: a database with no chatgate tables or
    an older migration is behind; one a newer chatgate migrated (a revision these files do
    not know) is ahead, and usable by this one while it rolls out."""
    from alembic import command

    from chatgate.db.engine import _alembic_config

    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path)})

    async def go() -> list[tuple[str, str | None]]:
        engine = create_engine(settings)
        seen = []
        try:
            seen.append((await schema(engine))[:2])
            await migrate(engine)
            seen.append((await schema(engine))[:2])
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "-1"))
            seen.append((await schema(engine))[:2])
            async with engine.begin() as conn:
                await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9001'"))
            seen.append((await schema(engine))[:2])
            await migrate(engine)  # an older node's start: left alone (Alembic would refuse it)
            seen.append((await schema(engine))[:2])
        finally:
            await engine.dispose()
        return seen

    head = head_revision()
    empty, current, older, newer, kept = asyncio.run(go())
    assert (empty, current, newer) == (("behind", None), ("current", head), ("ahead", "9001"))
    assert kept == newer
    assert older[0] == "behind" and older[1] not in (None, head)


def test_a_sqlite_migration_that_fails_midway_leaves_the_database_as_it_was(
    tmp_path: Path,
) -> None:
    """QA: a migrate killed midway on SQLite kept the DDL it had run (the driver committed it
    statement by statement) with the old version, and every later migrate and serve failed on
    it for good ("duplicate column name"). A revision is one transaction now: here 0011's
    second statement fails (its column is there already) after its first has run."""
    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path)})

    async def columns(engine: sa.ext.asyncio.AsyncEngine, table: str) -> set[str]:
        async with engine.connect() as conn:
            rows = await conn.exec_driver_sql(f"PRAGMA table_info({table})")
            return {row[1] for row in rows}

    async def go() -> None:
        engine = create_engine(settings)
        try:
            await migrate(engine, "0010")
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    "ALTER TABLE usage_rollups ADD COLUMN cached_tokens BIGINT DEFAULT 0 NOT NULL"
                )
            try:
                await migrate(engine)
            except sa.exc.OperationalError as exc:
                assert "duplicate column name: cached_tokens" in str(exc)
            else:
                raise AssertionError("the migration did not fail")
            assert (await schema(engine))[:2] == ("behind", "0010")
            assert "cached_tokens" not in await columns(engine, "usage_records")  # rolled back
            async with engine.begin() as conn:
                await conn.exec_driver_sql("ALTER TABLE usage_rollups DROP COLUMN cached_tokens")
            await migrate(engine)  # the next migrate finishes the job
            assert (await schema(engine))[:2] == ("current", head_revision())
            assert "cached_tokens" in await columns(engine, "usage_records")
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_two_sqlite_migrates_at_once_both_succeed(tmp_path: Path) -> None:
    """QA: one of two migrates started together on an old SQLite database failed ("duplicate
    column name"): each read the version, then both ran the DDL. The first now takes the write
    lock before it reads; the second waits for it and finds the database at its head."""
    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path)})

    async def go() -> None:
        first = create_engine(settings)
        try:
            await migrate(first, "0004")
        finally:
            await first.dispose()
        engines = [create_engine(settings) for _ in range(3)]
        try:
            await asyncio.gather(*(migrate(e) for e in engines))
            assert (await schema(engines[0]))[:2] == ("current", head_revision())
        finally:
            for engine in engines:
                await engine.dispose()

    asyncio.run(go())


def test_migration_0009_fills_in_what_the_seed_reads(own_database: dict[str, str]) -> None:
    """Usage recorded before ``admitted`` existed: the hourly rollups of the last two days (what
    a restart seeds the daily limits from) read as the seed read them before (taken unless a
    429); older rollups, other widths and raw rows are not rewritten (a large install's
    migration stays quick): the rollups count from 0, a raw row's flag is not known. On both
    databases."""
    from alembic import command

    from chatgate.db.engine import _alembic_config
    from chatgate.usage.tables import usage_records, usage_rollups

    settings = Settings.from_env(own_database)
    hour = int(time.time()) // 3600 * 3600
    record = {
        "request_id": "req_old",
        "created_at": hour,
        "account_id": "acct_old",
        "key_id": "key_old",
        "model": "m",
        "backend": "b",
        "endpoint": "chat.completions",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cost_nanousd": 0,
        "latency_ms": 1.0,
        "status": 200,
        "streamed": False,
    }
    rollup = {
        "account_id": "acct_old",
        "key_id": "key_old",
        "model": "m",
        "endpoint": "chat.completions",
        "requests": 7,
        "prompt_tokens": 7,
        "completion_tokens": 7,
        "cost_nanousd": 0,
        "errors": 3,
        "rate_limited": 2,
    }
    buckets = [(3600, hour - 3600), (3600, hour - 3 * 86400), (60, hour)]

    def insert(table: str, values: dict[str, object]) -> sa.Insert:
        return sa.insert(sa.table(table, *map(sa.column, values))).values(values)

    async def go() -> tuple[list[object], dict[tuple[int, int], int]]:
        engine = create_engine(settings)
        try:
            await migrate(engine)
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "0008"))
                await conn.execute(insert("usage_records", record))
                for width, start in buckets:
                    values = {**rollup, "width": width, "bucket_start": start}
                    await conn.execute(insert("usage_rollups", values))
            await migrate(engine)
            async with engine.connect() as conn:
                raw = await conn.execute(sa.select(usage_records.c.admitted))
                t = usage_rollups
                rolled = await conn.execute(sa.select(t.c.width, t.c.bucket_start, t.c.admitted))
                return [a for (a,) in raw], {(w, b): int(n) for w, b, n in rolled}
        finally:
            await engine.dispose()

    raw, rolled = asyncio.run(go())
    assert raw == [None]
    assert rolled == {buckets[0]: 5, buckets[1]: 0, buckets[2]: 0}


def test_nodes_migrating_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Nodes started together on a new PostgreSQL database each ran the migrations at once;
    all but one died on the catalog's unique index (CREATE TYPE, CREATE TABLE). Now they take
    turns under an advisory lock, and those after the first find nothing to do, and say so
    (QA: two migrates at once both printed that they had migrated it)."""
    pg_url = create_pg_database()
    settings = Settings.from_env(
        {"CHATGATE_DATA_DIR": str(tmp_path), "CHATGATE_DATABASE_URL": pg_url}
    )

    async def go() -> list[BaseException | str | None]:
        engines = [create_engine(settings) for _ in range(4)]
        try:
            return await asyncio.gather(*(migrate(e) for e in engines), return_exceptions=True)
        finally:
            for engine in engines:
                await engine.dispose()

    try:
        assert sorted(asyncio.run(go()), key=str) == ["", None, None, None]  # "": from empty
        _assert_current(settings)
    finally:
        drop_pg_database(pg_url)


def _assert_current(settings: Settings) -> None:
    async def state() -> str:
        engine = create_engine(settings)
        try:
            return (await schema(engine)).state
        finally:
            await engine.dispose()

    assert asyncio.run(state()) == "current"


def test_a_new_data_dir_and_sqlite_database_are_the_owners_only(tmp_path: Path) -> None:
    """The SQLite file (conversations, password and key hashes) and its -wal/-shm were made
    0644 in a 0755 folder by the umask, readable by any local user; only the secret was
    0600. Now a new data dir is 0700 and a new database 0600; the spool's folder too."""
    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path / "data")})

    async def go() -> None:
        engine = create_engine(settings)
        try:
            await migrate(engine)
            async with engine.begin() as conn:  # a write: the -wal and -shm files exist
                await conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
                await conn.execute(sa.text("INSERT INTO probe VALUES (1)"))
            modes = {p.name: p.stat().st_mode & 0o777 for p in settings.data_dir.iterdir()}
            assert modes["chatgate.db-wal"] == modes["chatgate.db-shm"] == 0o600
        finally:
            await engine.dispose()

    asyncio.run(go())
    settings.resolved_secret()
    modes = {p.name: p.stat().st_mode & 0o777 for p in settings.data_dir.iterdir()}
    assert modes["chatgate.db"] == modes["secret"] == 0o600
    assert settings.data_dir.stat().st_mode & 0o777 == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def test_management_answers_503_while_postgresql_is_down_or_frozen(
    own_pg: PgServer, tmp_path: Path
) -> None:
    """QA: with PostgreSQL stopped, /api routes answered 500 with a traceback logged each
    time; with it frozen (connections open, no answer) they did not answer at all (100 s and
    counting). Now a 503 ``service_unavailable`` with a retry hint, within the command timeout
    (CHATGATE_DB_COMMAND_TIMEOUT) for a frozen one, and answers again once it is back."""
    gw = make_gateway(
        tmp_path,
        database_url=own_pg.url,
        extra_env={"CHATGATE_DB_COMMAND_TIMEOUT": "1", "CHATGATE_DB_CONNECT_TIMEOUT": "2"},
    ).start()
    try:
        key = next(
            line.split("=", 1)[1].strip()
            for line in gw.logs().splitlines()
            if "CHATGATE_API_KEY=" in line
        )
        headers = {"Authorization": f"Bearer {key}"}

        def keys() -> requests.Response:
            return requests.get(gw.url + "/api/keys", headers=headers, timeout=30)

        assert keys().status_code == 200
        for outage, back in ((own_pg.stop, own_pg.start), (own_pg.freeze, own_pg.thaw)):
            outage()
            try:
                refused = keys()  # (the client's 30 s timeout ended the frozen case before)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "service_unavailable"
                assert refused.headers["retry-after"] == "5"
            finally:
                back()
            deadline = time.monotonic() + 30
            while keys().status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert "unhandled error" not in gw.logs()  # (the feed logs its own outage once)
    finally:
        gw.stop()


def test_a_new_data_dir_is_the_owners_only_on_postgresql_too(pg_url: str, tmp_path: Path) -> None:
    """With PostgreSQL the data dir was first made by the usage spool's folder, its parent
    made as the umask says (0755), not 0700 as SECURITY.md says (found by QA)."""
    gw = make_gateway(tmp_path, database_url=pg_url).start()
    try:
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    finally:
        gw.stop()
