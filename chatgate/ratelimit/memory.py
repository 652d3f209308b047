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
    RATE_KINDS,
    Check,
    Decision,
    Ledger,
    Limiter,
    Reservation,
    decide,
    month_end,
    month_of,
)

__all__ = ["MemoryLimiter"]


class _Bucket:
    """GCRA state: ``level`` units at unix time ``stamp``, draining at ``rate`` per second."""

    __slots__ = ("expires_at", "level", "rate", "stamp")

    def __init__(self, level: float, stamp: float, rate: float) -> None:
        self.level = level
        self.stamp = stamp
        self.rate = rate
        self.expires_at = stamp + level / rate if rate > 0 else stamp + 86400.0


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


def _rate(check: Check) -> float:
    return check.limit / check.window


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

    def __len__(self) -> int:
        """Number of buckets held (for tests of boundedness)."""
        return len(self._state)

    def _sweep(self, now: float, budget: int) -> None:
        state = self._state
        for _ in range(min(budget, len(state))):
            key, entry = state.popitem(last=False)
            if isinstance(entry, _Leases) and entry.prune(now) == 0:
                continue
            if not isinstance(entry, _Leases) and entry.expires_at <= now:
                continue
            state[key] = entry

    def _level(self, check: Check, now: float) -> float:
        """The state of ``check``'s bucket at ``now``, before this request."""
        entry = self._state.get(check.bucket)
        if check.kind in RATE_KINDS:
            if not isinstance(entry, _Bucket):
                return 0.0
            if check.limit <= 0:
                return entry.level
            return max(entry.level - max(now - entry.stamp, 0.0) * _rate(check), 0.0)
        if check.kind == "concurrency":
            return float(entry.prune(now)) if isinstance(entry, _Leases) else 0.0
        return float(entry.used) if isinstance(entry, _Counter) else 0.0

    def _retry(self, check: Check, level: float, cost: int, now: float) -> float:
        if cost > check.limit or (check.limit <= 0 and check.kind in RATE_KINDS):
            return float("inf")  # can never pass (a zero rate never drains)
        if check.kind in RATE_KINDS:
            return (level + cost - check.limit) / _rate(check)
        if check.kind == "concurrency":
            entry = self._state.get(check.bucket)
            if isinstance(entry, _Leases) and entry.leases:
                first = next(iter(entry.leases.values()))
                return min(self._concurrency_retry, max(first - now, 0.0))
            return self._concurrency_retry
        assert check.month is not None
        return max(month_end(check.month) - now, 0.0)

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Take every check or none; no await between check and take (atomic on one loop)."""
        now = self._clock()
        resolved = tuple(c.resolved(now) for c in checks)
        costs = [c.cost(cost_tokens) for c in resolved]
        levels = [self._level(c, now) for c in resolved]
        failed: int | None = None
        retry = 0.0
        for i, (check, level, cost) in enumerate(zip(resolved, levels, costs, strict=True)):
            if level + cost > check.limit + EPS:
                failed, retry = i, self._retry(check, level, cost, now)
                break
        reservation = None
        if failed is None:
            reservation = Reservation(secrets.token_hex(8), resolved, cost_tokens)
            for check, level, cost in zip(resolved, levels, costs, strict=True):
                self._take(check, level + cost, reservation.lease_id, now)
            self._ledger.add(reservation.lease_id)
        self._sweep(now, len(resolved) + 2)
        return decide(resolved, levels, costs, failed, retry, reservation)

    def _take(self, check: Check, after: float, lease_id: str, now: float) -> None:
        key = check.bucket
        if check.kind in RATE_KINDS:
            self._state[key] = _Bucket(after, now, _rate(check))
        elif check.kind == "concurrency":
            entry = self._state.get(key)
            if not isinstance(entry, _Leases):
                entry = self._state[key] = _Leases()
            entry.leases[lease_id] = entry.expires_at = now + self._lease_ttl
        else:
            assert check.month is not None
            self._state[key] = _Counter(int(after), month_end(check.month) + QUOTA_RETENTION)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Move token and quota usage from reserved to actual; free the concurrency slot."""
        if not self._ledger.take(reservation.lease_id):
            return False
        now = self._clock()
        delta = actual_tokens - reservation.tokens
        seen: set[str] = set()
        for check in reservation.checks:
            key = check.bucket
            if key in seen:
                continue
            seen.add(key)
            entry = self._state.get(key)
            if check.kind == "concurrency":
                if isinstance(entry, _Leases):
                    entry.leases.pop(reservation.lease_id, None)
            elif check.kind == "tokens" and delta:
                level = self._level(check, now) + delta
                if level > 0:
                    self._state[key] = _Bucket(level, now, _rate(check))
                else:
                    self._state.pop(key, None)
            elif check.kind == "quota" and delta:
                used = max((entry.used if isinstance(entry, _Counter) else 0) + delta, 0)
                assert check.month is not None
                self._state[key] = _Counter(used, month_end(check.month) + QUOTA_RETENTION)
        self._sweep(now, len(seen) + 2)
        return True

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: the clock's month)."""
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        entry = self._state.get(check.bucket)
        return entry.used if isinstance(entry, _Counter) else 0

    async def reset(self, scope: str) -> None:
        """Forget every bucket of ``scope`` (O(number of buckets); admin and tests)."""
        prefix = scope + "|"
        for key in [k for k in self._state if k.startswith(prefix)]:
            del self._state[key]
