"""KeyStore additions: revoke by the leaked secret, scheduled rotation (``due``), and the
0004 and 0005 migrations. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.accounts import AccountStore
from chatgate.db.engine import create_engine, migrate
from chatgate.db.tables import accounts, api_keys, metadata
from chatgate.keys import format as keyfmt
from chatgate.keys.store import KeyStore
from chatgate.settings import Secret, Settings
from chatgate.timefmt import now


@pytest.fixture(scope="module")
async def engine(own_database: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(Settings.from_env(own_database))
    await migrate(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> KeyStore:
    return KeyStore(engine, Secret("test-secret-" + secrets.token_hex(8)))


@pytest.fixture
async def account(engine: AsyncEngine) -> str:
    created = await AccountStore(engine).create(f"k-{secrets.token_hex(4)}@example.com")
    return created.id


@pytest.mark.parametrize(
    ("table", "column"),
    [(api_keys, "rotation_period"), (accounts, "session_epoch")],  # 0004, 0005
)
async def test_migrations_build_the_table_as_defined(
    engine: AsyncEngine, table: sa.Table, column: str
) -> None:
    """The migrations build ``table`` as ``chatgate/db/tables.py`` defines it, with the
    column its latest migration added (0005: the session epoch that logging out moves on)."""

    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(context, metadata) if table.name in repr(d)]

    async with engine.connect() as conn:
        assert await conn.run_sync(compare) == []
    assert column in table.c


async def test_revoke_by_key_current_secret(store: KeyStore, account: str) -> None:
    issued = await store.create(account, name="leaky")
    result = await store.revoke_by_key(issued.key)
    assert result.outcome == "revoked" and result.record is not None
    assert result.record.id == issued.record.id and result.record.status == "revoked"
    again = await store.revoke_by_key(issued.key)
    assert again.outcome == "already_revoked"
    assert (await store.lookup(store.hash(issued.key))) is not None  # kept, marked revoked


async def test_revoke_by_key_old_secret_keeps_the_new_one(store: KeyStore, account: str) -> None:
    issued = await store.create(account)
    rotated = await store.rotate(issued.record.id, grace_seconds=3600)
    result = await store.revoke_by_key(issued.key)  # the old secret leaked
    assert result.outcome == "previous_secret_ended"
    assert result.record is not None and result.record.status == "active"
    assert result.record.prev_valid_until is None
    assert await store.lookup(store.hash(issued.key)) is None  # the old one: gone
    current = await store.lookup(store.hash(rotated.key))
    assert current is not None and current.revoked_at is None  # the new one: still works


async def test_revoke_by_key_unknown_and_malformed(store: KeyStore, account: str) -> None:
    issued = await store.create(account)
    assert (await store.revoke_by_key(keyfmt.generate())).outcome == "unknown"
    assert (await store.revoke_by_key("sk-cg-not-a-key")).outcome == "unknown"
    other = KeyStore(store._engine, Secret("another-secret"))  # a different server's secret
    assert (await other.revoke_by_key(issued.key)).outcome == "unknown"
    assert (await store.get(issued.record.id)).status == "active"


async def test_concurrent_rotations_hand_out_only_working_secrets(
    store: KeyStore, account: str
) -> None:
    """Two rotations at once end as if one ran after the other: the first's secret is the
    second's previous one (in its grace), the second's is current, the original stops. Before,
    both read the original hash and wrote it as the previous one: one secret handed out never
    worked and the original kept working."""
    for _ in range(10):
        issued = await store.create(account)
        outcomes = await asyncio.gather(
            *(store.rotate(issued.record.id, grace_seconds=3600) for _ in range(2)),
            return_exceptions=True,
        )
        rotated = [o for o in outcomes if not isinstance(o, BaseException)]
        assert rotated, outcomes
        for new in rotated:
            found = await store.lookup(store.hash(new.key))
            assert found is not None and found.key_id == issued.record.id, outcomes
        assert await store.lookup(store.hash(issued.key)) is None
        if len(rotated) == 2:
            matched = [(await store.lookup(store.hash(r.key))) for r in rotated]
            assert sorted(m is not None and m.matched_previous for m in matched) == [False, True]


async def test_rotation_period_and_due(store: KeyStore, account: str) -> None:
    plain = await store.create(account, name="plain")
    quarterly = await store.create(account, name="q", rotation_period=90 * 86400)
    assert plain.record.rotation_period is None and not plain.record.rotation_due
    record = quarterly.record
    assert record.rotation_period == 90 * 86400 and not record.rotation_due
    assert record.rotation_due_at == record.created_at + 90 * 86400
    assert record.to_dict()["rotation_due"] is False

    soon = record.created_at + 91 * 86400
    due_ids = {k.id for k in await store.due(account, at=soon)}
    assert due_ids == {record.id}
    assert await store.due(account) == []  # not yet

    # Rotating restarts the clock; revoked keys are never due.
    rotated = await store.rotate(record.id, grace_seconds=0)
    assert rotated.record.rotation_due_at == (rotated.record.rotated_at or 0) + 90 * 86400
    assert rotated.record.rotation_period == 90 * 86400  # the period survives rotation
    assert {
        k.id for k in await store.due(account, at=(rotated.record.rotated_at or 0) + 60)
    } == set()
    await store.revoke(record.id)
    assert await store.due(account, at=soon + 365 * 86400) == []


async def test_set_rotation_period(store: KeyStore, account: str) -> None:
    issued = await store.create(account)
    updated = await store.set_rotation_period(issued.record.id, 1, account_id=account)
    assert updated.rotation_period == 1
    assert [k.id for k in await store.due(account, at=now() + 5)] == [issued.record.id]
    assert (await store.set_rotation_period(issued.record.id, None)).rotation_period is None
    with pytest.raises(errors.NotFound):
        await store.set_rotation_period(issued.record.id, 60, account_id="acct_other")


@pytest.mark.parametrize("period", [0, -5, 10**12])
async def test_bad_rotation_periods(store: KeyStore, account: str, period: int) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        await store.create(account, rotation_period=period)
    assert info.value.param == "rotation_period"


# -- changing the server secret (``previous``) ----------------------------------------------


async def test_keys_migrate_to_a_new_server_secret_on_first_use(
    engine: AsyncEngine, account: str
) -> None:
    old_secret, new_secret = (
        Secret("old-" + secrets.token_hex(8)),
        Secret("new-" + secrets.token_hex(8)),
    )
    before = KeyStore(engine, old_secret)
    issued = await before.create(account, name="made under the old secret")
    rotated_from = await before.create(account)
    rotated = await before.rotate(rotated_from.record.id, grace_seconds=3600)

    plain_new = KeyStore(engine, new_secret)
    assert await plain_new.lookup(plain_new.hash(issued.key)) is None  # without previous: lost

    migrating = KeyStore(engine, new_secret, previous=old_secret)
    found = await migrating.lookup(migrating.hash(issued.key))
    assert found is not None and found.key_id == issued.record.id
    # Re-hashed in place: the new secret alone finds it now, the old one no longer does.
    assert (await plain_new.lookup(plain_new.hash(issued.key))) is not None
    assert await before.lookup(before.hash(issued.key)) is None
    # The secret a rotation replaced (in its grace period) migrates the same way.
    old_one = await migrating.lookup(migrating.hash(rotated_from.key))
    assert old_one is not None and old_one.matched_previous
    current = await migrating.lookup(migrating.hash(rotated.key))
    assert current is not None and not current.matched_previous
    assert (await plain_new.lookup(plain_new.hash(rotated.key))) is not None

    # Unknown keys stay unknown and change nothing; a leaked old-secret key can be revoked.
    assert await migrating.lookup(migrating.hash(keyfmt.generate())) is None
    late = await before.create(account)
    result = await KeyStore(engine, new_secret, previous=old_secret).revoke_by_key(late.key)
    assert result.outcome == "revoked" and result.record is not None
    assert result.record.id == late.record.id


async def test_previous_secret_map_is_bounded(engine: AsyncEngine) -> None:
    from chatgate.keys import store as store_module

    keys = KeyStore(engine, Secret("a"), previous=Secret("b"))
    for _ in range(50):
        keys.hash(keyfmt.generate())
    assert len(keys._earlier) == 50
    old_limit = store_module.EARLIER_HASHES
    store_module.EARLIER_HASHES = 10
    try:
        newest = keys.hash(keyfmt.generate())
        assert len(keys._earlier) == 10 and newest in keys._earlier  # the oldest go first
    finally:
        store_module.EARLIER_HASHES = old_limit
    assert KeyStore(engine, Secret("a"))._earlier == {}  # nothing kept without previous


async def test_authentication_accepts_a_key_made_under_the_previous_secret(
    engine: AsyncEngine, account: str
) -> None:
    """No change in :mod:`chatgate.auth` is needed: it hashes and looks up as always."""
    from chatgate.auth import Authenticator

    old_secret, new_secret = (
        Secret("old-" + secrets.token_hex(8)),
        Secret("new-" + secrets.token_hex(8)),
    )
    issued = await KeyStore(engine, old_secret).create(account)
    auth = Authenticator(
        KeyStore(engine, new_secret, previous=old_secret), engine, ttl=60, poll_interval=1
    )
    principal = await auth.authenticate(f"Bearer {issued.key}")
    assert principal.key_id == issued.record.id
    assert (await auth.authenticate(f"Bearer {issued.key}")).key_id == issued.record.id
    assert auth.db_lookups == 1  # cached like any key after its first use
