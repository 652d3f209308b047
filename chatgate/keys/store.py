"""Issue, list, revoke, rotate and look up API keys. The key itself is never stored.

Every change writes an invalidation row in the same transaction, so running servers drop
their cached copy within one poll interval (see :mod:`chatgate.auth`); with Redis, the
transaction (:func:`~chatgate.accounts.changing`) also wakes them at once after its commit
(see :mod:`chatgate.notify`).

Keys are found by their HMAC (an indexed equality in the database), never by comparing key
strings in Python; where two digests are compared here, it is with ``hmac.compare_digest``.

Changing the server secret: with ``previous`` (the secret before), a key whose hash is still
the one made under the previous secret is found on its first use and re-hashed in place under
the current one, so keys migrate as they are used. The store never holds a key for this:
:meth:`KeyStore.hash` notes which previous-secret hash goes with each current-secret hash it
computes (a bounded map of hashes), and a :meth:`KeyStore.lookup` miss consults that note.
"""

from __future__ import annotations

import builtins
import hmac
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS, changing, check_limits, invalidate
from chatgate.db.tables import accounts, api_keys, once_tokens, plans
from chatgate.ids import new_id
from chatgate.keys import format as keyfmt
from chatgate.notify import Notifier
from chatgate.settings import Secret, Settings
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
    rotation_period: int | None  # seconds; None = no scheduled rotation
    # The key's own limits (None: only its plan's), held beside its account's plan.
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    concurrency: int | None = None
    monthly_tokens: int | None = None
    monthly_budget_cents: int | None = None

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now():
            return "expired"
        return "active"

    @property
    def rotation_due_at(self) -> int | None:
        """When the next scheduled rotation is due (from the last rotation, else creation)."""
        if self.rotation_period is None:
            return None
        return (self.rotated_at or self.created_at) + self.rotation_period

    @property
    def rotation_due(self) -> bool:
        """True when an active key has outlived its rotation period."""
        due_at = self.rotation_due_at
        return due_at is not None and self.status == "active" and due_at <= now()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status
        out["rotation_due_at"] = self.rotation_due_at
        out["rotation_due"] = self.rotation_due
        return out


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created or rotated: the only moment ``key`` exists outside the caller.

    ``grace_cut_short``: a rotation made while the secret an earlier rotation replaced was
    still in its grace ends that secret at once (one previous secret is kept); this is when
    its grace would have ended (``None``: no grace was running)."""

    record: KeyRecord
    key: str
    grace_cut_short: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "key": self.key, "grace_cut_short": self.grace_cut_short}


@dataclass(frozen=True, slots=True)
class Once:
    """A dashboard form's "runs once" token, taken in the same transaction as the key it makes
    or rotates; its row is kept ``kept`` seconds (a login's lifetime: no session that could
    send the form again lasts longer), then pruned."""

    token: str
    kept: int


class OnceTaken(Exception):
    """The form's once token was taken before (the form was sent again): nothing changed."""


async def _take_once(conn: AsyncConnection, once: Once | None) -> None:
    """Take ``once`` in the transaction of ``conn`` (:class:`OnceTaken` when it was taken);
    prune the rows past their time. A second send at the same moment waits on the unique key
    (PostgreSQL) or the one writer (SQLite) and finds the first's row."""
    if once is None:
        return
    stamp = now()
    try:
        await conn.execute(once_tokens.insert().values(token=once.token[:64], created_at=stamp))
    except IntegrityError as exc:  # the transaction is left, and rolled back, with this
        raise OnceTaken(once.token) from exc
    await conn.execute(once_tokens.delete().where(once_tokens.c.created_at < stamp - once.kept))


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


LeakOutcome = Literal["revoked", "already_revoked", "previous_secret_ended", "unknown"]


@dataclass(frozen=True, slots=True)
class SecretRevocation:
    """What :meth:`KeyStore.revoke_by_key` did about one presented secret.

    - ``revoked``: it was a key's current secret; the key is now revoked.
    - ``already_revoked``: it was a key's current secret, and the key was revoked before.
    - ``previous_secret_ended``: it was the secret a rotation replaced; it no longer works
      (its grace period, if any was left, is over), while the key's new secret keeps working.
    - ``unknown``: no key of this server has (or had, within the grace) that secret.
    """

    outcome: LeakOutcome
    record: KeyRecord | None


_RECORD_COLUMNS = [getattr(api_keys.c, f.name) for f in fields(KeyRecord)]
MAX_ROTATION_PERIOD = 100 * 365 * 86400
EARLIER_HASHES = 100_000  # current-secret hash -> previous-secret hash, most recent kept


def _check_rotation_period(rotation_period: int | None) -> None:
    if rotation_period is not None and not 1 <= rotation_period <= MAX_ROTATION_PERIOD:
        raise errors.InvalidRequest(
            "The rotation period must be between 1 second and 100 years.",
            param="rotation_period",
        )


class KeyStore:
    """The key service; ``secret`` is the server secret keys are hashed under, ``previous``
    the one before it while keys migrate (see the module's docstring); ``notifier`` announces
    changes to running servers (``None``: they find them by polling)."""

    @classmethod
    def from_settings(
        cls, engine: AsyncEngine, settings: Settings, *, notifier: Notifier | None = None
    ) -> KeyStore:
        """The store under the server secret, and the previous one while it is being rotated;
        changes are announced through ``notifier``, else the one ``settings`` describe (so
        every command that builds its store here publishes, ``chatgate scan --revoke`` too)."""
        return cls(
            engine,
            settings.resolved_secret(),
            previous=settings.secret_previous,
            notifier=notifier or Notifier.from_settings(settings),
        )

    def __init__(
        self,
        engine: AsyncEngine,
        secret: Secret,
        *,
        previous: Secret | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._engine = engine
        self._notifier = notifier
        self._previous = previous if previous else None
        self._hash = keyfmt.KeyHasher(secret.reveal())
        self._hash_previous = keyfmt.KeyHasher(previous.reveal()) if previous else None
        self._earlier: OrderedDict[str, str] = OrderedDict()

    def hash(self, key: str) -> str:
        """The key's lookup index: HMAC-SHA256 under the server secret."""
        digest = self._hash(key)
        if self._hash_previous is not None:
            self._earlier[digest] = self._hash_previous(key)
            self._earlier.move_to_end(digest)
            while len(self._earlier) > EARLIER_HASHES:
                self._earlier.popitem(last=False)
        return digest

    async def create(
        self,
        account_id: str,
        *,
        name: str = "",
        expires_at: int | None = None,
        models: Sequence[str] | None = None,
        limits: dict[str, int | None] | None = None,
        rotation_period: int | None = None,
        once: Once | None = None,
    ) -> IssuedKey:
        """A new key for ``account_id``; ``rotation_period`` (seconds) schedules rotation;
        ``once``: the dashboard form's token, taken with the key (:class:`OnceTaken`)."""
        _check_rotation_period(rotation_period)
        if len(name) > 200:
            raise errors.InvalidRequest("A key name is at most 200 characters.", param="name")
        limits = check_limits({k: v for k, v in (limits or {}).items() if v is not None})
        key = keyfmt.generate()
        key_id = new_id("key")
        created = now()
        async with changing(self._engine, self._notifier) as conn:
            await _take_once(conn, once)
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
                    rotation_period=rotation_period,
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
            async with changing(self._engine, self._notifier) as conn:
                await conn.execute(
                    api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=now())
                )
                await invalidate(conn, "key", key_id)
        return await self.get(key_id)

    async def once_taken(self, token: str) -> bool:
        """Whether a form's once token was taken (the form made or rotated a key)."""
        query = sa.select(once_tokens.c.token).where(once_tokens.c.token == token[:64])
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def rotate(
        self,
        key_id: str,
        *,
        grace_seconds: int,
        account_id: str | None = None,
        once: Once | None = None,
    ) -> IssuedKey:
        """A new secret for the same key record; the old one works ``grace_seconds`` more.

        One previous secret is kept: a secret an earlier rotation replaced, still in its grace,
        stops now (the result's ``grace_cut_short`` says until when it was to work). ``once``:
        the dashboard form's token, taken with the rotation (:class:`OnceTaken`)."""
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
        async with changing(self._engine, self._notifier) as conn:
            await _take_once(conn, once)
            # The grace this rotation ends, read under the row's lock on PostgreSQL.
            running = await conn.execute(
                sa.select(api_keys.c.prev_valid_until)
                .where(api_keys.c.id == key_id, api_keys.c.prev_hash.is_not(None))
                .with_for_update()
            )
            until = running.scalar()
            cut_short = until if until is not None and until > stamp else None
            # One statement moves the current hash to ``prev_hash``: the database serializes
            # rotations of a key (a row lock on PostgreSQL, the one writer on SQLite), so a
            # second one keeps the first one's secret as previous. Read first and written
            # after, both kept the original and one secret handed out never worked.
            changed = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(
                    key_hash=self.hash(key),
                    hint=keyfmt.hint(key),
                    prev_hash=api_keys.c.key_hash if grace_seconds > 0 else None,
                    prev_valid_until=stamp + grace_seconds if grace_seconds > 0 else None,
                    rotated_at=stamp,
                )
            )
            if changed.rowcount != 1:  # revoked meanwhile
                raise errors.InvalidRequest(
                    "The API key is revoked; only active keys can be rotated.",
                    param="key_id",
                    code="key_not_active",
                )
            await invalidate(conn, "key", key_id)
            await invalidate(conn, "key_new", self.hash(key))
        return IssuedKey(await self.get(key_id), key, cut_short)

    async def set_rotation_period(
        self, key_id: str, rotation_period: int | None, *, account_id: str | None = None
    ) -> KeyRecord:
        """Schedule (seconds) or, with ``None``, unschedule the key's regular rotation."""
        _check_rotation_period(rotation_period)
        await self.get(key_id, account_id=account_id)  # 404 when not there / not theirs
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id)
                .values(rotation_period=rotation_period)
            )
        return await self.get(key_id)

    async def due(
        self, account_id: str | None = None, *, at: int | None = None
    ) -> builtins.list[KeyRecord]:
        """Active keys whose rotation period has passed at ``at`` (default: now), oldest first."""
        stamp = now() if at is None else at
        due_at = sa.func.coalesce(api_keys.c.rotated_at, api_keys.c.created_at) + (
            api_keys.c.rotation_period
        )
        query = (
            sa.select(*_RECORD_COLUMNS)
            .where(
                api_keys.c.rotation_period.is_not(None),
                api_keys.c.revoked_at.is_(None),
                sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > stamp),
                due_at <= stamp,
            )
            .order_by(due_at, api_keys.c.id)
        )
        if account_id is not None:
            query = query.where(api_keys.c.account_id == account_id)
        async with self._engine.connect() as conn:
            return [KeyRecord(*r) for r in await conn.execute(query)]

    async def revoke_by_key(self, key: str) -> SecretRevocation:
        """Make a leaked secret stop working, found by its hash (the key is never stored).

        Its key is revoked when it is the key's current secret; when it is the secret a
        rotation replaced, only that old secret is cut off (the new one was not leaked).
        A string that is not a well-formed key is ``unknown`` without any lookup.
        """
        if not keyfmt.is_well_formed(key):
            return SecretRevocation("unknown", None)
        return await self.revoke_by_hash(self.hash(key))

    async def revoke_by_hash(self, key_hash: str) -> SecretRevocation:
        """:meth:`revoke_by_key` for a secret already hashed with :meth:`hash`."""
        await self._adopt(key_hash)  # a key still hashed under the previous server secret
        query = sa.select(api_keys.c.id, api_keys.c.key_hash, api_keys.c.revoked_at).where(
            sa.or_(api_keys.c.key_hash == key_hash, api_keys.c.prev_hash == key_hash)
        )
        async with changing(self._engine, self._notifier) as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                return SecretRevocation("unknown", None)
            key_id, current, revoked_at = row
            if not hmac.compare_digest(current, key_hash):
                # The old secret of a rotated key: end its grace now, keep the new secret.
                await conn.execute(
                    api_keys.update()
                    .where(api_keys.c.id == key_id)
                    .values(prev_hash=None, prev_valid_until=None)
                )
                await invalidate(conn, "key", key_id)
                outcome: LeakOutcome = "previous_secret_ended"
            elif revoked_at is not None:
                outcome = "already_revoked"
            else:
                await conn.execute(
                    api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=now())
                )
                await invalidate(conn, "key", key_id)
                outcome = "revoked"
        return SecretRevocation(outcome, await self.get(key_id))

    async def lookup(self, key_hash: str) -> KeyLookup | None:
        """The key whose current or previous (in grace) secret hashes to ``key_hash``.

        With a previous server secret, a miss tries the hash of the same key under it and, when
        that matches, re-hashes the key in place (:meth:`_adopt`) before looking again.
        """
        found = await self._lookup(key_hash)
        if found is None and await self._adopt(key_hash):
            found = await self._lookup(key_hash)
        return found

    async def _adopt(self, key_hash: str) -> bool:
        """Re-hash under the current secret a key stored under the previous one, found through
        the previous-secret hash :meth:`hash` noted for ``key_hash``; False when there is none.
        """
        if self._previous is None:
            return False
        old = self._earlier.pop(key_hash, None)
        if old is None:
            return False
        # Read first: an unknown key (the common miss) must not cost a write transaction.
        async with self._engine.connect() as conn:
            stored = await conn.execute(
                sa.select(api_keys.c.id)
                .where(sa.or_(api_keys.c.key_hash == old, api_keys.c.prev_hash == old))
                .limit(1)
            )
            if stored.first() is None:
                return False
        # Not announced on Redis (no notifier): this runs on the request path, on a key's first
        # use after a secret change, and only lifts other servers' "unknown key" entries for
        # this hash, which their next feed poll does.
        async with changing(self._engine, None) as conn:
            current = await conn.execute(
                api_keys.update().where(api_keys.c.key_hash == old).values(key_hash=key_hash)
            )
            replaced = await conn.execute(
                api_keys.update().where(api_keys.c.prev_hash == old).values(prev_hash=key_hash)
            )
            if not (current.rowcount or replaced.rowcount):
                return False
            await invalidate(conn, "key_new", key_hash)
        return True

    async def _lookup(self, key_hash: str) -> KeyLookup | None:
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
            matched_previous=not hmac.compare_digest(m["key_hash"], key_hash),
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
