"""Fixtures for the sessions tests: a migrated engine per database, and a gateway process
(per database) whose models include ``gpt-small``, a model with a 400-token window,
``gpt-tools`` and ``gpt-slow``."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore
from chatgate.db.engine import create_engine, migrate
from chatgate.sessions.store import SessionStore
from chatgate.settings import Settings
from tests.helpers import Gateway, Upstream, make_gateway

SMALL_WINDOW = 400


@pytest.fixture(scope="session")
async def engine(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncEngine]:
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(tmp_path_factory.mktemp("sessions-data")),
            "CHATGATE_DATABASE_URL": database_url,
        }
    )
    eng = create_engine(settings)
    await migrate(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> SessionStore:
    return SessionStore(engine)


@pytest.fixture
async def two_accounts(engine: AsyncEngine) -> tuple[str, str]:
    accounts = AccountStore(engine)
    a = await accounts.create(f"a-{secrets.token_hex(4)}@example.com", plan="enterprise")
    b = await accounts.create(f"b-{secrets.token_hex(4)}@example.com", plan="enterprise")
    return a.id, b.id


@pytest.fixture(scope="session")
def sgw(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A running gateway on each database, with ``gpt-small`` (context window 400),
    ``gpt-tools`` (the fake upstream calls the first tool it is given) and ``gpt-slow`` (it
    answers after 5 s)."""
    extra = f"""
[[models]]
name = "gpt-small"
base_url = "{upstream.base_url}"
upstream_model = "fake-model"
context_window = {SMALL_WINDOW}

[[models]]
name = "gpt-break"
base_url = "{upstream.base_url}"
upstream_model = "break-stream"

[[models]]
name = "gpt-tools"
base_url = "{upstream.base_url}"
upstream_model = "tools"

[[models]]
name = "gpt-slow"
base_url = "{upstream.base_url}"
upstream_model = "slow"
"""
    gw = make_gateway(
        Path(tmp_path_factory.mktemp("sessions-gw")),
        database_url=database_url,
        upstream=upstream,
        extra_toml=extra,
    )
    gw.start()
    yield gw
    gw.stop()
