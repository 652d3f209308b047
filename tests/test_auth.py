"""The auth cache: the hot path does not read the database per request, yet changes made
elsewhere (another process, the CLI) reach it within a second. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import auth as auth_module
from chatgate import errors
from chatgate.accounts import AccountStore, PlanStore, invalidate
from chatgate.app import SERVER_OPTIONS, create_app
from chatgate.auth import Authenticator
from chatgate.db.engine import create_engine, migrate
from chatgate.db.tables import api_keys
from chatgate.keys.store import KeyStore
from chatgate.settings import Secret, Settings
from chatgate.state import STATE
from tests.helpers import Upstream, models_toml
from tests.usage.pgserver import PgServer

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def served(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[tuple[TestServer, KeyStore, AccountStore]]:
    (tmp_path / "chatgate.toml").write_text(models_toml(upstream))
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(tmp_path / "data"),
            "CHATGATE_DATABASE_URL": database_url,
            "CHATGATE_CONFIG": str(tmp_path / "chatgate.toml"),
            "CHATGATE_LOCAL_MODEL": "0",
        }
    )
    engine = create_engine(settings)
    await migrate(engine)
    server = TestServer(create_app(settings), host="127.0.0.1", **SERVER_OPTIONS)
    await server.start_server()
    try:
        yield server, KeyStore(engine, settings.resolved_secret()), AccountStore(engine)
    finally:
        await server.close()
        await engine.dispose()


async def _post(session: aiohttp.ClientSession, server: TestServer, key: str) -> int:
    async with session.post(
        server.make_url("/v1/chat/completions"),
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        await resp.read()
        return resp.status


async def test_hundred_requests_one_lookup(served: Any) -> None:
    server, keys, accounts = served
    account = await accounts.create(f"q{id(server)}@example.com", plan="enterprise")
    issued = await keys.create(account.id, name="q")
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "invalidations" not in statement:  # the change feed polls off the request path
            statements.append(statement)

    engine = server.app[STATE].engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        async with aiohttp.ClientSession() as session:
            statuses = [await _post(session, server, issued.key) for _ in range(100)]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statuses == [200] * 100
    assert len(statements) == 1, statements  # the first lookup; then the cache serves
    assert "api_keys" in statements[0]


async def test_changes_elsewhere_reach_the_cache(served: Any) -> None:
    server, keys, accounts = served
    account = await accounts.create(f"c{id(server)}@example.com", plan="enterprise")
    issued = await keys.create(account.id)
    other = await keys.create(account.id)
    async with aiohttp.ClientSession() as session:
        assert await _post(session, server, issued.key) == 200
        assert await _post(session, server, other.key) == 200
        await keys.revoke(issued.record.id)  # as another process would, through the database
        await asyncio.sleep(1.0)
        assert await _post(session, server, issued.key) == 401
        assert await _post(session, server, other.key) == 200
        await AccountStore(keys._engine).set_disabled(account.id, True)
        await asyncio.sleep(1.0)
        assert await _post(session, server, other.key) == 401


async def test_plan_change_invalidates(served: Any) -> None:
    server, keys, accounts = served
    account = await accounts.create(f"p{id(server)}@example.com", plan="free")
    issued = await keys.create(account.id)
    async with aiohttp.ClientSession() as session:
        assert await _post(session, server, issued.key) == 200
    auth = server.app[STATE].auth
    principal = await auth.authenticate(f"Bearer {issued.key}")
    assert principal.limits["rpm"] == (await PlanStore(keys._engine).get("free")).rpm
    await accounts.set_plan(account.id, "enterprise")
    await asyncio.sleep(1.0)
    principal = await auth.authenticate(f"Bearer {issued.key}")
    assert principal.limits["rpm"] is None


@contextlib.asynccontextmanager
async def migrated(database_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database_url``, migrated; disposed on the way out."""
    engine = create_engine(
        Settings.from_env(
            {"CHATGATE_DATA_DIR": str(tmp_path / "data"), "CHATGATE_DATABASE_URL": database_url}
        )
    )
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()


async def test_a_change_committed_out_of_id_order_still_reaches_the_cache(
    pg_url: str, tmp_path: Path
) -> None:
    """PostgreSQL hands out feed ids at insert, not at commit: when a later-numbered change
    commits first and a poll passes its id, the earlier one, committed afterwards, must still
    be applied (with Redis, servers poll right after every commit, so this is no rarity)."""
    async with migrated(pg_url, tmp_path) as engine:
        keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
        account = await AccountStore(engine).create(f"g-{secrets.token_hex(4)}@example.com")
        first, second = await keys.create(account.id), await keys.create(account.id)
        auth = Authenticator(keys, engine, ttl=600, poll_interval=30)
        await auth.start_feed()
        for issued in (first, second):
            await auth.authenticate(f"Bearer {issued.key}")  # cached
        async with engine.begin() as slow:  # takes its feed id first, commits last
            await slow.execute(
                api_keys.update().where(api_keys.c.id == first.record.id).values(revoked_at=1)
            )
            await invalidate(slow, "key", first.record.id)
            await keys.revoke(second.record.id)  # a later id, committed at once
            await auth.poll_once()
            with pytest.raises(errors.AuthenticationError):
                await auth.authenticate(f"Bearer {second.key}")
            assert (await auth.authenticate(f"Bearer {first.key}")).key_id == first.record.id
        await auth.poll_once()
        with pytest.raises(errors.AuthenticationError):
            await auth.authenticate(f"Bearer {first.key}")


async def test_a_change_applied_while_its_key_is_read_is_not_cached_over(
    pg_url: str, tmp_path: Path
) -> None:
    """A cache miss reads the key while a revocation commits and the feed applies it (with
    Redis, milliseconds after the commit): the row read before the commit must not be cached
    after it, or the revoked key would keep working on this server until ``key_cache_ttl``."""
    async with migrated(pg_url, tmp_path) as engine:
        keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
        account = await AccountStore(engine).create(f"r-{secrets.token_hex(4)}@example.com")
        issued = await keys.create(account.id)
        auth = Authenticator(keys, engine, ttl=600, poll_interval=30)
        await auth.start_feed()
        read, go_on = asyncio.Event(), asyncio.Event()
        lookup = keys.lookup

        async def slow_lookup(key_hash: str) -> Any:  # a database slow to answer
            found = await lookup(key_hash)
            read.set()
            await go_on.wait()
            return found

        keys.lookup = slow_lookup  # type: ignore[method-assign]
        first = asyncio.create_task(auth.authenticate(f"Bearer {issued.key}"))
        await read.wait()
        await keys.revoke(issued.record.id)
        await auth.poll_once()
        go_on.set()
        assert (await first).key_id == issued.record.id  # under way when it was revoked
        with pytest.raises(errors.AuthenticationError):
            await auth.authenticate(f"Bearer {issued.key}")


async def test_a_database_that_stops_answering_does_not_hold_up_known_keys(
    own_pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL frozen (a host that stops answering; here its processes are stopped): a key
    whose cache entry is past ``key_cache_ttl`` is served from what was known at once, while
    it is read again in the background, and once that read times out not looked up again on
    the next request. The lookup used to wait for the database forever, and every request of
    the key with it; then for the lookup's timeout, once a TTL (QA: 5 s stalls)."""
    monkeypatch.setattr(auth_module, "LOOKUP_TIMEOUT", 1.0, raising=False)
    async with migrated(own_pg.url, tmp_path) as engine:
        try:
            keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
            account = await AccountStore(engine).create(f"h-{secrets.token_hex(4)}@example.com")
            issued = await keys.create(account.id)
            auth = Authenticator(keys, engine, ttl=0.5, poll_interval=30)
            await auth.authenticate(f"Bearer {issued.key}")  # cached
            own_pg.freeze()
            await asyncio.sleep(0.6)  # past the TTL
            lookups = auth.db_lookups
            assert (await auth.authenticate(f"Bearer {issued.key}")).key_id == issued.record.id
            assert auth._refreshing, "it waited for the read"  # answered; the read goes on
            assert (await auth.authenticate(f"Bearer {issued.key}")).key_id == issued.record.id
            async with asyncio.timeout(5):
                while auth._refreshing:  # the read times out (1 s)
                    await asyncio.sleep(0.05)
            assert auth.db_lookups == lookups + 1  # one read, however many requests
            await auth.authenticate(f"Bearer {issued.key}")
            assert auth.db_lookups == lookups + 1  # trusted for another TTL, not read again
        finally:
            own_pg.thaw()


async def test_a_database_outage_is_logged_once_by_the_feed(
    own_pg: PgServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The invalidation feed polls every ``poll_interval`` (a second by default): an outage is
    one warning when it begins and one when the feed reads again, not a traceback a poll."""
    async with migrated(own_pg.url, tmp_path) as engine:
        auth = Authenticator(KeyStore(engine, Secret("s" * 40)), engine, ttl=60, poll_interval=0.02)
        await auth.start_feed()
        polls = {"ok": 0, "failed": 0}
        poll = auth.poll_once

        async def counted() -> None:
            try:
                await poll()
            except Exception:
                polls["failed"] += 1
                raise
            polls["ok"] += 1

        auth.poll_once = counted  # type: ignore[method-assign]

        async def until(kind: str, n: int) -> None:
            target = polls[kind] + n
            async with asyncio.timeout(60):
                while polls[kind] < target:
                    await asyncio.sleep(0.01)

        with caplog.at_level(logging.WARNING, logger="chatgate.auth"):
            feed = asyncio.create_task(auth.run_feed())
            await until("ok", 1)
            own_pg.stop()
            await until("failed", 5)
            own_pg.start()
            await until("ok", 1)
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
        said = [r.getMessage() for r in caplog.records if r.name == "chatgate.auth"]
        assert said == ["invalidation feed: poll failed", "invalidation feed: polling again"]


async def test_last_used_times_that_cannot_be_written_are_one_line_an_outage(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """QA: while the database was away, each flush of last-used times (every 10 s) logged a
    ~95-line traceback. Now one line when the outage begins, one when it ends; the stamps
    are kept and written then."""
    async with migrated(pg_url, tmp_path) as engine:
        keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
        account = await AccountStore(engine).create(f"t-{secrets.token_hex(4)}@example.com")
        issued = await keys.create(account.id)
        auth = Authenticator(keys, engine, ttl=600, poll_interval=30)
        await auth.authenticate(f"Bearer {issued.key}")
        # The database away: the same store on a port where nothing listens.
        settings = Settings.from_env(
            {
                "CHATGATE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
                "CHATGATE_DATA_DIR": str(tmp_path / "away"),
            }
        )
        away = create_engine(settings)
        auth._store = KeyStore(away, Secret("s-unused"))
        try:
            with caplog.at_level(logging.INFO, logger="chatgate.auth"):
                for _ in range(3):
                    await auth.flush_last_used()
                auth._store = keys
                await auth.flush_last_used()
        finally:
            await away.dispose()
        said = [r.getMessage() for r in caplog.records if r.name == "chatgate.auth"]
        assert len(said) == 2, said
        assert said[0].startswith("could not record last-used times (kept for the next try): ")
        assert said[1] == "recording last-used times again"
        assert all(r.exc_info is None for r in caplog.records)
        assert (await keys.get(issued.record.id)).last_used_at is not None
