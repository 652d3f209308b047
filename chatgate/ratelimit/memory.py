"""The in-process limiter: the default for one process, and the fail-open fallback.

Same algorithms as :mod:`.base` describes (GCRA leaky-bucket form, leased concurrency slots,
monthly counters), as plain Python. ``acquire`` never awaits between checking and taking,
so on one event loop it is atomic without locks. Every operation is O(1) per check.

Memory stays bounded: all state lives in one insertion-ordered dict, and each call looks at
a few entries at its front, dropping those that have expired (a drained bucket, a set of
expired leases, a month counter past retention) and rotating the rest to the back: a clock
sweep, so each stale entry is found within one pass over the dict.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .base import (
    DEFAULT_CONCURRENCY_RETRY,
    DEFAULT_LEASE_TTL,
    EPS,
    QUOTA_RETENTION,
    Check,
    CompiledChecks,
    Decision,
    Ledger,
    Limiter,
    Reservation,
    Seed,
    answers_refusal,
    decide,
    month_end,
    month_of,
)
from .program import Bucket, Counter, Entry, Leases, Program

__all__ = ["MemoryLimiter"]


_SWEEP_BATCH = 16
"""Entries the admissions' sweep looks at in one go (two per admission, on average)."""


class MemoryLimiter(Limiter):
    """Per-process limits. ``clock`` is unix time (injectable for deterministic tests)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        concurrency_retry: float = DEFAULT_CONCURRENCY_RETRY,
    ) -> None:
        self._clock = clock
        self.lease_ttl = lease_ttl
        self._concurrency_retry = concurrency_retry
        self._state: OrderedDict[str, Entry] = OrderedDict()
        self._ledger = Ledger(clock)
        self._programs = CompiledChecks(Program)  # a key's checks, compiled (see .program)
        self._sweep_due = 0  # entries the admissions owe the sweep (see acquire)
        # Lease ids: a random prefix per limiter and a counter (unique, and no syscall each).
        self._lease_prefix = secrets.token_hex(6) + "-"
        self._leases_issued = 0
        self._seeded: set[str] = set()  # months whose quota counters were seeded

    def __len__(self) -> int:
        """Number of buckets held (for tests of boundedness)."""
        return len(self._state)

    def _sweep(self, now: float, budget: int) -> None:
        state = self._state
        for _ in range(min(budget, len(state))):
            key, entry = state.popitem(last=False)
            if isinstance(entry, Leases):
                if entry.prune(now) == 0:
                    continue
            elif entry.expires_at <= now:
                continue
            state[key] = entry

    def _level(self, check: Check, now: float) -> float:
        """The state of ``check``'s bucket at ``now``, before this request."""
        entry = self._state.get(check.key)
        if check.is_rate:
            return entry.at(now, check.rate) if isinstance(entry, Bucket) else 0.0
        if check.kind == "concurrency":
            return float(entry.prune(now)) if isinstance(entry, Leases) else 0.0
        return float(entry.used) if isinstance(entry, Counter) else 0.0

    def _retry(self, check: Check, level: float, cost: int, now: float) -> float:
        if cost > check.limit or (check.limit <= 0 and check.is_rate):
            return float("inf")  # can never pass (a zero rate never drains)
        if check.is_rate:
            return (level + cost - check.limit) / check.rate
        if check.kind == "concurrency":
            entry = self._state.get(check.key)
            if isinstance(entry, Leases) and entry.leases:
                first = next(iter(entry.leases.values()))
                return min(self._concurrency_retry, max(first - now, 0.0))
            return self._concurrency_retry
        assert check.month is not None
        return max(month_end(check.month) - now, 0.0)

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Take every check or none; no await between check and take (atomic on one loop).

        The hot path of every limited request: the checks' compiled admission
        (:func:`.program.compile_checks`) reads each bucket and stops at the first that
        would overflow, or takes them all and works out the headers. A refusal is worked out
        again in full by :meth:`_refuse`, over every check.
        """
        now = self._clock()
        program = self._programs.for_checks(checks, now)
        state = self._state
        size = len(state)
        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        decision = program.admit(state, now, cost_tokens, lease_id, now + self.lease_ttl)
        if decision is None:
            return self._refuse(program.resolved, cost_tokens, now)
        self._ledger.add(decision.reservation, now)  # type: ignore[arg-type]  # granted: set
        # Look at two more entries than this call added (in batches: one call per few
        # admissions): stale ones are found within a pass, itself done in len(state) / 2
        # admissions (settlements sweep only what they add).
        self._sweep_due += len(state) - size + 2
        if self._sweep_due >= _SWEEP_BATCH:
            self._sweep(now, self._sweep_due)
            self._sweep_due = 0
        return decision

    def _refuse(self, resolved: tuple[Check, ...], cost_tokens: int, now: float) -> Decision:
        """The refusal for checks one of which fails: of all those that fail, the one
        :func:`.base.answers_refusal` picks (a quota, else the longest wait)."""
        levels = [self._level(check, now) for check in resolved]
        for i, check in enumerate(resolved):
            if check.kind == "requests" and levels[i] > check.limit > 0:
                # Over its limit: the limit was lowered (a plan change). What the bucket holds
                # beyond it is forgotten, so the wait is never longer than one window.
                levels[i] = float(check.limit)
                self._state[check.key] = Bucket(levels[i], now, check.rate)
        costs = [cost_tokens if check.charges_tokens else 1 for check in resolved]
        failed, retry = -1, 0.0
        for i, check in enumerate(resolved):
            if levels[i] + costs[i] > check.limit + EPS:
                wait = self._retry(check, levels[i], costs[i], now)
                if answers_refusal(check, wait, resolved[failed] if failed >= 0 else None, retry):
                    failed, retry = i, wait
        self._sweep(now, 2)
        return decide(resolved, levels, costs, failed, retry, None)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Move token and quota usage from reserved to actual; free the concurrency slot."""
        if not self._ledger.take(reservation.lease_id):
            return False
        program = self._programs.for_resolved(reservation.checks)
        added = program.settle(
            self._state, reservation.lease_id, actual_tokens - reservation.tokens, self._clock
        )
        if added:  # the admissions' sweep covers the rest
            self._sweep(self._clock(), added + 1)
        return True

    def renew_leases(self, age: float) -> int:
        """Hold the slots of the reservations open for more than ``age`` seconds a full TTL
        from now (see :meth:`.Limiter.renew_leases`)."""
        held = self._ledger.older_than(age)
        expiry = self._clock() + self.lease_ttl
        for reservation in held:
            for check in reservation.checks:
                if check.kind == "concurrency":
                    entry = self._state.get(check.key)
                    if isinstance(entry, Leases):
                        entry.renew(reservation.lease_id, expiry)
        return len(held)

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: the clock's month)."""
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        entry = self._state.get(check.key)
        return entry.used if isinstance(entry, Counter) else 0

    async def seeded(self, month: str) -> bool:
        """Whether :meth:`seed` ran for ``month`` in this limiter (its memory began empty)."""
        return month in self._seeded

    async def seed(self, seed: Seed) -> None:
        """Raise each quota counter (less the open reservations it holds, which the records
        cannot hold yet) and rate bucket of ``seed`` to at least its value."""
        state = self._state
        kept = month_end(seed.month) + QUOTA_RETENTION
        held = self._ledger.held() if seed.quotas else {}
        for scope, tokens in seed.quotas.items():
            key = Check.monthly_quota(scope, 0, seed.month).key
            entry = state.get(key)
            at_least = tokens + held.get(key, 0)
            if isinstance(entry, Counter):
                entry.used = max(entry.used, at_least)
            else:
                state[key] = Counter(at_least, kept)
        now = self._clock()
        for check, level in seed.rates:
            entry = state.get(check.key)
            if level > (entry.at(now, check.rate) if isinstance(entry, Bucket) else 0.0):
                state[check.key] = Bucket(level, now, check.rate)
        if seed.whole:
            self._seeded.add(seed.month)

    async def reset(self, scope: str) -> None:
        """Forget every bucket of ``scope`` (O(number of buckets); admin and tests)."""
        prefix = scope + "|"
        for key in [k for k in self._state if k.startswith(prefix)]:
            del self._state[key]
