from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Gateway,
    Upstream,
    create_pg_database,
    drop_pg_database,
    make_gateway,
    start_upstream,
    stop,
)


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
