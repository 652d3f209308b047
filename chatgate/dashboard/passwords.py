"""Dashboard passwords: argon2id hashing and the few account queries the pages need.

Parameters follow OWASP's Password Storage Cheat Sheet for argon2id (m=19 MiB, t=2, p=1).
Hashing runs in a worker thread (argon2-cffi releases the GIL), so a login never stalls the
event loop that serves ``/v1``. A login for an unknown email still verifies against a dummy
hash, so the answer takes the same time whether or not the account exists.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.accounts import Account
from chatgate.db.tables import accounts, plans

MIN_PASSWORD = 10
MAX_PASSWORD = 256
LISTED = 100
"""Accounts an admin search lists (the newest); its callers ask for one more, to tell that
more match."""

HASHER = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)
_DUMMY_HASH = HASHER.hash("chatgate: no such account, compare anyway")


MIN_GUESSES_SCORE = 2
"""zxcvbn's score a password needs: 2 is a million guesses or more (0 and 1 are common
passwords, repeats like ``aaaaaaaaaa``, keyboard rows, the account's own email)."""
ZXCVBN_MAX = 72
"""The most characters zxcvbn reads (it raises ``ValueError`` beyond): a longer password is
judged by its first this many."""


def password_problem(password: str, email: str = "") -> str | None:
    """Why ``password`` cannot be used, or ``None`` when it can.

    NIST 800-63B: a length, and no password that is common, repetitive or sequential, or
    made of the account's own details. The last three are zxcvbn's estimate of the guesses
    it takes (its lists of common passwords, names and words ship in the package; a few
    milliseconds a password, at sign-up and at a change only). zxcvbn reads 72 characters at
    most: a longer password (a password manager's) is judged by its first 72, since guessing
    the whole means guessing them. (Judged by any stretch of 72 that was strong, a repeated
    word passed on a stretch that began inside a word, which zxcvbn reads as random text:
    QA found ``dragon`` x 40 cut to 73 characters accepted.)
    """
    if len(password) < MIN_PASSWORD:
        return f"Use at least {MIN_PASSWORD} characters."
    if len(password) > MAX_PASSWORD:
        return f"Use at most {MAX_PASSWORD} characters."
    if not password.strip():
        return "Use something other than spaces."
    from zxcvbn import zxcvbn  # imported on first use: its word lists take memory

    hints = [email, email.partition("@")[0], "chatgate"] if email else ["chatgate"]
    verdict: dict[str, Any] = zxcvbn(password[:ZXCVBN_MAX], user_inputs=hints)
    if verdict["score"] >= MIN_GUESSES_SCORE:
        return None
    feedback = verdict.get("feedback") or {}
    why = " ".join(t for t in (feedback.get("warning"), *feedback.get("suggestions", ())) if t)
    if email and email.lower() in password.lower():
        why = "It holds your email address."
    return "This password is too easy to guess." + (f" {why}" if why else "")


async def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (computed off the event loop)."""
    return await asyncio.to_thread(HASHER.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored``; ``None`` (no account) costs the same and fails."""
    return await asyncio.to_thread(_verify, stored, password)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a login needs about an account."""

    account_id: str
    password_hash: str | None
    disabled: bool
    session_epoch: int


class PasswordStore:
    """Reads and writes ``accounts.password_hash``; searches accounts for the admin pages."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def credentials(self, email: str) -> Credentials | None:
        """The stored hash of the account with ``email``, or ``None``."""
        query = sa.select(
            accounts.c.id, accounts.c.password_hash, accounts.c.disabled, accounts.c.session_epoch
        ).where(accounts.c.email == email.strip().lower())
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Credentials(row[0], row[1], bool(row[2]), row[3])

    async def password_hash(self, account_id: str) -> str | None:
        """The stored hash of account ``account_id`` (``None`` when it has no password)."""
        query = sa.select(accounts.c.password_hash).where(accounts.c.id == account_id)
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def set_password_hash(self, account_id: str, password_hash: str) -> None:
        """Replace the account's password hash; its other dashboard sessions end with it."""
        async with self._engine.begin() as conn:
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(password_hash=password_hash)
            )

    async def set_password(self, account_id: str, password: str) -> None:
        """Hash ``password`` and store it (for a CLI ``accounts set-password`` too)."""
        await self.set_password_hash(account_id, await hash_password(password))

    async def search(self, text: str = "", *, limit: int = LISTED) -> list[Account]:
        """Accounts whose email contains ``text`` (case-insensitive), newest first."""
        query = (
            sa.select(
                accounts.c.id,
                accounts.c.email,
                plans.c.name,
                accounts.c.is_admin,
                accounts.c.disabled,
                accounts.c.created_at,
            )
            .join(plans, plans.c.id == accounts.c.plan_id)
            .order_by(accounts.c.created_at.desc(), accounts.c.email)
            .limit(limit)
        )
        text = text.strip().lower()
        if "\x00" in text:  # SQLite's LIKE ends the pattern there and matched every account
            raise errors.nul_refused()  # (QA); PostgreSQL refuses it: the same 400 on both
        if text:
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(accounts.c.email.like(f"%{escaped}%", escape="\\"))
        async with self._engine.connect() as conn:
            return [Account(*row) for row in await conn.execute(query)]

    async def session_account(self, account_id: str) -> tuple[Account, str | None, int] | None:
        """The account, its password hash and session epoch in one query (checked on every
        dashboard page)."""
        query = (
            sa.select(
                accounts.c.id,
                accounts.c.email,
                plans.c.name,
                accounts.c.is_admin,
                accounts.c.disabled,
                accounts.c.created_at,
                accounts.c.password_hash,
                accounts.c.session_epoch,
            )
            .join(plans, plans.c.id == accounts.c.plan_id)
            .where(accounts.c.id == account_id)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return Account(*row[:6]), row[6], row[7]

    async def end_sessions(self, account_id: str) -> None:
        """End every dashboard session of the account: move its session epoch on."""
        async with self._engine.begin() as conn:
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(session_epoch=accounts.c.session_epoch + 1)
            )
