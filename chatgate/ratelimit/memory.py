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
        self.set(level, stamp, rate)

    def set(self, level: float, stamp: float, rate: float) -> None:
        """Move to a new state (in place: cheaper than a new object in the same dict slot)."""
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
            if not isinstance(entry, _Bucket):
                return 0.0
            if check.limit <= 0:
                return entry.level
            return max(entry.level - max(now - entry.stamp, 0.0) * check.rate, 0.0)
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

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Take every check or none; no await between check and take (atomic on one loop).

        One pass reads each bucket's level (keeping the entry found), a second takes them
        all: the hot path of every limited request, so written out inline.
        """
        now = self._clock()
        state = self._state
        resolved = tuple([c.resolved(now) if c.floating else c for c in checks])
        levels: list[float] = []
        costs: list[int] = []
        entries: list[_Entry | None] = []
        for i, check in enumerate(resolved):
            cost = cost_tokens if check.charges_tokens else 1
            entry = state.get(check.key)
            if check.is_rate:
                if not isinstance(entry, _Bucket):
                    entry, level = None, 0.0
                else:
                    level = entry.level
                    elapsed = now - entry.stamp
                    if elapsed > 0.0 and check.limit > 0:
                        level -= elapsed * check.rate
                        if level < 0.0:
                            level = 0.0
            elif check.kind == "concurrency":
                if isinstance(entry, _Leases):
                    level = float(entry.prune(now))
                else:
                    entry, level = None, 0.0
            elif isinstance(entry, _Counter):
                level = float(entry.used)
            else:
                entry, level = None, 0.0
            levels.append(level)
            costs.append(cost)
            entries.append(entry)
            if level + cost > check.limit + EPS:
                retry = self._retry(check, level, cost, now)
                for later in resolved[i + 1 :]:  # the rest only for the headers
                    levels.append(self._level(later, now))
                    costs.append(cost_tokens if later.charges_tokens else 1)
                self._sweep(now, 2)
                return decide(resolved, levels, costs, i, retry, None)
        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        added = 0
        for check, level, cost, entry in zip(resolved, levels, costs, entries, strict=True):
            if check.is_rate:
                if entry is not None:
                    entry.set(level + cost, now, check.rate)  # type: ignore[union-attr]
                else:
                    state[check.key] = _Bucket(level + cost, now, check.rate)
                    added += 1
            elif check.kind == "concurrency":
                if entry is None:
                    entry = state[check.key] = _Leases()
                    added += 1
                entry.leases[lease_id] = entry.expires_at = now + self._lease_ttl  # type: ignore[union-attr]
            elif entry is not None:
                entry.used = int(level + cost)  # type: ignore[union-attr]
            else:
                assert check.month is not None
                expiry = month_end(check.month) + QUOTA_RETENTION
                state[check.key] = _Counter(int(level + cost), expiry)
                added += 1
        self._ledger.add(lease_id, now)
        # Look at two more entries than this call added: stale ones are found within a pass,
        # itself done in len(state) / 2 admissions (settlements sweep only what they add).
        self._sweep(now, added + 2)
        reservation = Reservation(lease_id, resolved, cost_tokens)
        return decide(resolved, levels, costs, None, 0.0, reservation)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Move token and quota usage from reserved to actual; free the concurrency slot."""
        if not self._ledger.take(reservation.lease_id):
            return False
        delta = actual_tokens - reservation.tokens
        state = self._state
        now = 0.0
        seen: set[str] = set()
        added = 0
        for check in reservation.checks:
            kind = check.kind
            if kind == "requests" or (not delta and kind != "concurrency"):
                continue  # nothing to give back or charge
            key = check.key
            if key in seen:
                continue
            seen.add(key)
            entry = state.get(key)
            if kind == "concurrency":
                if isinstance(entry, _Leases):
                    entry.leases.pop(reservation.lease_id, None)
                continue
            now = now or self._clock()
            if kind == "tokens":
                level = self._level(check, now) + delta
                if level <= 0:
                    state.pop(key, None)
                elif isinstance(entry, _Bucket):
                    entry.set(level, now, check.rate)
                else:
                    state[key] = _Bucket(level, now, check.rate)
                    added += 1
            elif isinstance(entry, _Counter):  # quota
                entry.used = max(entry.used + delta, 0)
            else:
                assert check.month is not None
                state[key] = _Counter(max(delta, 0), month_end(check.month) + QUOTA_RETENTION)
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
