"""Engine creation and migrations. SQLite runs in WAL mode so the CLI and a server share it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from chatgate.errors import first_line
from chatgate.settings import Settings

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # Alembic is imported only to migrate: most runs find the schema current
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def create_engine(settings: Settings, *, command_timeout: float | None = None) -> AsyncEngine:
    """An async engine for ``settings.effective_database_url``; PostgreSQL pools are sized by
    ``db_pool_size`` + ``db_max_overflow`` (SQLite uses SQLAlchemy's own pool), and each
    statement ends after ``command_timeout`` seconds if given (the server's engine: not the
    one that migrates, whose statements may rewrite a big table)."""
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        settings.make_data_dir()
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _own_file(engine.url.database)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if not url.startswith("postgresql+asyncpg://"):
        # Any other database failed deep in SQLAlchemy (a traceback naming a missing driver);
        # the scheme alone is named: the rest of the URL may hold a password.
        raise ValueError(
            "CHATGATE_DATABASE_URL must be a postgresql:// or sqlite:/// URL, not "
            f"{url.partition(':')[0]}:"
        )
    timeout = settings.db_connect_timeout
    engine = create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        connect_args={"timeout": timeout, "command_timeout": command_timeout},
    )
    where = f"{engine.url.host or 'localhost'}:{engine.url.port or 5432}"

    def connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        # asyncpg's timeout is a bare TimeoutError, whose message is empty: say what waited.
        try:
            return dialect.connect(*cargs, **cparams)
        except TimeoutError:
            raise ConnectTimeout(
                f"database: TimeoutError: {where} took the connection but did not answer "
                f"within {timeout:g} s (CHATGATE_DB_CONNECT_TIMEOUT)"
            ) from None
        except (OSError, asyncpg.InternalClientError) as exc:
            # A refused, reset or dropped connection said only "unexpected connection_lost()
            # call" or "[Errno 104] Connection reset by peer", naming nothing (QA).
            raise DatabaseUnreachable(
                f"database: cannot connect to {where} (CHATGATE_DATABASE_URL): {first_line(exc)}"
            ) from exc

    event.listen(engine.sync_engine, "do_connect", connect)
    return engine


class ConnectTimeout(TimeoutError):
    """The database did not complete a connection within ``db_connect_timeout``."""


class DatabaseUnreachable(ConnectionError):
    """A connection to PostgreSQL was refused, reset or dropped before it was set up."""


async def try_xact_lock(conn: AsyncConnection, key: int) -> bool:
    """Take PostgreSQL's advisory lock ``key`` for the rest of ``conn``'s transaction, if no
    other session holds it (False then, at once); True on SQLite (one writer at a time anyway).

    For work that one process of many should do at a time (retention passes): the others
    see False and leave it to that one.
    """
    if conn.dialect.name != "postgresql":
        return True
    taken = await conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(key)))
    return bool(taken.scalar_one())


def _own_file(database: str | None) -> None:
    """Create a new SQLite database file for its owner only (0600; its -wal and -shm files
    take the same mode): it holds conversations, password and key hashes. sqlite3 made it
    with the umask's 0644. An existing file keeps its mode; any other failure (a folder that
    is not there) is sqlite3's to report, as before."""
    if database and database != ":memory:" and not database.startswith("file:"):
        with contextlib.suppress(OSError):
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragmas(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


_REVISION = re.compile(r'^(down_revision|revision)\b[^=\n]*=\s*"([^"]+)"', re.MULTILINE)


@functools.cache
def _migrations() -> tuple[frozenset[str], str | None]:
    """Every migration's id, and the newest one, read from the files without importing
    Alembic: the newest is the revision no other names as its ``down_revision`` (None if that
    is not exactly one)."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for field, value in _REVISION.findall(path.read_text(encoding="utf-8")):
            (downs if field == "down_revision" else revisions).add(value)
    heads = revisions - downs
    return frozenset(revisions), next(iter(heads)) if len(heads) == 1 else None


def head_revision() -> str | None:
    """The newest migration's id (see :func:`_migrations`)."""
    return _migrations()[1]


class Schema(NamedTuple):
    """Where a database's schema stands against this code's migrations."""

    state: Literal["current", "behind", "ahead"]
    # "behind": at an older migration, or none (``chatgate migrate`` brings it up);
    # "ahead": at a migration this code does not know (a newer chatgate migrated it)
    revision: str | None  # the database's, None when it has no chatgate tables
    head: str | None  # this code's newest

    def lag(self, place: str = "") -> str:
        """A database behind, in words: where it is (and ``place``, where it lives) and the
        migration this code needs."""
        where = f"at migration {self.revision}" if self.revision else "empty"
        return f"the database is {where}{place}; this chatgate needs migration {self.head}"


class SchemaBehind(Exception):
    """The database needs ``chatgate migrate`` before this version of chatgate can use it."""


class ReadOnlyDatabase(Exception):
    """The database takes reads only: usage, keys and accounts cannot be written to it."""


async def read_only(engine: AsyncEngine) -> bool:
    """Whether the database refuses writes: a PostgreSQL hot standby (a failover that went the
    wrong way, a replica's URL) or one set ``default_transaction_read_only``. It answers every
    read, so a node on it served while every usage flush, key and sign-up failed. SQLite is not
    checked (False): its file is the process's own."""
    if engine.dialect.name != "postgresql":
        return False
    async with engine.connect() as conn:
        value = (await conn.execute(sa.text("SHOW transaction_read_only"))).scalar_one()
    return bool(value == "on")


async def schema(engine: AsyncEngine) -> Schema:
    """The database's migration against this code's (one small query). A database that cannot
    be reached raises, as :meth:`AsyncEngine.connect` does."""
    known, head = _migrations()
    async with engine.connect() as conn:
        try:
            rows = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all()
        except sa.exc.DBAPIError:  # no such table: a new database
            rows = []
    versions = [row[0] for row in rows]
    revision = versions[0] if len(versions) == 1 else None
    if head is not None and versions == [head]:
        return Schema("current", revision, head)
    if versions and not set(versions) <= known:
        return Schema("ahead", revision, head)
    return Schema("behind", revision, head)


MIGRATE_LOCK = 0x63686174676174  # "chatgat": PostgreSQL's advisory lock of the migrations


async def migrate(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the database to ``revision`` (idempotent). ``chatgate migrate`` and every server
    start call this (the other commands refuse a database behind: see ``chatgate.cli``), so a
    database already at the head is recognised with one query, without loading Alembic and
    the migration scripts (~0.35 s).

    A database a newer chatgate migrated is left as it is, with a warning: this version runs on
    it (the migrations add, never take away) while a rolling upgrade replaces it; Alembic
    would refuse it ("Can't locate revision"), and the node with it.

    Returns the revision the migrations started from ("" for a new database), read where
    they run (under the lock on PostgreSQL, in the transaction on SQLite), or None when there
    was nothing to do: another migrate, started at the same moment, may have done it all.
    """
    if revision == "head":
        try:
            found = await schema(engine)
        except sa.exc.DBAPIError:  # unreachable: Alembic's attempt below reports it
            found = None
        if found is not None and found.state != "behind":
            if found.state == "ahead":
                log.warning(
                    "the database is at migration %s, newer than this chatgate's %s: left as it is",
                    found.revision,
                    found.head,
                )
            return None
    started: list[str | None] = []

    def run(connection: Connection) -> None:
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        current = MigrationContext.configure(connection).get_current_revision()
        if revision == "head" and current is not None and current == _migrations()[1]:
            return  # done meanwhile, by a migrate that held the lock first
        started.append(current or "")
        command.upgrade(_alembic_config(connection), revision)

    if engine.dialect.name == "sqlite":
        own = _sqlite_migrating(engine)
        try:
            async with own.begin() as conn:  # BEGIN IMMEDIATE: see _sqlite_migrating
                await conn.run_sync(run)
        finally:
            await own.dispose()
        return started[0] if started else None
    async with engine.begin() as conn:
        # Nodes started together on a new database each ran the migrations at once, and all
        # but one died on the catalog's unique index (CREATE TYPE, CREATE TABLE). One at a
        # time: a lock held until this transaction ends (Alembic's DDL is in it), so the next
        # finds the database at its head and does nothing.
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})
        await conn.run_sync(run)
    return started[0] if started else None


def _sqlite_migrating(engine: AsyncEngine) -> AsyncEngine:
    """An engine of ``engine``'s SQLite file whose transactions hold their DDL, for the
    migrations alone.

    Python's sqlite3 opens a transaction only before a row is written, so a migration's DDL
    before Alembic's first version update was committed statement by statement: a migrate
    killed there (kill -9, OOM, power) kept half a revision's schema with the old version,
    and every later migrate and serve failed on it ("duplicate column name", for good: QA).
    SQLite's DDL is transactional when asked: the driver's own transactions are switched off
    and each begins with ``BEGIN IMMEDIATE``, which also takes the write lock first, so a
    second migrate waits (the busy timeout) and then finds the database at its head.
    """
    own = create_async_engine(engine.url, connect_args={"timeout": 30}, poolclass=NullPool)

    def connected(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        _sqlite_pragmas(dbapi_conn, record)
        dbapi_conn.isolation_level = None  # the driver begins nothing by itself

    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(own.sync_engine, "connect", connected)
    event.listen(own.sync_engine, "begin", begin)
    return own


def migrate_sync(settings: Settings) -> None:
    """Run the migrations from synchronous code (the CLI)."""

    async def go() -> None:
        engine = create_engine(settings)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(go())
