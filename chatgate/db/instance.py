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
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate.db.tables import instance
from chatgate.settings import Secret, derive_key

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


async def adopt_secret(engine: AsyncEngine, secret: Secret) -> None:
    """Make ``secret`` the database's, whatever it was (a deliberate clean break)."""
    async with engine.begin() as conn:
        await _upsert(conn, _check(secret), replace=True)
