"""The in-process limiter's state, and a key's checks compiled into an admission and a settlement.

Every limited request runs :meth:`MemoryLimiter.acquire <.memory.MemoryLimiter.acquire>` over
the same few checks of its key (a plan's five: rpm, rpd, tpm, concurrency, monthly tokens).
Written as a loop over generic checks, that cost ~100 bytecodes a check, most of it the loop
(unpacking, list appends, a second pass zipping them back). :func:`compile_checks` writes
the same steps out straight for one *shape* of checks (their kinds, in order), the way
:mod:`dataclasses` writes an ``__init__``: the source is built from the shape alone (no key,
scope or limit is ever part of it; they are the closure's cells) and compiled once per shape.
Counted by ``bench/limits_loop.py``: admit + headers + settle of the bench plan, 95.9k ->
76.8k instructions.

The compiled admission does what the loop did, in the same order and with the same float
expressions: read every bucket and stop at the first that would overflow (``None``: the
caller works the refusal out in full), then take them all, then the header values of
:func:`.base.most_restrictive`, inline. The settlement frees the slot and gives back the
unused tokens, each bucket once. The limiter's property test holds both to an exact model
and the headers to :func:`.base.decide`, with buckets named twice among the checks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import NamedTuple

from .base import (
    EPS,
    QUOTA_RETENTION,
    RESET_TIE,
    Check,
    Decision,
    RateStatus,
    Reservation,
    Resolved,
    month_end,
)

__all__ = [
    "LEVELS_AT",
    "Admit",
    "Bucket",
    "Compiled",
    "Counter",
    "Entry",
    "Granted",
    "Leases",
    "Program",
    "Settle",
    "compile_checks",
]


class Bucket:
    """GCRA state: ``level`` units at unix time ``stamp``; empty again at ``expires_at``."""

    __slots__ = ("expires_at", "level", "stamp")

    def __init__(self, level: float, stamp: float, rate: float) -> None:
        # The compiled admission and settlement move a bucket in place, with these same lines.
        self.level = level
        self.stamp = stamp
        self.expires_at = stamp + level / rate if rate > 0 else stamp + 86400.0

    def at(self, now: float, rate: float) -> float:
        """The level at ``now``, drained at ``rate`` (a check's: a plan change moves it)."""
        return max(self.level - max(now - self.stamp, 0.0) * rate, 0.0)


class Leases:
    """Concurrency slots: lease id -> expiry, in expiry order (one TTL for all).

    ``first_expiry`` is never later than the oldest live lease's expiry (a settled lease
    leaves it early), so :meth:`live` looks into the dict only when something may have
    expired.
    """

    __slots__ = ("first_expiry", "leases")

    def __init__(self) -> None:
        self.leases: dict[str, float] = {}
        self.first_expiry = math.inf

    def live(self, now: float) -> int:
        """The live count, pruning first only when the oldest lease may have expired."""
        if self.first_expiry <= now:
            return self.prune(now)
        return len(self.leases)

    def prune(self, now: float) -> int:
        """Drop expired leases (from the front: amortised O(1)); the live count."""
        leases = self.leases
        while leases:
            lease, expiry = next(iter(leases.items()))
            if expiry > now:
                self.first_expiry = expiry
                break
            del leases[lease]
        else:
            self.first_expiry = math.inf
        return len(leases)

    def add(self, lease_id: str, expiry: float) -> None:
        """Hold a slot until ``expiry`` (later than every lease held: one TTL for all)."""
        if not self.leases:
            self.first_expiry = expiry
        self.leases[lease_id] = expiry

    def renew(self, lease_id: str, expiry: float) -> None:
        """Hold a live lease until ``expiry`` (as :meth:`add`: later than every lease held,
        so it moves to the back). ``first_expiry`` stays a lower bound."""
        if self.leases.pop(lease_id, None) is not None:
            self.leases[lease_id] = expiry


class Counter:
    """A month's quota counter."""

    __slots__ = ("expires_at", "used")

    def __init__(self, used: int, expires_at: float) -> None:
        self.used = used
        self.expires_at = expires_at


Entry = Bucket | Leases | Counter

Admit = Callable[[MutableMapping[str, Entry], float, int, str, float], Decision | None]
"""``admit(state, now, cost_tokens, lease_id, lease_expiry)``: every check taken and the
allowed :class:`Decision`, or ``None`` and nothing taken (some check would overflow)."""

Settle = Callable[[MutableMapping[str, Entry], str, int, Callable[[], float]], int]
"""``settle(state, lease_id, tokens_delta, clock)``: the slot freed, the difference between
the real and the reserved tokens given back (or charged); how many entries it added."""

Granted = Callable[[Sequence[bytes | str | float], int, Reservation], Decision]
"""``granted(levels, cost_tokens, reservation)``: the allowed :class:`Decision` of checks
whose buckets stood at ``levels[LEVELS_AT + i]`` before the request (each a number, or its
text: the Redis script's reply, split) and took it; what :func:`.base.decide` makes of
them, worked out inline as the admission does."""

LEVELS_AT = 3
"""Where check 0's level is in the sequence :data:`Granted` reads (the Redis script's reply
puts allowed, failed and retry_after first)."""


class Compiled(NamedTuple):
    """A tuple of checks compiled (:func:`compile_checks`)."""

    admit: Admit
    settle: Settle
    granted: Granted


class Program(Resolved):
    """A tuple of checks as the in-process limiter reads it, for one quota month: their
    compiled admission and settlement (:func:`compile_checks`)."""

    __slots__ = ("admit", "settle")

    def __init__(self, checks: Sequence[Check], now: float) -> None:
        super().__init__(checks, now)
        self.admit, self.settle, _ = compile_checks(self.resolved)


def _kept_until(check: Check) -> float:
    """When a quota counter may be dropped: a retention after its month ends."""
    assert check.month is not None
    return month_end(check.month) + QUOTA_RETENTION


def compile_checks(resolved: tuple[Check, ...]) -> Compiled:
    """The admission, the settlement and the allowed decision from levels (what the Redis
    limiter makes of its script's reply) of ``resolved`` (quota months filled in), compiled.

    The source depends only on the checks' kinds, in order, and on which repeat a bucket
    (:func:`_factory` keeps one per shape); each check's key, limits and rate are bound as
    the factory's arguments.
    """
    seen: set[str] = set()
    shape: list[tuple[str, bool, bool]] = []
    values: list[object] = [resolved]
    for check in resolved:
        shape.append((check.kind, check.limit > 0, check.key not in seen))
        seen.add(check.key)
        # K: storage key; L: the limit with the float tolerance; then per kind.
        values += (check.key, check.limit + EPS)
        if check.is_rate:
            values += (check.rate, check.limit, check.window)
        elif check.kind == "quota":
            values.append(_kept_until(check))
    return Compiled(*_factory(tuple(shape))(*values))


_RATE_READ = """
    b{i} = state.get(K{i})
    v{i} = {cost}
    if b{i} is not None:
        d = b{i}.level
        e = now - b{i}.stamp
        if e > 0.0:
            d -= e * R{i}
        if d > 0.0:
            v{i} += d
    if v{i} > L{i}:
        return None"""
_LEASE_READ = """
    s{i} = state.get(K{i})
    if (s{i}.live(now) if s{i} is not None else 0) + 1 > L{i}:
        return None"""
_QUOTA_READ = """
    q{i} = state.get(K{i})
    u{i} = q{i}.used if q{i} is not None else 0
    if u{i} + cost > L{i}:
        return None"""
_RATE_TAKE = """
    if b{i} is not None:
        b{i}.level = v{i}
        b{i}.stamp = now
        b{i}.expires_at = {expires}
    else:
        state[K{i}] = Bucket(v{i}, now, R{i})"""
_LEASE_TAKE = """
    if s{i} is None:
        s{i} = state[K{i}] = Leases()
    s{i}.add(lease_id, expiry)"""
_QUOTA_TAKE = """
    if q{i} is not None:
        q{i}.used = u{i} + cost  # set, not add: a repeated check charges once
    else:
        state[K{i}] = Counter(u{i} + cost, KEPT{i})"""
# most_restrictive's step for one check (used_units inline), then keep the most restrictive.
_HEADER = """
    u = ceil(v{i} - EPS)
    r = LIMIT{i} - u if u > 0 else LIMIT{i}
    if r < 0:
        r = 0
    t = {reset}
    if not t > 0:
        t = 0.0"""
_FIRST = """
    best_r, best_t, best_l = r, t, LIMIT{i}"""
_NEXT = """
    if r < best_r or (r == best_r and t > best_t + RESET_TIE):
        best_r, best_t, best_l = r, t, LIMIT{i}"""
# The settlement: free the slot; give back (or charge) the difference, Bucket.at inline.
_LEASE_FREE = """
    s{i} = state.get(K{i})
    if s{i} is not None:
        s{i}.leases.pop(lease_id, None)"""
_RATE_REFUND = """
    b{i} = state.get(K{i})
    level = delta
    if b{i} is not None:
        e = now - b{i}.stamp
        d = b{i}.level - (e if e > 0.0 else 0.0) * R{i}
        if d > 0.0:
            level += d
    if level <= 0:
        state.pop(K{i}, None)
    elif b{i} is not None:
        b{i}.level = level
        b{i}.stamp = now
        b{i}.expires_at = {expires}
    else:
        state[K{i}] = Bucket(level, now, R{i})
        added += 1"""
_QUOTA_REFUND = """
    q{i} = state.get(K{i})
    if q{i} is not None:
        q{i}.used = max(q{i}.used + delta, 0)
    else:
        state[K{i}] = Counter(max(delta, 0), KEPT{i})
        added += 1"""


@functools.lru_cache(maxsize=256)
def _factory(
    shape: tuple[tuple[str, bool, bool], ...],
) -> Callable[..., tuple[Admit, Settle, Granted]]:
    """A function that binds one shape's constants and returns its admission, settlement and
    allowed decision from levels (see :class:`Compiled`).

    ``shape``: per check, its kind, whether its limit is above zero (a zero rate never
    drains) and whether it is the first check of its bucket (a bucket settles once).
    """
    params = ["RESOLVED"]
    read: list[str] = []
    levels: list[str] = []
    take: list[str] = []
    free: list[str] = []
    refund: list[str] = []
    headers: dict[str, list[str]] = {"requests": [], "tokens": []}
    for i, (kind, positive, first) in enumerate(shape):
        params += (f"K{i}", f"L{i}")
        if kind in ("requests", "tokens"):
            params += (f"R{i}", f"LIMIT{i}", f"W{i}")
            cost = "cost" if kind == "tokens" else "1"
            read.append(_RATE_READ.format(i=i, cost=cost))
            levels.append(f"\n    v{i} = float(levels[{i + LEVELS_AT}]) + {cost}")
            expires = f"now + {{level}} / R{i}" if positive else "now + 86400.0"
            take.append(_RATE_TAKE.format(i=i, expires=expires.format(level=f"v{i}")))
            if first and kind == "tokens":
                refund.append(_RATE_REFUND.format(i=i, expires=expires.format(level="level")))
            step = _HEADER.format(i=i, reset=f"v{i} * W{i} / LIMIT{i}" if positive else f"W{i}")
            pick = _FIRST if not headers[kind] else _NEXT
            headers[kind].append(step + pick.format(i=i))
        elif kind == "concurrency":
            read.append(_LEASE_READ.format(i=i))
            take.append(_LEASE_TAKE.format(i=i))
            if first:
                free.append(_LEASE_FREE.format(i=i))
        else:
            params.append(f"KEPT{i}")
            read.append(_QUOTA_READ.format(i=i))
            take.append(_QUOTA_TAKE.format(i=i))
            if first:
                refund.append(_QUOTA_REFUND.format(i=i))
    status: list[str] = []
    for kind, steps in headers.items():
        if steps:
            status += (*steps, f"\n    {kind} = RateStatus(best_l, best_r, best_t)")
        else:
            status.append(f"\n    {kind} = None")
    source = (
        f"def factory({', '.join(params)}):\n"
        "  def admit(state, now, cost, lease_id, expiry):"
        f"{''.join(read + take + status)}\n"
        "    return Decision(True, Reservation(lease_id, RESOLVED, cost), None, 0, 0, 0.0,"
        " requests, tokens)\n"
        "  def settle(state, lease_id, delta, clock):"
        f"{''.join(free)}\n"
        "    if not delta:\n"
        "        return 0\n"
        "    now = clock()\n"
        "    added = 0"
        f"{''.join(refund)}\n"
        "    return added\n"
        "  def granted(levels, cost, reservation):"
        f"{''.join(levels + status)}\n"
        "    return Decision(True, reservation, None, 0, 0, 0.0, requests, tokens)\n"
        "  return admit, settle, granted\n"
    )
    namespace: dict[str, object] = {
        "Bucket": Bucket,
        "Counter": Counter,
        "Decision": Decision,
        "EPS": EPS,
        "Leases": Leases,
        "RESET_TIE": RESET_TIE,
        "RateStatus": RateStatus,
        "Reservation": Reservation,
        "ceil": math.ceil,
    }
    exec(compile(source, f"<checks {len(shape)}>", "exec"), namespace)  # noqa: S102
    factory: Callable[..., tuple[Admit, Settle, Granted]] = namespace["factory"]  # type: ignore[assignment]
    return factory
