"""The memory limiter against a simple reference model, driven by hypothesis.

The model is written independently of the implementation: rate limits in GCRA's
virtual-scheduling form (a theoretical arrival time, TAT) in exact ``Fraction`` arithmetic,
where the implementation uses the leaky-bucket form in floats; concurrency as a plain list
of leases; quotas as a dict per month. Times are multiples of 1/1024 s so the fake clock's
floats are exact and any float disagreement is the implementation's.

The limiter's coroutines are driven by hand: they must finish without ever suspending,
which is what makes ``acquire`` atomic on an event loop. Half the requests pass the same
tuple of checks again, as the gateway does, so the limiter's compiled form of a tuple is used
across time and across the month boundary, not only built.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chatgate.ratelimit import Check, MemoryLimiter, Reservation, month_end, month_of
from chatgate.ratelimit.base import decide

T = TypeVar("T")
START = 1796083140  # 2026-11-30 23:59:00 UTC: runs cross into December
TICK = Fraction(1, 1024)
LEASE_TTL = Fraction(3)


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that must not suspend (no await between check and take)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the limiter suspended inside an operation")


class Clock:
    def __init__(self) -> None:
        self.now = Fraction(START)

    def __call__(self) -> float:
        return float(self.now)


@dataclass
class Model:
    """What the limiter should answer, in exact arithmetic."""

    tat: dict[str, Fraction] = field(default_factory=dict)
    leases: dict[str, list[tuple[str, Fraction]]] = field(default_factory=dict)
    quota: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def month(check: Check, now: Fraction) -> str:
        return check.month or month_of(float(now))

    def state(self, check: Check, now: Fraction) -> Fraction:
        """Level (rate), live leases (concurrency) or used tokens (quota) before a request."""
        if check.kind in ("requests", "tokens"):
            interval = Fraction(check.window) / check.limit
            return max(self.tat.get(check.bucket, now) - now, Fraction(0)) / interval
        if check.kind == "concurrency":
            live = [(lease, exp) for lease, exp in self.leases.get(check.bucket, []) if exp > now]
            self.leases[check.bucket] = live
            return Fraction(len(live))
        return Fraction(self.quota.get(check.scope + self.month(check, now), 0))

    def passes(self, check: Check, cost: int, now: Fraction) -> bool:
        if check.kind in ("requests", "tokens"):
            interval = Fraction(check.window) / check.limit
            tat = max(self.tat.get(check.bucket, now), now)
            return tat + cost * interval - now <= check.window
        return self.state(check, now) + cost <= check.limit

    def retry_after(self, check: Check, cost: int, now: Fraction) -> float:
        if cost > check.limit:
            return math.inf
        if check.kind in ("requests", "tokens"):
            interval = Fraction(check.window) / check.limit
            tat = max(self.tat.get(check.bucket, now), now)
            return float(tat + cost * interval - check.window - now)
        if check.kind == "quota":
            return month_end(self.month(check, now)) - float(now)
        # Concurrency: when the oldest live lease expires, at most the hint (1 s).
        live = [exp for _, exp in self.leases.get(check.bucket, []) if exp > now]
        return min(1.0, float(min(live) - now)) if live else 1.0

    def take(self, check: Check, cost: int, lease: str, now: Fraction) -> None:
        if check.kind in ("requests", "tokens"):
            interval = Fraction(check.window) / check.limit
            self.tat[check.bucket] = max(self.tat.get(check.bucket, now), now) + cost * interval
        elif check.kind == "concurrency":
            self.leases.setdefault(check.bucket, []).append((lease, now + LEASE_TTL))
        else:
            key = check.scope + self.month(check, now)
            self.quota[key] = self.quota.get(key, 0) + cost

    def settle(self, checks: tuple[Check, ...], lease: str, delta: int, now: Fraction) -> None:
        for check in dict.fromkeys(checks):  # a bucket named twice settles once
            if check.kind == "tokens":
                interval = Fraction(check.window) / check.limit
                tat = max(self.tat.get(check.bucket, now), now) + delta * interval
                self.tat[check.bucket] = max(tat, now)
            elif check.kind == "concurrency":
                kept = [(x, e) for x, e in self.leases.get(check.bucket, []) if x != lease]
                self.leases[check.bucket] = kept
            elif check.kind == "quota":
                assert check.month is not None
                key = check.scope + check.month
                self.quota[key] = max(self.quota.get(key, 0) + delta, 0)


windows = st.sampled_from([1.0, 2.0, 10.0, 60.0])


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.limiter = MemoryLimiter(clock=self.clock, lease_ttl=float(LEASE_TTL))
        self.model = Model()
        self.checks: list[Check] = []
        self.open: list[Reservation] = []
        self.tuples: dict[tuple[int, ...], tuple[Check, ...]] = {}

    @initialize(
        rpm=st.integers(1, 6),
        rpd=st.integers(1, 10),
        tpm=st.integers(1, 400),
        tpm2=st.integers(1, 400),
        conc=st.integers(0, 3),
        quota=st.integers(0, 2000),
        w=st.tuples(windows, windows, windows, windows),
    )
    def limits(
        self,
        rpm: int,
        rpd: int,
        tpm: int,
        tpm2: int,
        conc: int,
        quota: int,
        w: tuple[float, float, float, float],
    ) -> None:
        self.checks = [
            Check("key:a", "requests", rpm, w[0]),
            Check("acct:x", "requests", rpd, w[1]),
            Check("key:a", "tokens", tpm, w[2]),
            Check("acct:x", "tokens", tpm2, w[3]),
            Check.concurrent("acct:x", conc),
            Check.monthly_quota("acct:x", quota),
        ]

    @rule(ticks=st.integers(0, 6 * 1024))
    def advance(self, ticks: int) -> None:
        self.clock.now += ticks * TICK

    @rule(data=st.data(), tokens=st.integers(0, 300))
    def acquire(self, data: st.DataObject, tokens: int) -> None:
        order = data.draw(st.permutations(range(len(self.checks))))
        count = data.draw(st.integers(0, len(self.checks)))
        picked = list(order[:count])
        if picked and data.draw(st.booleans()):  # a bucket named twice: charged once
            picked.insert(
                data.draw(st.integers(0, count)), picked[data.draw(st.integers(0, count - 1))]
            )
        checks: Sequence[Check] = [self.checks[i] for i in picked]
        if data.draw(st.booleans()):  # the same tuple again, as the gateway passes a key's
            checks = self.tuples.setdefault(tuple(picked), tuple(checks))
        now = self.clock.now
        costs = [c.cost(tokens) for c in checks]
        states = [self.model.state(c, now) for c in checks]
        failing = [
            i
            for i, (c, k) in enumerate(zip(checks, costs, strict=True))
            if not self.model.passes(c, k, now)
        ]

        decision = run_now(self.limiter.acquire(checks, tokens))

        if not failing:
            assert decision.allowed, decision
            assert decision.reservation is not None
            # The headers agree with the shared rule (decide) over the model's levels.
            resolved = [c.resolved(float(now)) for c in checks]
            levels = [float(x) for x in states]
            expect = decide(resolved, levels, costs, None, 0.0, None)
            for got, want in (
                (decision.requests, expect.requests),
                (decision.tokens, expect.tokens),
            ):
                assert (got is None) == (want is None)
                if got is not None and want is not None:
                    assert (got.limit, got.remaining) == (want.limit, want.remaining)
                    assert math.isclose(got.reset_after, want.reset_after, abs_tol=1e-6)
            for check, cost in dict(zip(resolved, costs, strict=True)).items():
                self.model.take(check, cost, decision.reservation.lease_id, now)
            self.open.append(decision.reservation)
            return
        # The refusal: the first quota that refuses, else the longest wait (any of those
        # within float noise of it: the limiter takes the first of a tie).
        assert not decision.allowed
        waits = {i: self.model.retry_after(checks[i], costs[i], now) for i in failing}
        quotas = [i for i in failing if checks[i].kind == "quota"]
        if quotas:
            answering = [quotas[0]]
        else:
            longest = max(waits.values())
            answering = [i for i in failing if waits[i] >= longest - 2e-6]
        resolved = [c.resolved(float(now)) for c in checks]
        first = next(i for i in answering if resolved[i] == decision.failed)
        assert decision.used == math.ceil(states[first])
        assert decision.requested == costs[first]
        expected = waits[first]
        if expected == math.inf:
            assert decision.retry_after == math.inf
        else:
            assert math.isclose(decision.retry_after, expected, rel_tol=1e-9, abs_tol=1e-6)
        # The headers: the most restrictive of each kind, as an allowed request's (decide).
        levels = [float(x) for x in states]
        want = decide(resolved, levels, costs, first, 0.0, None)
        for got_status, want_status in (
            (decision.requests, want.requests),
            (decision.tokens, want.tokens),
        ):
            assert (got_status is None) == (want_status is None)
            if got_status is not None and want_status is not None:
                assert (got_status.limit, got_status.remaining) == (
                    want_status.limit,
                    want_status.remaining,
                )
                assert math.isclose(got_status.reset_after, want_status.reset_after, abs_tol=1e-6)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), actual=st.integers(0, 500))
    def settle(self, data: st.DataObject, actual: int) -> None:
        res = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        self.model.settle(res.checks, res.lease_id, actual - res.tokens, self.clock.now)
        assert run_now(self.limiter.settle(res, actual))
        assert not run_now(self.limiter.release(res))  # only the first settle counts

    @invariant()
    def quota_agrees(self) -> None:
        if not self.checks:
            return
        for month in ("2026-11", "2026-12"):
            used = run_now(self.limiter.quota_used("acct:x", month))
            assert used == self.model.quota.get("acct:x" + month, 0)


LimiterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_memory_limiter_matches_reference_model = LimiterMachine.TestCase
