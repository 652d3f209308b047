"""Facts about one installation that every node must agree on, kept in the database.

The server secret: every stored key hash is HMAC-SHA256 under it, and dashboard cookies are
sealed with a key derived from it, so two nodes with different secrets each refuse the other's
keys and sessions (behind a load balancer: a key that works on every other request). Nothing
in a request could tell which node is wrong. So the first start records a check of the
secret (a key derived from it for this purpose alone: it reveals the secret no more than a
key hash does), and a node whose secret gives another check refuses to start.

Changing the secret on purpose (SECURITY.md, "Rotating CHATGATE_SECRET"): a node given the
old one as ``CHATGATE_SECRET_PREVIOUS`` moves the check to the new one as it starts; after a
clean break (no previous secret: a leak), ``chatgate secret adopt`` moves it.
"""

from __future__ import annotations

import hmac
import logging
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate.db.tables import api_keys, instance
from chatgate.settings import Secret, Settings, derive_key

log = logging.getLogger(__name__)

CHECK_NAME = "secret_check"  # the row of ``instance`` holding the check


class SecretMismatch(Exception):
    """The server secret is not the one the database was set up with."""

    def __init__(self) -> None:
        super().__init__(
            "CHATGATE_SECRET is not the secret this database was set up with: every API key "
            "stored in it would be refused here, and dashboard sessions would not carry over "
            "between nodes. Give every node the same CHATGATE_SECRET (the first node's: its "
            "CHATGATE_SECRET, or the file `secret` in its data directory); if you changed it "
            "on purpose, see SECURITY.md, 'Rotating CHATGATE_SECRET' (`chatgate secret adopt`)"
        )


def _check(secret: Secret) -> str:
    return derive_key(secret.reveal(), "database-secret-check").hex()


async def _upsert(conn: AsyncConnection, check: str, *, replace: bool) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(instance).values(
        name=CHECK_NAME, value=check, created_at=int(time.time())
    )
    await conn.execute(
        insert.on_conflict_do_update(index_elements=["name"], set_={"value": check})
        if replace
        else insert.on_conflict_do_nothing(index_elements=["name"])
    )


class NoSecretCheck(Exception):
    """The database holds no check of a secret: neither ``chatgate migrate`` nor ``chatgate
    serve`` has set it up."""

    def __init__(self) -> None:
        super().__init__(
            "the database has no server secret set up yet (neither `chatgate migrate` nor "
            "`chatgate serve` ran on it): run 'chatgate migrate' first"
        )


async def check_secret(
    engine: AsyncEngine, secret: Secret, previous: Secret | None = None, *, record: bool = True
) -> None:
    """Record ``secret``'s check if the database has none (with ``record`` off, raise
    :class:`NoSecretCheck` instead: only ``migrate`` and ``serve`` bind a database to a
    secret); raise :class:`SecretMismatch` if it has another, unless it is ``previous``'s (the
    secret being rotated away from): then the database takes ``secret``'s. Two nodes starting
    at once on a new database agree on the first one's."""
    check = _check(secret)
    async with engine.begin() as conn:
        if record:
            await _upsert(conn, check, replace=False)
        stored = (
            await conn.execute(sa.select(instance.c.value).where(instance.c.name == CHECK_NAME))
        ).scalar_one_or_none()
        if stored is None:
            raise NoSecretCheck
        if hmac.compare_digest(stored.encode(), check.encode()):
            return
        if previous and hmac.compare_digest(stored.encode(), _check(previous).encode()):
            await conn.execute(
                instance.update()
                .where(instance.c.name == CHECK_NAME, instance.c.value == stored)
                .values(value=check)
            )
            return
    raise SecretMismatch


class UnboundKeys(SecretMismatch):
    """The database holds keys made before it recorded a secret's check, and no secret is
    set here: one generated now cannot be theirs."""

    def __init__(self, keys: int) -> None:
        Exception.__init__(
            self,
            f"the database holds {keys} API key(s) made before chatgate recorded its server "
            "secret, and no secret is set here (CHATGATE_SECRET, or the file `secret` in "
            "the data directory): a secret generated now would make every one of them refused. "
            "Set CHATGATE_SECRET to the secret they were made under (or restore the `secret` "
            "file) and run again",
        )


async def _keys_without_check(engine: AsyncEngine) -> int:
    """How many keys the database holds if it has no secret's check yet (0 if it has one)."""
    async with engine.connect() as conn:
        checked = await conn.execute(
            sa.select(instance.c.value).where(instance.c.name == CHECK_NAME)
        )
        if checked.scalar_one_or_none() is not None:
            return 0
        count = sa.select(sa.func.count()).select_from(api_keys)
        return int((await conn.execute(count)).scalar_one())


async def bind_secret(engine: AsyncEngine, settings: Settings) -> None:
    """:func:`check_secret` with the settings' secret, as ``migrate`` and ``serve`` do, for a
    database that predates the check (before migration 0006) too: one holding keys is bound
    to a secret that is set (with a warning: nothing can tell whether it is theirs), never
    to one generated now, which could not be (QA: an upgrade with the data directory's
    `secret` file missing bound it to a new one, and every key was refused, without a word).
    """
    keys = await _keys_without_check(engine)
    secret = settings.stored_secret()
    if keys and secret is None:
        raise UnboundKeys(keys)
    await check_secret(engine, settings.resolved_secret(), settings.secret_previous)
    if keys:
        log.warning(
            "bound the database's %d API key(s), made before chatgate recorded its secret, to "
            "this CHATGATE_SECRET; if they are all refused, it is not the one they were made "
            "under: set that one and run `chatgate secret adopt`",
            keys,
        )


async def adopt_secret(engine: AsyncEngine, secret: Secret) -> None:
    """Make ``secret`` the database's, whatever it was (a deliberate clean break)."""
    async with engine.begin() as conn:
        await _upsert(conn, _check(secret), replace=True)
