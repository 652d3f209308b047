"""Accounts and plans: the services behind the CLI, the management API and the dashboard.

Also the two halves of telling running servers about a change: :func:`invalidate` records it
in the feed inside the change's transaction, and :func:`changing`, the transaction every such
change is made in, announces it on Redis once it has committed (see :mod:`chatgate.notify`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate import errors
from chatgate.db.tables import accounts, invalidations, plans
from chatgate.ids import new_id
from chatgate.notify import Notifier
from chatgate.timefmt import now

LIMIT_FIELDS = ("rpm", "tpm", "rpd", "concurrency", "monthly_tokens", "monthly_budget_cents")
LIMIT_MAX = {f: 2**31 - 1 for f in LIMIT_FIELDS} | {
    "monthly_tokens": 2**63 - 1,
    "monthly_budget_cents": 900_000_000,  # $9M: its counter, in nano-dollars, stays below 2**53
}
"""The most each limit holds (INTEGER is 32 bits on PostgreSQL; a BIGINT 64; a budget is
counted in nano-dollars, which Redis's Lua numbers hold exactly up to 2**53)."""
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
_PLAN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def plan_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a plan, or ``None``. Dots only (``.``, ``..``) are refused: a
    plan's pages and API are at ``.../plans/{name}``, where a browser or a proxy reads them as
    a path's dot segments (``/dashboard/admin/plans/..`` is ``/dashboard/admin/``), so such a
    plan could be made and never edited."""
    if not _PLAN_NAME.fullmatch(name) or not name.strip("."):
        return "A plan name is 1-64 letters, digits, '.', '_' or '-', and not only dots."
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan's limits; ``None`` means unlimited."""

    id: int
    name: str
    rpm: int | None
    tpm: int | None
    rpd: int | None
    concurrency: int | None
    monthly_tokens: int | None
    monthly_budget_cents: int | None = None
    """US cents a month, spent at the models' prices (see :mod:`chatgate.limits`)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    email: str
    plan: str
    is_admin: bool
    disabled: bool
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _plan(row: Any) -> Plan:
    return Plan(
        row.id,
        row.name,
        row.rpm,
        row.tpm,
        row.rpd,
        row.concurrency,
        row.monthly_tokens,
        row.monthly_budget_cents,
    )


_INVALIDATED = "chatgate.invalidated"  # a mark in ``conn.info``, read by :func:`changing`


async def invalidate(conn: AsyncConnection, kind: str, ref: str) -> None:
    """Record a change so every server process drops what it cached about ``ref``.

    Call it inside :func:`changing`, which announces the change once it has committed.
    """
    await conn.execute(invalidations.insert().values(kind=kind, ref=ref, created_at=now()))
    conn.info.setdefault(_INVALIDATED, []).append((kind, ref))


@contextlib.asynccontextmanager
async def changing(
    engine: AsyncEngine, notifier: Notifier | None
) -> AsyncIterator[AsyncConnection]:
    """A write transaction (``engine.begin()``) whose :func:`invalidate` calls, once it has
    committed, wake every server to read the feed (``notifier``; ``None``: they poll).

    Publishing here, after the commit, is the point: a server woken earlier would find
    nothing yet. A transaction that ends without invalidating anything (an already revoked
    key, an unknown secret) or that rolls back announces nothing. The mark that says "this
    transaction invalidated" lives in ``conn.info``, which follows the pooled database
    connection, so it is removed before the connection goes back to the pool (a connection
    lost mid-transaction is discarded, its ``info`` with it).
    """
    invalidated: list[tuple[str, str]] = []
    async with engine.begin() as conn:
        try:
            yield conn
        finally:
            with contextlib.suppress(SQLAlchemyError):
                invalidated = conn.info.pop(_INVALIDATED, [])
    if invalidated and notifier is not None:
        await notifier.publish(invalidated)


class PlanStore:
    """Create, read and update plans; ``notifier`` announces changes (see :func:`changing`)."""

    def __init__(self, engine: AsyncEngine, notifier: Notifier | None = None) -> None:
        self._engine = engine
        self._notifier = notifier

    async def list(self) -> list[Plan]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(plans).order_by(plans.c.id))
            return [_plan(r) for r in rows]

    async def get(self, name: str) -> Plan:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(plans).where(plans.c.name == name))).first()
        if row is None:
            shown = name if len(name) <= 64 else name[:64] + "…"  # not another plan's name
            raise errors.NotFound(f"No plan named `{shown}`.", param="plan")
        return _plan(row)

    async def create(self, name: str, **limits: int | None) -> Plan:
        problem = plan_name_problem(name)
        if problem is not None:
            raise errors.InvalidRequest(problem, param="name")
        values = check_limits(limits)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(plans.insert().values(name=name, created_at=now(), **values))
        except IntegrityError as exc:
            raise errors.InvalidRequest(
                f"A plan named `{name}` exists already.", param="name", code="plan_exists"
            ) from exc
        return await self.get(name)

    async def update(self, name: str, **limits: int | None) -> Plan:
        """Set the given limits (``None`` = unlimited); limits not given stay as they are."""
        values = check_limits(limits)
        plan = await self.get(name)
        if values:
            async with changing(self._engine, self._notifier) as conn:
                await conn.execute(plans.update().where(plans.c.id == plan.id).values(**values))
                await invalidate(conn, "plan", str(plan.id))
        return await self.get(name)


def check_limits(limits: dict[str, int | None]) -> dict[str, int | None]:
    """``limits`` when each is a known limit, ``None`` or a whole number its column holds."""
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise errors.InvalidRequest(f"Unknown limit `{name}`.", param=name)
        if value is not None and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= LIMIT_MAX[name]
        ):
            raise errors.InvalidRequest(
                f"The limit `{name}` must be a whole number from 0 to {LIMIT_MAX[name]}.",
                param=name,
            )
    return limits


class AccountStore:
    """Create, list and change accounts; ``notifier`` announces changes (see :func:`changing`)."""

    def __init__(self, engine: AsyncEngine, notifier: Notifier | None = None) -> None:
        self._engine = engine
        self._notifier = notifier

    def _select(self) -> sa.Select[Any]:
        return sa.select(
            accounts.c.id,
            accounts.c.email,
            plans.c.name.label("plan"),
            accounts.c.is_admin,
            accounts.c.disabled,
            accounts.c.created_at,
        ).join(plans, plans.c.id == accounts.c.plan_id)

    async def count(self) -> int:
        async with self._engine.connect() as conn:
            return int(
                (await conn.execute(sa.select(sa.func.count()).select_from(accounts))).scalar_one()
            )

    async def create(
        self,
        email: str,
        *,
        plan: str = "free",
        is_admin: bool = False,
        password_hash: str | None = None,
    ) -> Account:
        email = email.strip().lower()
        if not _EMAIL.match(email):
            raise errors.InvalidRequest("That is not an email address.", param="email")
        plan_row = await PlanStore(self._engine).get(plan)
        account_id = new_id("acct")
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    accounts.insert().values(
                        id=account_id,
                        email=email,
                        plan_id=plan_row.id,
                        is_admin=is_admin,
                        disabled=False,
                        password_hash=password_hash,
                        created_at=now(),
                    )
                )
        except IntegrityError as exc:
            raise errors.InvalidRequest(
                "An account with that email exists already.", param="email", code="account_exists"
            ) from exc
        return await self.get(account_id)

    async def get(self, account_id: str) -> Account:
        async with self._engine.connect() as conn:
            row = (await conn.execute(self._select().where(accounts.c.id == account_id))).first()
        if row is None:
            raise errors.NotFound("No such account.", param="account")
        return Account(*row)

    async def by_email(self, email: str) -> Account:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(self._select().where(accounts.c.email == email.strip().lower()))
            ).first()
        if row is None:
            raise errors.NotFound("No account with that email.", param="email")
        return Account(*row)

    async def list(self) -> list[Account]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                self._select().order_by(accounts.c.created_at, accounts.c.email)
            )
            return [Account(*r) for r in rows]

    async def set_plan(self, account_id: str, plan: str) -> Account:
        plan_row = await PlanStore(self._engine).get(plan)
        async with changing(self._engine, self._notifier) as conn:
            result = await conn.execute(
                accounts.update().where(accounts.c.id == account_id).values(plan_id=plan_row.id)
            )
            if result.rowcount == 0:
                raise errors.NotFound("No such account.", param="account")
            await invalidate(conn, "account", account_id)
        return await self.get(account_id)

    async def set_disabled(self, account_id: str, disabled: bool) -> Account:
        # Disabling ends the account's dashboard sessions for good (their epoch moves on): a
        # copy of a session cookie must not work again once the account is enabled.
        ended = {"session_epoch": accounts.c.session_epoch + 1} if disabled else {}
        async with changing(self._engine, self._notifier) as conn:
            result = await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(disabled=disabled, **ended)
            )
            if result.rowcount == 0:
                raise errors.NotFound("No such account.", param="account")
            await invalidate(conn, "account", account_id)
        return await self.get(account_id)
