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
    RateStatus,
    Reservation,
    decide,
    month_end,
    month_of,
    month_span,
    most_restrictive,
    rate_status,
)

__all__ = ["MemoryLimiter"]


class _Bucket:
    """GCRA state: ``level`` units at unix time ``stamp``, draining at ``rate`` per second."""

    __slots__ = ("expires_at", "level", "rate", "stamp")

    def __init__(self, level: float, stamp: float, rate: float) -> None:
        self.set(level, stamp, rate)

    def set(self, level: float, stamp: float, rate: float) -> None:
        """Move to a new state (in place: cheaper than a new object in the same dict slot)."""
        self.level = level
        self.stamp = stamp
        self.rate = rate
        self.expires_at = stamp + level / rate if rate > 0 else stamp + 86400.0

    def at(self, now: float, rate: float) -> float:
        """The level at ``now``, drained at ``rate`` (a check's: a plan change moves it)."""
        return max(self.level - max(now - self.stamp, 0.0) * rate, 0.0)


class _Leases:
    """Concurrency slots: lease id -> expiry, in expiry order (one TTL for all)."""

    __slots__ = ("expires_at", "leases")

    def __init__(self) -> None:
        self.leases: dict[str, float] = {}
        self.expires_at = 0.0

    def prune(self, now: float) -> int:
        """Drop expired leases (from the front: amortised O(1)); the live count."""
        leases = self.leases
        while leases:
            lease, expiry = next(iter(leases.items()))
            if expiry > now:
                break
            del leases[lease]
        return len(leases)


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
    needs: a rate's drain per second and whether it charges tokens; a quota's expiry. Plus
    which rate checks answer the requests and the tokens headers, and which buckets appear
    first (``first``: a repeated bucket is settled once).
    """

    __slots__ = (
        "checks",
        "leases",
        "quotas",
        "rates",
        "requests",
        "resolved",
        "resolved_rates",
        "since",
        "tokens",
        "until",
    )

    def __init__(self, checks: Sequence[Check], now: float) -> None:
        self.checks = checks
        self.since, self.until = -math.inf, math.inf
        if any(check.floating for check in checks):
            self.since, self.until, _ = month_span(now)
        self.resolved = tuple(check.resolved(now) for check in checks)
        seen: set[str] = set()
        rates: list[tuple[str, float, float, bool, bool]] = []
        rate_checks: list[Check] = []
        leases: list[tuple[str, float]] = []
        quotas: list[tuple[str, float, float, bool]] = []
        for check in self.resolved:
            key, limit, first = check.key, check.limit + EPS, check.key not in seen
            seen.add(key)
            if check.is_rate:
                rates.append((key, limit, check.rate, check.charges_tokens, first))
                rate_checks.append(check)
            elif check.kind == "concurrency":
                leases.append((key, limit))
            else:
                assert check.month is not None
                quotas.append((key, limit, month_end(check.month) + QUOTA_RETENTION, first))
        self.rates, self.leases, self.quotas = tuple(rates), tuple(leases), tuple(quotas)
        self.resolved_rates = tuple(rate_checks)
        self.requests = tuple(i for i, c in enumerate(rate_checks) if c.kind == "requests")
        self.tokens = tuple(i for i, c in enumerate(rate_checks) if c.kind == "tokens")

    def status(self, group: tuple[int, ...], after: list[float]) -> RateStatus | None:
        """Header values for one kind's rate checks (indices ``group``), at levels ``after``."""
        if len(group) == 1:  # the usual plan: no choice to make
            return rate_status(self.resolved_rates[group[0]], after[group[0]])
        return most_restrictive((self.resolved_rates[i], after[i]) for i in group)


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
        same tuple for every request of a key), built afresh for anything else."""
        program = self._programs.get(id(checks))
        if (
            program is not None
            and program.checks is checks
            and program.since <= now < program.until
        ):
            return program
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
        program = self._program(checks, now)
        state = self._state
        rate_levels: list[float] = []
        rate_entries: list[_Bucket | None] = []
        for key, limit, rate, tokens, _ in program.rates:
            bucket = state.get(key)
            if bucket is None:
                level = 0.0
            else:
                level = bucket.level  # type: ignore[union-attr]
                elapsed = now - bucket.stamp  # type: ignore[union-attr]
                if elapsed > 0.0:
                    level -= elapsed * rate
                    if level < 0.0:
                        level = 0.0
            if level + (cost_tokens if tokens else 1) > limit:
                return self._refuse(program.resolved, cost_tokens, now)
            rate_levels.append(level)
            rate_entries.append(bucket)  # type: ignore[arg-type]
        lease_entries: list[_Leases | None] = []
        for key, limit in program.leases:
            leases = state.get(key)
            if (leases.prune(now) if leases is not None else 0) + 1 > limit:  # type: ignore[union-attr]
                return self._refuse(program.resolved, cost_tokens, now)
            lease_entries.append(leases)  # type: ignore[arg-type]
        quota_used: list[int] = []
        quota_entries: list[_Counter | None] = []
        for key, limit, _, _ in program.quotas:
            counter = state.get(key)
            used = counter.used if counter is not None else 0  # type: ignore[union-attr]
            if used + cost_tokens > limit:
                return self._refuse(program.resolved, cost_tokens, now)
            quota_used.append(used)
            quota_entries.append(counter)  # type: ignore[arg-type]

        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        added = 0
        after: list[float] = []
        for (key, _, rate, tokens, _), level, bucket in zip(
            program.rates, rate_levels, rate_entries, strict=True
        ):
            level += cost_tokens if tokens else 1
            after.append(level)
            if bucket is not None:
                bucket.set(level, now, rate)
            else:
                state[key] = _Bucket(level, now, rate)
                added += 1
        expiry = now + self._lease_ttl
        for (key, _), leases in zip(program.leases, lease_entries, strict=True):
            if leases is None:
                leases = state[key] = _Leases()
                added += 1
            leases.leases[lease_id] = leases.expires_at = expiry
        for (key, _, kept_until, _), used, counter in zip(
            program.quotas, quota_used, quota_entries, strict=True
        ):
            if counter is not None:
                counter.used = used + cost_tokens  # set, not add: a repeated check charges once
            else:
                state[key] = _Counter(used + cost_tokens, kept_until)
                added += 1
        self._ledger.add(lease_id, now)
        # Look at two more entries than this call added: stale ones are found within a pass,
        # itself done in len(state) / 2 admissions (settlements sweep only what they add).
        self._sweep(now, added + 2)
        return Decision(  # positional (allowed, reservation, failed, used, requested, retry)
            True,
            Reservation(lease_id, program.resolved, cost_tokens),
            None,
            0,
            0,
            0.0,
            program.status(program.requests, after),
            program.status(program.tokens, after),
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
        delta = actual_tokens - reservation.tokens
        program = self._programs.get(id(reservation.checks))
        if program is None or program.resolved is not reservation.checks:
            program = _Program(reservation.checks, 0.0)  # resolved already: any time will do
        state = self._state
        lease_id = reservation.lease_id
        for key, _ in program.leases:
            leases = state.get(key)
            if leases is not None:
                leases.leases.pop(lease_id, None)  # type: ignore[union-attr]
        if not delta:
            return True
        now = self._clock()
        added = 0
        for key, _, rate, tokens, first in program.rates:
            if not tokens or not first:  # requests: nothing to give back; a repeat: done
                continue
            bucket = state.get(key)
            level = delta + (bucket.at(now, rate) if bucket is not None else 0.0)  # type: ignore[union-attr]
            if level <= 0:
                state.pop(key, None)
            elif bucket is not None:
                bucket.set(level, now, rate)  # type: ignore[union-attr]
            else:
                state[key] = _Bucket(level, now, rate)
                added += 1
        for key, _, kept_until, first in program.quotas:
            if not first:
                continue
            counter = state.get(key)
            if counter is not None:
                counter.used = max(counter.used + delta, 0)  # type: ignore[union-attr]
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
