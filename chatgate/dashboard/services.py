"""The account-facing actions behind both the dashboard pages and ``/api/*``.

Thin: each one checks its input the same way for a form and for JSON, then calls the shared
services (:class:`~chatgate.keys.store.KeyStore`, :class:`~chatgate.accounts.AccountStore`,
:class:`~chatgate.accounts.PlanStore`). Ownership is enforced by passing ``account_id`` to
the key store, which answers 404 for another account's key: the same answer as for a key
that does not exist, so ids cannot be probed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS, LIMIT_MAX, Account, Plan
from chatgate.keys.store import IssuedKey, KeyRecord, Once
from chatgate.state import State
from chatgate.timefmt import parse_duration

EXPIRY_CHOICES = (("", "Never"), ("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"))
GRACE_CHOICES = (("0", "Immediately"), ("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"))
MAX_KEY_NAME = 200
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: "²" is a digit to isdigit, not int


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A checked request to create a key."""

    name: str
    expires_at: int | None
    models: list[str] | None
    limits: dict[str, int | None] | None = None  # the key's own (overrides of its plan's)


def parse_expiry(text: str | None, *, now: float | None = None) -> int | None:
    """``"30d"`` -> a unix time 30 days from now; empty or ``"never"`` -> ``None``."""
    text = (text or "").strip().lower()
    if text in ("", "never", "0"):
        return None
    try:
        seconds = parse_duration(text)
        if seconds == 0:  # "0d": a key expired before its first call
            raise ValueError(text)
    except ValueError as exc:
        raise errors.InvalidRequest(
            "Expiry must look like 30d, 12h or 90m, more than 0 and at most 100 years (36500d), "
            "or 0, never or empty for no expiry.",
            param="expires_in",
        ) from exc
    return int(now if now is not None else time.time()) + seconds


def parse_grace(text: str | int | None, default: int) -> int:
    """A grace period in seconds from ``"24h"``, ``"0"`` or a number; ``None`` -> ``default``."""
    if text is None or text == "":
        return default
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text
    else:
        try:
            seconds = parse_duration(str(text))
        except ValueError as exc:
            raise errors.InvalidRequest(
                "The grace period must look like 0, 1h, 24h or 7d.", param="grace"
            ) from exc
    if seconds < 0 or seconds > 30 * 86400:
        raise errors.InvalidRequest(
            "The grace period must be between 0 and 30 days.", param="grace"
        )
    return seconds


def model_names(state: State) -> list[str]:
    """The public model names this gateway serves."""
    return [m.name for m in state.router.models()]


def check_models(known: Iterable[str], models: Iterable[str] | None) -> list[str] | None:
    """The allowed-models list, every name one of ``known`` (the public model names);
    empty or ``None`` means every model. Names that are only blanks are a 400 (blanks beside
    a name are dropped): ``[""]`` made a key of every model, the restriction gone unsaid."""
    if models is None:
        return None
    given = list(models)
    chosen = sorted({m.strip() for m in given if m and m.strip()})
    if not chosen:
        if given:
            raise errors.InvalidRequest(
                "A model name cannot be empty: name the models the key may use, or leave "
                "`models` out for every model.",
                param="models",
            )
        return None
    names = set(known)
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise errors.InvalidRequest(
            f"Unknown model `{unknown[0][:80]}`; see GET /v1/models.", param="models"
        )
    return chosen


def key_request(
    state: State,
    *,
    name: str,
    expires_in: str | None,
    models: Iterable[str] | None,
    limits: dict[str, object] | None = None,
) -> KeyRequest:
    """Check a create-key request from a form or JSON (``limits``: the key's own, as
    :func:`parse_limits` reads them)."""
    name = name.strip()
    if len(name) > MAX_KEY_NAME:
        raise errors.InvalidRequest(
            f"A key name is at most {MAX_KEY_NAME} characters.", param="name"
        )
    own = parse_limits(limits or {})  # their range: the store's check (check_limits)
    return KeyRequest(name, parse_expiry(expires_in), check_models(model_names(state), models), own)


async def create_key(
    state: State, account: Account, request: KeyRequest, *, once: Once | None = None
) -> IssuedKey:
    """A new key for ``account``; the full key is in the result and nowhere else. ``once``:
    a dashboard form's token, taken with the key (``OnceTaken`` when it was taken before)."""
    if account.disabled:
        raise errors.PermissionDenied("This account is disabled.")
    return await state.keys.create(
        account.id,
        name=request.name,
        expires_at=request.expires_at,
        models=request.models,
        limits=request.limits,
        once=once,
    )


async def rotate_key(
    state: State, account: Account, key_id: str, grace: int, *, once: Once | None = None
) -> IssuedKey:
    """A new secret for ``account``'s key ``key_id``; 404 when it is not theirs. ``once`` as
    for :func:`create_key`."""
    return await state.keys.rotate(key_id, grace_seconds=grace, account_id=account.id, once=once)


async def revoke_key(state: State, account: Account, key_id: str) -> KeyRecord:
    """Revoke ``account``'s key ``key_id`` (idempotent); 404 when it is not theirs."""
    return await state.keys.revoke(key_id, account_id=account.id)


def parse_limits(values: dict[str, object]) -> dict[str, int | None]:
    """Plan limits from a form or JSON: a whole number, or empty/``None`` for unlimited."""
    out: dict[str, int | None] = {}
    for field, raw in values.items():
        if field not in LIMIT_FIELDS:
            raise errors.InvalidRequest(f"Unknown limit `{field[:40]}`.", param=field[:40])
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "unlimited")):
            out[field] = None
        elif isinstance(raw, int) and not isinstance(raw, bool):
            out[field] = raw
        elif isinstance(raw, str) and _DIGITS.fullmatch(raw.strip()):
            out[field] = int(raw.strip())  # its range is the stores' check (check_limits)
        else:
            raise errors.InvalidRequest(
                f"The limit `{field}` must be a whole number from 0 to {LIMIT_MAX[field]}, "
                "or empty for unlimited.",
                param=field,
            )
    return out


async def set_plan_limits(state: State, name: str, limits: dict[str, int | None]) -> Plan:
    """Change a plan's limits (every account on it sees them within a second)."""
    return await state.plans.update(name, **limits)
