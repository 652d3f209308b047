from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    REDIS_URL,
    Gateway,
    Upstream,
    create_pg_database,
    drop_pg_database,
    drop_redis_prefix,
    make_gateway,
    start_upstream,
    stop,
)
from tests.redisserver import RedisServer
from tests.usage.pgserver import PgServer


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    stop(up.proc)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Each storage test runs on both databases: SQLite in a temp dir, a fresh PostgreSQL DB."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'chatgate.db'}"
    else:
        url = create_pg_database()
        yield url
        drop_pg_database(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def own_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A fresh database of each kind, of its own: the shared ``database_url`` one is where
    the session gateways keep serving from it (tests that make accounts, or take the schema
    down and up again, use this one)."""
    env = {"CHATGATE_DATA_DIR": str(tmp_path_factory.mktemp("keys-data"))}
    if request.param == "sqlite":
        yield env
        return
    url = create_pg_database()
    yield {**env, "CHATGATE_DATABASE_URL": url}
    drop_pg_database(url)


@pytest.fixture(scope="session")
def gateway(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A running ``chatgate serve`` on each database, with the fake upstream's models."""
    gw = make_gateway(
        Path(tmp_path_factory.mktemp("gateway")), database_url=database_url, upstream=upstream
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of the test's own, started: to stop, start, freeze and thaw."""
    try:
        server = PgServer()
    except (RuntimeError, OSError, KeyError) as exc:
        pytest.skip(f"cannot run a test-owned PostgreSQL here: {exc}")
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to flush, stop, kill and start again."""
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server to start")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def pair(
    pg_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Gateway]]:
    """Two gateways on one PostgreSQL database and one Redis (own key prefix)."""
    prefix = f"cgtest-{secrets.token_hex(4)}:"
    env = {
        "CHATGATE_REDIS_URL": REDIS_URL,
        "CHATGATE_REDIS_PREFIX": prefix,
    }
    root = Path(tmp_path_factory.mktemp("pair"))
    gws = [
        make_gateway(root / f"gw{i}", database_url=pg_url, upstream=upstream, extra_env=env)
        for i in range(2)
    ]
    for gw in gws:
        gw.start()
    yield gws
    for gw in gws:
        gw.stop()
    drop_redis_prefix(prefix)
