"""Issue, list, revoke, rotate and look up API keys. The key itself is never stored.

Every change writes an invalidation row in the same transaction, so running servers drop
their cached copy within one poll interval (see :mod:`chatgate.auth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS, invalidate
from chatgate.db.tables import accounts, api_keys, plans
from chatgate.ids import new_id
from chatgate.keys import format as keyfmt
from chatgate.settings import Secret
from chatgate.timefmt import now


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What is stored about a key (no secret)."""

    id: str
    account_id: str
    name: str
    hint: str
    models: list[str] | None
    created_at: int
    rotated_at: int | None
    last_used_at: int | None
    expires_at: int | None
    revoked_at: int | None
    prev_valid_until: int | None

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now():
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status
        return out


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created or rotated: the only moment ``key`` exists outside the caller."""

    record: KeyRecord
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "key": self.key}


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """Everything authentication needs about a key, read in one query."""

    key_id: str
    account_id: str
    is_admin: bool
    account_disabled: bool
    models: frozenset[str] | None
    expires_at: int | None
    revoked_at: int | None
    matched_previous: bool
    prev_valid_until: int | None
    plan: dict[str, int | None]
    overrides: dict[str, int | None]


_RECORD_COLUMNS = [getattr(api_keys.c, f.name) for f in fields(KeyRecord)]


class KeyStore:
    """The key service; ``secret`` is the server secret keys are hashed under."""

    def __init__(self, engine: AsyncEngine, secret: Secret) -> None:
        self._engine = engine
        self._secret = secret

    def hash(self, key: str) -> str:
        return keyfmt.key_hash(self._secret.reveal(), key)

    async def create(
        self,
        account_id: str,
        *,
        name: str = "",
        expires_at: int | None = None,
        models: Sequence[str] | None = None,
        limits: dict[str, int | None] | None = None,
    ) -> IssuedKey:
        if len(name) > 200:
            raise errors.InvalidRequest("A key name is at most 200 characters.", param="name")
        limits = {k: v for k, v in (limits or {}).items() if v is not None}
        for field in limits:
            if field not in LIMIT_FIELDS:
                raise errors.InvalidRequest(f"Unknown limit `{field}`.", param=field)
        key = keyfmt.generate()
        key_id = new_id("key")
        created = now()
        async with self._engine.begin() as conn:
            exists = await conn.execute(sa.select(accounts.c.id).where(accounts.c.id == account_id))
            if exists.first() is None:
                raise errors.NotFound("No such account.", param="account")
            await conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    account_id=account_id,
                    name=name,
                    key_hash=self.hash(key),
                    hint=keyfmt.hint(key),
                    models=sorted(set(models)) if models else None,
                    created_at=created,
                    expires_at=expires_at,
                    **limits,
                )
            )
            await invalidate(conn, "key_new", self.hash(key))
        return IssuedKey(await self.get(key_id), key)

    async def get(self, key_id: str, *, account_id: str | None = None) -> KeyRecord:
        """The key ``key_id``; with ``account_id``, only when that account owns it (else 404)."""
        query = sa.select(*_RECORD_COLUMNS).where(api_keys.c.id == key_id)
        if account_id is not None:
            query = query.where(api_keys.c.account_id == account_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise errors.NotFound("No such API key.", param="key_id")
        return KeyRecord(*row)

    async def list(self, account_id: str | None = None) -> list[KeyRecord]:
        query = sa.select(*_RECORD_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
        if account_id is not None:
            query = query.where(api_keys.c.account_id == account_id)
        async with self._engine.connect() as conn:
            return [KeyRecord(*r) for r in await conn.execute(query)]

    async def revoke(self, key_id: str, *, account_id: str | None = None) -> KeyRecord:
        record = await self.get(key_id, account_id=account_id)
        if record.revoked_at is None:
            async with self._engine.begin() as conn:
                await conn.execute(
                    api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=now())
                )
                await invalidate(conn, "key", key_id)
        return await self.get(key_id)

    async def rotate(
        self, key_id: str, *, grace_seconds: int, account_id: str | None = None
    ) -> IssuedKey:
        """A new secret for the same key record; the old one works ``grace_seconds`` more."""
        if grace_seconds < 0:
            raise errors.InvalidRequest("The grace period cannot be negative.", param="grace")
        record = await self.get(key_id, account_id=account_id)
        if record.status != "active":
            raise errors.InvalidRequest(
                f"The API key is {record.status}; only active keys can be rotated.",
                param="key_id",
                code="key_not_active",
            )
        key = keyfmt.generate()
        stamp = now()
        async with self._engine.begin() as conn:
            current = (
                await conn.execute(sa.select(api_keys.c.key_hash).where(api_keys.c.id == key_id))
            ).scalar_one()
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id)
                .values(
                    key_hash=self.hash(key),
                    hint=keyfmt.hint(key),
                    prev_hash=current if grace_seconds > 0 else None,
                    prev_valid_until=stamp + grace_seconds if grace_seconds > 0 else None,
                    rotated_at=stamp,
                )
            )
            await invalidate(conn, "key", key_id)
            await invalidate(conn, "key_new", self.hash(key))
        return IssuedKey(await self.get(key_id), key)

    async def lookup(self, key_hash: str) -> KeyLookup | None:
        """The key whose current or previous (in grace) secret hashes to ``key_hash``."""
        query = (
            sa.select(
                api_keys,
                accounts.c.is_admin,
                accounts.c.disabled,
                *(getattr(plans.c, f).label("plan_" + f) for f in LIMIT_FIELDS),
            )
            .join(accounts, accounts.c.id == api_keys.c.account_id)
            .join(plans, plans.c.id == accounts.c.plan_id)
            .where(sa.or_(api_keys.c.key_hash == key_hash, api_keys.c.prev_hash == key_hash))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        m = row._mapping
        return KeyLookup(
            key_id=m["id"],
            account_id=m["account_id"],
            is_admin=bool(m["is_admin"]),
            account_disabled=bool(m["disabled"]),
            models=frozenset(m["models"]) if m["models"] else None,
            expires_at=m["expires_at"],
            revoked_at=m["revoked_at"],
            matched_previous=m["key_hash"] != key_hash,
            prev_valid_until=m["prev_valid_until"],
            plan={f: m["plan_" + f] for f in LIMIT_FIELDS},
            overrides={f: m[f] for f in LIMIT_FIELDS},
        )

    async def touch(self, last_used: dict[str, int]) -> None:
        """Write ``last_used_at`` for many keys at once (called off the request path)."""
        if not last_used:
            return
        async with self._engine.begin() as conn:
            for key_id, stamp in last_used.items():
                await conn.execute(
                    api_keys.update().where(api_keys.c.id == key_id).values(last_used_at=stamp)
                )
