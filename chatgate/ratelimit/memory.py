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

import math
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
    Decision,
    Ledger,
    Limiter,
    Reservation,
    decide,
    month_end,
    month_of,
    month_span,
    most_restrictive,
)

__all__ = ["MemoryLimiter"]


class _Bucket:
    """GCRA state: ``level`` units at unix time ``stamp``; empty again at ``expires_at``."""

    __slots__ = ("expires_at", "level", "stamp")

    def __init__(self, level: float, stamp: float, rate: float) -> None:
        self.set(level, stamp, rate)

    def set(self, level: float, stamp: float, rate: float) -> None:
        """Move to a new state (in place: cheaper than a new object in the same dict slot)."""
        self.level = level
        self.stamp = stamp
        self.expires_at = stamp + level / rate if rate > 0 else stamp + 86400.0

    def at(self, now: float, rate: float) -> float:
        """The level at ``now``, drained at ``rate`` (a check's: a plan change moves it)."""
        return max(self.level - max(now - self.stamp, 0.0) * rate, 0.0)


class _Leases:
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


class _Counter:
    """A month's quota counter."""

    __slots__ = ("expires_at", "used")

    def __init__(self, used: int, expires_at: float) -> None:
        self.used = used
        self.expires_at = expires_at


_Entry = _Bucket | _Leases | _Counter

_MAX_PROGRAMS = 20_000
"""Compiled check tuples kept (two entries per key: its checks and their resolved form)."""


class _Program:
    """A tuple of checks as :meth:`MemoryLimiter.acquire` reads it, for one quota month.

    Per kind, the bucket key, the limit with the float tolerance added, and what the step
    needs: a rate's drain per second, whether it charges tokens and its resolved check (for
    the headers); a quota's expiry. For :meth:`MemoryLimiter.settle`, the buckets that give
    tokens back: each token bucket and quota once (a repeated bucket is settled once).
    """

    __slots__ = (
        "checks",
        "leases",
        "quota_refunds",
        "quotas",
        "rates",
        "refunds",
        "resolved",
        "since",
        "until",
    )

    def __init__(self, checks: Sequence[Check], now: float) -> None:
        self.checks = checks
        self.since, self.until = -math.inf, math.inf
        if any(check.floating for check in checks):
            self.since, self.until, _ = month_span(now)
        self.resolved = tuple(check.resolved(now) for check in checks)
        seen: set[str] = set()
        rates: list[tuple[str, float, float, bool, Check]] = []
        leases: list[tuple[str, float]] = []
        quotas: list[tuple[str, float, float]] = []
        refunds: list[tuple[str, float]] = []
        quota_refunds: list[tuple[str, float]] = []
        for check in self.resolved:
            key, limit, first = check.key, check.limit + EPS, check.key not in seen
            seen.add(key)
            if check.is_rate:
                rates.append((key, limit, check.rate, check.charges_tokens, check))
                if first and check.charges_tokens:
                    refunds.append((key, check.rate))
            elif check.kind == "concurrency":
                leases.append((key, limit))
            else:
                assert check.month is not None
                kept_until = month_end(check.month) + QUOTA_RETENTION
                quotas.append((key, limit, kept_until))
                if first:
                    quota_refunds.append((key, kept_until))
        self.rates, self.leases, self.quotas = tuple(rates), tuple(leases), tuple(quotas)
        self.refunds, self.quota_refunds = tuple(refunds), tuple(quota_refunds)


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
        self._lease_ttl = lease_ttl
        self._concurrency_retry = concurrency_retry
        self._state: OrderedDict[str, _Entry] = OrderedDict()
        self._ledger = Ledger(clock)
        self._programs: dict[int, _Program] = {}  # by id() of a checks tuple (see _program)
        self._sweep_due = 0  # entries the admissions owe the sweep (see acquire)
        # Lease ids: a random prefix per limiter and a counter (unique, and no syscall each).
        self._lease_prefix = secrets.token_hex(6) + "-"
        self._leases_issued = 0

    def __len__(self) -> int:
        """Number of buckets held (for tests of boundedness)."""
        return len(self._state)

    def _sweep(self, now: float, budget: int) -> None:
        state = self._state
        for _ in range(min(budget, len(state))):
            key, entry = state.popitem(last=False)
            if isinstance(entry, _Leases):
                if entry.prune(now) == 0:
                    continue
            elif entry.expires_at <= now:
                continue
            state[key] = entry

    def _level(self, check: Check, now: float) -> float:
        """The state of ``check``'s bucket at ``now``, before this request."""
        entry = self._state.get(check.key)
        if check.is_rate:
            return entry.at(now, check.rate) if isinstance(entry, _Bucket) else 0.0
        if check.kind == "concurrency":
            return float(entry.prune(now)) if isinstance(entry, _Leases) else 0.0
        return float(entry.used) if isinstance(entry, _Counter) else 0.0

    def _retry(self, check: Check, level: float, cost: int, now: float) -> float:
        if cost > check.limit or (check.limit <= 0 and check.is_rate):
            return float("inf")  # can never pass (a zero rate never drains)
        if check.is_rate:
            return (level + cost - check.limit) / check.rate
        if check.kind == "concurrency":
            entry = self._state.get(check.key)
            if isinstance(entry, _Leases) and entry.leases:
                first = next(iter(entry.leases.values()))
                return min(self._concurrency_retry, max(first - now, 0.0))
            return self._concurrency_retry
        assert check.month is not None
        return max(month_end(check.month) - now, 0.0)

    def _program(self, checks: Sequence[Check], now: float) -> _Program:
        """``checks`` compiled for ``now``'s month: kept for a tuple (the gateway passes the
        same tuple for every request of a key), built afresh for anything else. (The kept
        one is looked up inline by :meth:`acquire`.)"""
        program = _Program(checks, now)
        if isinstance(checks, tuple):  # immutable: safe to keep by identity
            if len(self._programs) >= _MAX_PROGRAMS:
                self._programs.clear()  # rebuilt on their next request: cheap
            self._programs[id(checks)] = program
            self._programs[id(program.resolved)] = program  # for settle(), by its reservation
        return program

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Take every check or none; no await between check and take (atomic on one loop).

        The hot path of every limited request, so written out inline over the checks'
        precompiled form (:class:`_Program`): one pass reads each bucket's level and stops at
        the first that would overflow, a second takes them all. A refusal is worked out again
        in full by :meth:`_refuse`, in the checks' own order.
        """
        now = self._clock()
        program = self._programs.get(id(checks))
        if (
            program is None
            or program.checks is not checks
            or not program.since <= now < program.until
        ):
            program = self._program(checks, now)
        state = self._state
        buckets: list[_Bucket | None] = []
        levels: list[float] = []  # each rate bucket's level after this request
        for key, limit, rate, tokens, _ in program.rates:
            bucket: _Bucket | None = state.get(key)  # type: ignore[assignment]
            level: float = cost_tokens if tokens else 1
            if bucket is not None:
                drained = bucket.level
                elapsed = now - bucket.stamp
                if elapsed > 0.0:
                    drained -= elapsed * rate
                if drained > 0.0:
                    level += drained
            if level > limit:
                return self._refuse(program.resolved, cost_tokens, now)
            buckets.append(bucket)
            levels.append(level)
        lease_entries: list[_Leases | None] = []
        for key, limit in program.leases:
            leases: _Leases | None = state.get(key)  # type: ignore[assignment]
            if (leases.live(now) if leases is not None else 0) + 1 > limit:
                return self._refuse(program.resolved, cost_tokens, now)
            lease_entries.append(leases)
        quota_used: list[int] = []
        quota_entries: list[_Counter | None] = []
        for key, limit, _ in program.quotas:
            counter: _Counter | None = state.get(key)  # type: ignore[assignment]
            used = counter.used if counter is not None else 0
            if used + cost_tokens > limit:
                return self._refuse(program.resolved, cost_tokens, now)
            quota_used.append(used)
            quota_entries.append(counter)

        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        added = 0
        # (check, level after) per kind, in the checks' order: what the headers are made of.
        requests: list[tuple[Check, float]] = []
        charged: list[tuple[Check, float]] = []
        for (key, _, rate, tokens, check), bucket, level in zip(
            program.rates, buckets, levels, strict=True
        ):
            (charged if tokens else requests).append((check, level))
            if bucket is not None:  # _Bucket.set, written out
                bucket.level = level
                bucket.stamp = now
                bucket.expires_at = now + level / rate if rate > 0 else now + 86400.0
            else:
                state[key] = _Bucket(level, now, rate)
                added += 1
        expiry = now + self._lease_ttl
        for (key, _), leases in zip(program.leases, lease_entries, strict=True):
            if leases is None:
                leases = state[key] = _Leases()
                added += 1
            leases.add(lease_id, expiry)
        for (key, _, kept_until), used, counter in zip(
            program.quotas, quota_used, quota_entries, strict=True
        ):
            if counter is not None:
                counter.used = used + cost_tokens  # set, not add: a repeated check charges once
            else:
                state[key] = _Counter(used + cost_tokens, kept_until)
                added += 1
        self._ledger.add(lease_id, now)
        # Look at two more entries than this call added (in batches: one call per few
        # admissions): stale ones are found within a pass, itself done in len(state) / 2
        # admissions (settlements sweep only what they add).
        self._sweep_due += added + 2
        if self._sweep_due >= _SWEEP_BATCH:
            self._sweep(now, self._sweep_due)
            self._sweep_due = 0
        return Decision(  # positional (allowed, reservation, failed, used, requested, retry)
            True,
            Reservation(lease_id, program.resolved, cost_tokens),
            None,
            0,
            0,
            0.0,
            most_restrictive(requests) if requests else None,
            most_restrictive(charged) if charged else None,
        )

    def _refuse(self, resolved: tuple[Check, ...], cost_tokens: int, now: float) -> Decision:
        """The refusal for checks one of which fails: the first failing one, in their order."""
        levels = [self._level(check, now) for check in resolved]
        costs = [cost_tokens if check.charges_tokens else 1 for check in resolved]
        failed = next(
            i for i, check in enumerate(resolved) if levels[i] + costs[i] > check.limit + EPS
        )
        retry = self._retry(resolved[failed], levels[failed], costs[failed], now)
        self._sweep(now, 2)
        return decide(resolved, levels, costs, failed, retry, None)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Move token and quota usage from reserved to actual; free the concurrency slot."""
        if not self._ledger.take(reservation.lease_id):
            return False
        program = self._programs.get(id(reservation.checks))
        if program is None or program.resolved is not reservation.checks:
            program = _Program(reservation.checks, 0.0)  # resolved already: any time will do
        state = self._state
        lease_id = reservation.lease_id
        for key, _ in program.leases:
            leases: _Leases | None = state.get(key)  # type: ignore[assignment]
            if leases is not None:
                leases.leases.pop(lease_id, None)
        delta = actual_tokens - reservation.tokens
        if not delta:
            return True
        now = self._clock()
        added = 0
        for key, rate in program.refunds:
            bucket: _Bucket | None = state.get(key)  # type: ignore[assignment]
            level = delta + (bucket.at(now, rate) if bucket is not None else 0.0)
            if level <= 0:
                state.pop(key, None)
            elif bucket is not None:
                bucket.set(level, now, rate)
            else:
                state[key] = _Bucket(level, now, rate)
                added += 1
        for key, kept_until in program.quota_refunds:
            counter: _Counter | None = state.get(key)  # type: ignore[assignment]
            if counter is not None:
                counter.used = max(counter.used + delta, 0)
            else:
                state[key] = _Counter(max(delta, 0), kept_until)
                added += 1
        if added:  # the admissions' sweep covers the rest
            self._sweep(now, added + 1)
        return True

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: the clock's month)."""
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        entry = self._state.get(check.key)
        return entry.used if isinstance(entry, _Counter) else 0

    async def reset(self, scope: str) -> None:
        """Forget every bucket of ``scope`` (O(number of buckets); admin and tests)."""
        prefix = scope + "|"
        for key in [k for k in self._state if k.startswith(prefix)]:
            del self._state[key]
