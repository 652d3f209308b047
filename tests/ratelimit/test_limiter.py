"""One suite for every limiter: each test runs on the memory and the Redis implementation.

Redis is the real server at 127.0.0.1:6379; each test gets its own random key prefix and
deletes its keys afterwards. Time-travel tests use the memory limiter's injectable clock
(Redis tests never wait on or assert wall-clock durations).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

import chatgate.ratelimit as rl
from chatgate.limits import Admission, Limits, headers_for, refusal
from chatgate.ratelimit import (
    Check,
    FailoverLimiter,
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    Reservation,
    Seed,
    month_end,
    month_of,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
NOV_30_LATE = 1796083140.0  # 2026-11-30 23:59:00 UTC


class FakeClock:
    def __init__(self, now: float = 1795000000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A limiter factory for one backend; ``travel`` exists only where time is ours."""

    backend: str
    clock: FakeClock | None = None
    prefix: str = ""
    made: list[Limiter] = field(default_factory=list)
    clients: list[aioredis.Redis] = field(default_factory=list)

    def make(self, lease_ttl: float = 900.0) -> Limiter:
        limiter: Limiter
        if self.backend == "memory":
            assert self.clock is not None
            limiter = MemoryLimiter(clock=self.clock, lease_ttl=lease_ttl)
        else:
            # Generous timeouts: the test machine is small and shared.
            limiter = RedisLimiter.from_url(
                REDIS_URL, prefix=self.prefix, lease_ttl=lease_ttl, connect_timeout=2.0, timeout=2.0
            )
        self.made.append(limiter)
        return limiter

    def travel(self, seconds: float) -> None:
        if self.clock is None:
            pytest.skip("time travel needs the memory limiter's clock")
        self.clock.now += seconds


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


REDIS_UP = _redis_up()


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        yield Harness("memory", clock=FakeClock())
        return
    if not REDIS_UP:
        pytest.skip("no Redis at 127.0.0.1:6379")
    h = Harness("redis", prefix=f"test:rl:{secrets.token_hex(6)}:")
    try:
        yield h
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=h.prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        for c in h.clients:
            await c.aclose()
        for lim in h.made:
            await lim.aclose()


@pytest.fixture
def limiter(harness: Harness) -> Limiter:
    return harness.make()


async def take(limiter: Limiter, checks: list[Check], tokens: int = 0) -> Reservation:
    decision = await limiter.acquire(checks, tokens)
    assert decision.allowed, decision
    assert decision.reservation is not None
    return decision.reservation


# --- admission -------------------------------------------------------------------------


async def test_exact_admission_then_rejection(limiter: Limiter) -> None:
    checks = [Check.rpm("key:a", 5)]
    for i in range(5):
        d = await limiter.acquire(checks)
        assert d.allowed
        assert d.requests is not None
        assert (d.requests.limit, d.requests.remaining) == (5, 4 - i)
    d = await limiter.acquire(checks)
    assert not d.allowed
    assert d.reservation is None
    assert d.failed == checks[0]
    assert (d.limit, d.used, d.remaining, d.requested) == (5, 5, 0, 1)
    # One request drains every 60/5 = 12 s; a little time passed on a real clock.
    assert 11.0 < d.retry_after <= 12.0
    assert d.requests is not None and d.requests.remaining == 0
    assert 59.0 < d.requests.reset_after <= 60.0


async def test_tokens_admission_and_retry_after(limiter: Limiter) -> None:
    checks = [Check.tpm("key:a", 100)]
    await take(limiter, checks, 40)
    await take(limiter, checks, 40)
    d = await limiter.acquire(checks, 40)
    assert not d.allowed
    assert (d.used, d.requested, d.limit) == (80, 40, 100)
    assert 11.0 < d.retry_after <= 12.0  # (80 + 40 - 100) tokens at 100 per 60 s
    assert d.tokens is not None and d.tokens.remaining == 20


async def test_request_larger_than_limit_can_never_pass(limiter: Limiter) -> None:
    d = await limiter.acquire([Check.tpm("key:a", 100)], 150)
    assert not d.allowed
    assert d.retry_after == math.inf
    d = await limiter.acquire([Check.concurrent("key:a", 0)])
    assert not d.allowed and d.retry_after == math.inf


async def test_a_limit_of_0_is_refused_for_good_in_its_own_words(limiter: Limiter) -> None:
    # A plan (or key) with rpm, rpd or concurrency 0 admits nothing, ever: the 429 says
    # which limit and tells the client not to retry; only a token limit asks for fewer
    # tokens.
    for check in (Check.rpm("key:a", 0), Check.rpd("key:a", 0), Check.concurrent("key:a", 0)):
        error = refusal(await limiter.acquire([check], 10), "gpt-test")
        assert error.headers["x-should-retry"] == "false", check
        assert "retry-after" not in error.headers
        assert "tokens must be reduced" not in error.message, error.message
        assert "Limit 0" in error.message
    error = refusal(await limiter.acquire([Check.rpd("key:a", 0)], 10), "gpt-test")
    assert error.message.startswith("Rate limit reached for gpt-test on requests per day (RPD)")
    error = refusal(await limiter.acquire([Check.tpm("key:a", 0)], 10), "gpt-test")
    assert error.message.startswith("Request too large for gpt-test on tokens per min (TPM)")
    assert error.headers["x-should-retry"] == "false"
    # A quota used up says so; one with tokens left, smaller than the request, says how many.
    quota = [Check.monthly_quota("acct:q", 100)]
    await take(limiter, quota, 70)
    error = refusal(await limiter.acquire(quota, 50), "gpt-test")
    assert "Used 70, Requested 50. 30 tokens are left this month" in error.message
    await take(limiter, quota, 30)
    error = refusal(await limiter.acquire(quota, 1), "gpt-test")
    assert error.message.endswith("Used 100, Requested 1.") and "left" not in error.message


async def test_all_or_nothing(limiter: Limiter) -> None:
    key_rpm, acct_rpm, acct_tpm = (
        Check.rpm("key:a", 10),
        Check.rpm("acct:x", 2),
        Check.tpm("acct:x", 1000),
    )
    conc, quota = Check.concurrent("acct:x", 5), Check.monthly_quota("acct:x", 10_000)
    checks = [key_rpm, acct_tpm, conc, quota, acct_rpm]
    await take(limiter, checks, 100)
    await take(limiter, checks, 100)
    for _ in range(3):
        d = await limiter.acquire(checks, 100)
        assert not d.allowed and d.failed == acct_rpm
    # Nothing of the refused requests was taken anywhere.
    assert await limiter.quota_used("acct:x") == 200
    d = await limiter.acquire([key_rpm, acct_tpm], 800)
    assert d.allowed  # 200 + 800 tokens fit exactly
    assert d.requests is not None and d.requests.remaining == 7  # 3 taken of 10
    d2 = await limiter.acquire([Check.concurrent("acct:x", 3)])
    assert d2.allowed  # only 2 of the slots are held


async def test_the_longest_wait_of_the_limits_that_refuse_answers(harness: Harness) -> None:
    """A plan of 3 requests a minute and 3 a day (QA): the fourth request was told to retry
    in 20 s (the minute's), and then refused again for 8 h (the day's); the 429 named the
    first limit that refused, in the checks' order, and its headers the minute's reset (1m0s)
    where the 200 before it had said 24h0m0s. Now, in either order, the longest wait answers,
    waiting it lets the request through, and the 429's headers are the 200's."""
    limiter = harness.make()
    for n, order in enumerate(((0, 1), (1, 0))):
        limits = [Check.rpm(f"acct:{n}", 3), Check.rpd(f"acct:{n}", 3)]
        checks = [limits[i] for i in order]
        for _ in range(3):
            last = await limiter.acquire(checks)
            assert last.allowed
        refused = await limiter.acquire(checks)
        assert not refused.allowed and refused.failed == limits[1]
        assert 86400 / 3 - 60 < refused.retry_after <= 86400 / 3
        assert "requests per day (RPD): Limit 3, Used 3" in refusal(refused, "m").message
        assert refused.requests is not None and last.requests is not None
        assert (refused.requests.limit, refused.requests.remaining) == (3, 0)
        assert refused.requests.reset_after > 86400 - 60  # the day's, as the 200 said
        if harness.clock is not None:  # the same to the character, on a clock of our own
            reset = "x-ratelimit-reset-requests"
            assert refusal(refused, "m").headers[reset] == headers_for(last)[reset] == "24h0m0s"
            harness.travel(20.0)  # the minute's wait: the day's still refuses
            assert not (await limiter.acquire(checks)).allowed
            harness.travel(86400 / 3 - 20.0)
            assert (await limiter.acquire(checks)).allowed


async def test_tokens_and_requests_refusing_answer_with_the_longer_wait(limiter: Limiter) -> None:
    """The requests wait 30 s, the tokens 60 s: the tokens answer, whatever the order; a
    request that can never pass (more than a limit) answers over any wait."""
    per_min, tokens = Check.rpm("key:a", 2), Check.tpm("acct:x", 100)
    for _ in range(2):
        await take(limiter, [per_min, tokens], 50)
    for checks in ([per_min, tokens], [tokens, per_min]):
        refused = await limiter.acquire(checks, 100)
        assert refused.failed == tokens and 59.0 < refused.retry_after <= 60.0
        assert refused.requests is not None and refused.requests.remaining == 0
        assert refused.tokens is not None and refused.tokens.remaining == 0
    too_large = Check.tpm("key:a", 10)
    refused = await limiter.acquire([per_min, too_large, tokens], 50)
    assert refused.failed == too_large and refused.retry_after == math.inf


async def test_a_refusals_headers_follow_the_successes_rule(limiter: Limiter) -> None:
    """The headers of a 429 are the most restrictive limit of each kind, as a 200's are,
    not the values of the limit that answers: here the day's tokens answer (86 s to wait,
    40 left) while the minute's have 5 left, which the 200 before reported."""
    per_min, per_day = Check.tpm("acct:x", 100), Check("acct:x", "tokens", 10_000, 86400.0)
    await take(limiter, [per_day], 9865)
    last = await limiter.acquire([per_min, per_day], 95)
    assert last.tokens is not None and (last.tokens.limit, last.tokens.remaining) == (100, 5)
    for checks in ([per_min, per_day], [per_day, per_min]):
        refused = await limiter.acquire(checks, 50)
        assert refused.failed == per_day and 86.0 < refused.retry_after <= 86.4 + 1e-6
        assert refused.tokens is not None
        assert (refused.tokens.limit, refused.tokens.remaining) == (100, 5)


async def test_a_spent_quota_answers_over_a_rate_limit(limiter: Limiter) -> None:
    """A plan of 40 tokens a month and a key of 2 requests a minute (QA): with the month spent
    and the minute's requests too, the client was told to retry in 30 s (a retryable
    rate_limit_exceeded), only to get insufficient_quota after it waited. A quota answers
    whenever it refuses, in either order; a budget beside the limits too."""
    per_min, quota = Check.rpm("key:k", 2), Check.monthly_quota("acct:x", 40)
    for checks in ([per_min, quota], [quota, per_min]):
        await limiter.reset("key:k")
        await limiter.reset("acct:x")
        await limiter.settle(await take(limiter, checks, 30), 30)
        await limiter.settle(await take(limiter, checks, 10), 10)
        refused = await limiter.acquire(checks, 10)
        assert not refused.allowed and refused.failed is not None
        assert refused.failed.kind == "quota" and refused.used == 40
        error = refusal(refused, "gpt-test")
        assert error.code == "insufficient_quota" and error.headers["x-should-retry"] == "false"
    rpm = [Check.rpm("key:b", 1)]
    decision, budget = await limiter.acquire_both(BUDGET, 1000, rpm, 0)
    assert decision.allowed and budget is not None
    refused, none = await limiter.acquire_both(BUDGET, 10, rpm, 0)  # both refuse
    assert none is None and refused.failed is not None
    assert refused.failed.scope == "usd:acct:x"


BUDGET = [Check.monthly_quota("usd:acct:x", 1000)]  # counted in its own unit (nano-dollars)


async def test_a_budget_and_the_limits_together_all_or_nothing(limiter: Limiter) -> None:
    """``acquire_both``: a budget and the limits counted in tokens, two reservations taken
    together or not at all, each settled on its own; the budget's refusal comes first."""
    checks = [Check.rpm("key:a", 2), Check.monthly_quota("acct:x", 500)]
    decision, budget = await limiter.acquire_both(BUDGET, 600, checks, 100)
    assert decision.allowed and budget is not None and budget.allowed
    assert decision.requests is not None and decision.requests.remaining == 1  # the limits'
    assert budget.reservation is not None and decision.reservation is not None
    assert await limiter.quota_used("usd:acct:x") == 600
    assert await limiter.quota_used("acct:x") == 100
    await limiter.settle(budget.reservation, 250)  # each in its own unit
    await limiter.settle(decision.reservation, 40)
    assert await limiter.quota_used("usd:acct:x") == 250
    assert await limiter.quota_used("acct:x") == 40
    # The budget refuses (250 + 800 > 1000): the limits take nothing, not even a request.
    refused, none = await limiter.acquire_both(BUDGET, 800, checks, 100)
    assert not refused.allowed and none is None and refused.reservation is None
    assert refused.failed is not None and refused.failed.scope == "usd:acct:x"
    assert (refused.used, refused.requested) == (250, 800)
    assert await limiter.quota_used("acct:x") == 40
    # The limits refuse (40 + 470 > 500): the budget takes nothing.
    refused, none = await limiter.acquire_both(BUDGET, 100, checks, 470)
    assert not refused.allowed and none is None
    assert refused.failed is not None and refused.failed.scope == "acct:x"
    assert refused.failed.kind == "quota" and (refused.used, refused.requested) == (40, 470)
    assert await limiter.quota_used("usd:acct:x") == 250
    # Both would refuse: the budget's refusal answers.
    refused, _ = await limiter.acquire_both(BUDGET, 800, checks, 470)
    assert refused.failed is not None and refused.failed.scope == "usd:acct:x"
    # The rpm of 2 was taken once: one more request fits, then the limits refuse.
    decision, budget = await limiter.acquire_both(BUDGET, 10, checks, 10)
    assert decision.allowed and budget is not None
    refused, none = await limiter.acquire_both(BUDGET, 10, checks, 10)
    assert not refused.allowed and refused.failed == checks[0] and none is None
    assert await limiter.quota_used("usd:acct:x") == 260


async def test_a_budget_taken_in_process_is_given_back_when_the_limits_fail() -> None:
    """The in-process acquire_both takes the budget first: when the limits' acquire raises
    instead of answering, the budget is given back before the error goes on."""

    class Failing(MemoryLimiter):
        async def acquire(self, checks: Any, cost_tokens: int = 0) -> rl.Decision:
            if checks is not BUDGET:
                raise LimiterUnavailable("the limits' store is gone")
            return await super().acquire(checks, cost_tokens)

    limiter = Failing()
    with pytest.raises(LimiterUnavailable):
        await limiter.acquire_both(BUDGET, 600, [Check.rpm("key:a", 2)], 0)
    assert await limiter.quota_used("usd:acct:x") == 0


async def test_headers_are_the_most_restrictive(limiter: Limiter) -> None:
    d = await limiter.acquire(
        [Check.rpm("key:a", 10), Check.rpm("acct:x", 3), Check.rpd("acct:x", 1000)]
    )
    assert d.requests is not None
    assert (d.requests.limit, d.requests.remaining) == (3, 2)
    assert d.tokens is None


def test_headers_tie_on_float_noise_goes_to_the_first_check() -> None:
    # Both buckets full, both back to empty in 60 s; the second's level carries float noise
    # from its drain (1e-13 units, 1e-12 s of reset). The first check answers, as on a tie:
    # hypothesis found the noise picking the second check in a limiter and not in the model.
    per_day, per_min = Check("acct:x", "requests", 3, 60.0), Check("key:a", "requests", 5, 60.0)
    status = rl.base.most_restrictive([(per_day, 3.0), (per_min, 5.0000000000001)])
    assert status is not None
    assert (status.limit, status.remaining, status.reset_after) == (3, 0, 60.0)


# --- settle ----------------------------------------------------------------------------


async def test_settle_releases_unused_tokens(limiter: Limiter) -> None:
    checks = [Check.tpm("key:a", 100), Check.monthly_quota("acct:x", 1000)]
    res = await take(limiter, checks, 80)
    assert not (await limiter.acquire(checks, 80)).allowed
    assert await limiter.settle(res, 20)
    assert await limiter.quota_used("acct:x") == 20
    await take(limiter, checks, 80)  # 20 used + 80 = 100 tokens
    assert await limiter.quota_used("acct:x") == 100


async def test_settle_charges_extra_into_debt(limiter: Limiter) -> None:
    checks = [Check.tpm("key:a", 100), Check.monthly_quota("acct:x", 1000)]
    res = await take(limiter, checks, 10)
    assert await limiter.settle(res, 150)
    assert await limiter.quota_used("acct:x") == 150
    d = await limiter.acquire(checks, 0)
    assert not d.allowed and d.failed == checks[0]
    assert d.used == 150 and d.retry_after > 29.0  # 50 tokens of debt at 100/min


async def test_a_lowered_request_limit_never_asks_for_more_than_a_window(
    limiter: Limiter,
) -> None:
    """A plan change from 30 to 5 requests a day, after 26: the wait is one request's share of
    the day (4.8 h), not the 4.4 days a bucket holding all 26 would drain in."""
    for _ in range(26):
        await take(limiter, [Check.rpd("acct:a", 30)])
    lowered = Check.rpd("acct:a", 5)
    refused = await limiter.acquire([lowered])
    assert not refused.allowed and refused.failed == lowered
    assert refused.used == 5
    assert 86400 / 5 - 60 < refused.retry_after <= 86400 / 5
    assert refused.requests is not None and refused.requests.reset_after <= 86400
    again = await limiter.acquire([lowered])  # the bucket was brought down, not read down
    assert again.used == 5 and again.retry_after <= refused.retry_after
    # Tokens owed past the limit by a settlement stay owed (see the test above).


async def test_settle_applies_once(limiter: Limiter) -> None:
    checks = [Check.monthly_quota("acct:x", 1000), Check.concurrent("acct:x", 1)]
    res = await take(limiter, checks, 100)
    assert await limiter.settle(res, 300)
    assert not await limiter.settle(res, 300)
    assert not await limiter.release(res)
    assert await limiter.quota_used("acct:x") == 300


async def test_release_gives_everything_back_but_the_request(limiter: Limiter) -> None:
    checks = [Check.rpm("key:a", 2), Check.tpm("key:a", 100), Check.monthly_quota("acct:x", 100)]
    res = await take(limiter, checks, 100)
    assert not (await limiter.acquire(checks, 1)).allowed
    assert await limiter.release(res)
    assert await limiter.quota_used("acct:x") == 0
    d = await limiter.acquire(checks, 100)
    assert d.allowed
    assert d.requests is not None and d.requests.remaining == 0  # requests stay counted


async def test_concurrency_released_on_settle(limiter: Limiter) -> None:
    checks = [Check.concurrent("acct:x", 2)]
    a = await take(limiter, checks)
    await take(limiter, checks)
    d = await limiter.acquire(checks)
    assert not d.allowed and d.used == 2 and 0 < d.retry_after <= 1.0
    await limiter.settle(a, 0)
    await take(limiter, checks)


async def test_concurrency_lease_expires(harness: Harness) -> None:
    """A request that never settles (a crash) holds its slot only for the lease TTL."""
    limiter = harness.make(lease_ttl=0.05)
    checks = [Check.concurrent("acct:x", 1)]
    await take(limiter, checks)
    assert not (await limiter.acquire(checks)).allowed
    if harness.clock is not None:
        harness.clock.now += 0.06
    else:
        await asyncio.sleep(0.1)  # the server's clock decides; only waits, asserts no time
    await take(limiter, checks)


async def test_concurrency_lease_renewed_while_open(harness: Harness) -> None:
    """A request still running when its lease would expire keeps its slot once renewed; only
    open reservations old enough are renewed, and a settled one frees its slot as before."""
    ttl = 2.0
    limiter = harness.make(lease_ttl=ttl)
    checks = [Check.concurrent("key:k", 1), Check.concurrent("acct:x", 1)]
    held = await take(limiter, checks)

    async def wait(seconds: float) -> None:
        if harness.clock is not None:
            harness.clock.now += seconds
        else:
            await asyncio.sleep(seconds)  # the server's clock decides; only waits

    assert limiter.renew_leases(ttl / 2) == 0  # admitted just now: not due
    await wait(ttl / 2)
    assert limiter.renew_leases(ttl / 3) == 1
    await wait(ttl * 0.7)  # past the first expiry, well before the renewed one
    assert not (await limiter.acquire(checks)).allowed  # (carries the renewal to Redis)
    assert await limiter.settle(held, 0)
    assert limiter.renew_leases(0.0) == 0  # settled: nothing left to renew
    await take(limiter, checks)


async def test_renewal_after_settlement_frees_the_slot(harness: Harness) -> None:
    """A renewal queued before the settlement, both in one call, leaves the slot free."""
    limiter = harness.make(lease_ttl=30.0)
    checks = [Check.concurrent("acct:x", 1)]
    held = await take(limiter, checks)
    assert limiter.renew_leases(0.0) == 1
    assert await limiter.settle(held, 0)  # (Redis: one call carries both, renewal first)
    await take(limiter, checks)


def _redis_only(harness: Harness) -> None:
    if harness.backend == "memory":
        pytest.skip("a process's own reservations die with it in process")


async def test_a_dead_processs_quota_reservations_are_given_back(harness: Harness) -> None:
    """A process killed mid-request never settles its reservations: once their leases expire,
    the next admission gives them back (the quota held 1,200 tokens of requests that
    never finished, until the month's end). A process that was only cut off and settles
    after all is charged its real tokens."""
    _redis_only(harness)
    dead = harness.make(lease_ttl=0.2)  # it stops renewing: a lease outlives it by its TTL
    live = harness.make(lease_ttl=30.0)
    quota = Check.monthly_quota("acct:x", 1000)
    checks = [Check.concurrent("key:k", 5), quota, Check.monthly_quota("key:k", 1000)]
    await take(dead, checks, 400)
    await take(dead, [quota], 200)  # a quota with no concurrency limit: the marker's lease
    kept = await take(live, checks, 100)  # keeps the concurrency set alive
    assert await live.quota_used("acct:x") == 700 and await live.quota_used("key:k") == 500
    await asyncio.sleep(0.4)  # the server's clock decides; only waits
    # Expired leases in a live set, and a set gone with its only lease: both given back.
    await take(live, checks, 0)
    await take(live, [quota], 0)
    assert await live.quota_used("acct:x") == 100 and await live.quota_used("key:k") == 100
    assert await live.settle(kept, 60)
    assert await live.quota_used("acct:x") == 60
    # Cut off, not dead: its settlement comes after its charges were given back.
    cut_off = harness.make(lease_ttl=0.2)
    late = await take(cut_off, checks, 300)
    await asyncio.sleep(0.4)
    await take(live, checks, 0)  # gives the 300 back
    assert await live.quota_used("acct:x") == 60
    assert await cut_off.settle(late, 250)  # charged again, then its real 250
    assert await live.quota_used("acct:x") == 310 and await live.quota_used("key:k") == 310
    assert not await cut_off.settle(late, 250)  # once
    assert await live.quota_used("acct:x") == 310


async def test_a_late_settlement_after_its_set_expired_is_charged_once(
    harness: Harness,
) -> None:
    """A process cut off for longer than a TTL, whose lease set expired with nobody pruning
    it, settles late: its charge is moved then, and the next admission gives nothing back a
    second time (the counter went 4,106 below the records)."""
    _redis_only(harness)
    cut_off = harness.make(lease_ttl=0.2)
    live = harness.make(lease_ttl=30.0)
    quota = [Check.monthly_quota("acct:x", 10_000)]
    first = await take(cut_off, quota, 400)
    await asyncio.sleep(0.4)  # its set expires; no admission in between
    assert await cut_off.settle(first, 50)
    await take(live, quota, 0)
    assert await live.quota_used("acct:x") == 50


async def test_an_accounts_charge_comes_back_through_any_of_its_keys(harness: Harness) -> None:
    """A key with a concurrency limit of its own: the account's quota charge is kept by the
    account's set, so a request with another key of the account gives it back (it waited for
    that one key, which might never be used again)."""
    _redis_only(harness)
    dead = harness.make(lease_ttl=0.2)
    live = harness.make(lease_ttl=30.0)
    account = Check.monthly_quota("acct:x", 1000)
    await take(dead, [Check.concurrent("key:k", 2), account], 500)
    await asyncio.sleep(0.4)
    await take(live, [account], 0)  # another key of the account, with no limits of its own
    assert await live.quota_used("acct:x") == 0


async def test_a_dead_processs_budget_reservation_is_given_back(harness: Harness) -> None:
    _redis_only(harness)
    dead = harness.make(lease_ttl=0.2)
    live = harness.make(lease_ttl=30.0)
    checks = [Check.rpm("key:a", 100), Check.monthly_quota("acct:x", 500)]
    decision, budget = await dead.acquire_both(BUDGET, 900, checks, 300)
    assert decision.allowed and budget is not None and budget.allowed
    refused, _ = await live.acquire_both(BUDGET, 200, checks, 10)
    assert not refused.allowed  # 900 of the 1,000 held
    await asyncio.sleep(0.4)
    decision, budget = await live.acquire_both(BUDGET, 200, checks, 10)
    assert decision.allowed and budget is not None and budget.allowed
    assert await live.quota_used("usd:acct:x") == 200 and await live.quota_used("acct:x") == 10


async def test_settled_reservations_leave_nothing_held(harness: Harness) -> None:
    _redis_only(harness)
    limiter = harness.make()
    checks = [Check.concurrent("key:k", 5), Check.monthly_quota("acct:x", 1000)]
    for actual in (0, 7, 400):
        await limiter.settle(await take(limiter, checks, 100), actual)
    await limiter.settle(await take(limiter, checks[1:], 100), 3)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        held = [k async for k in client.scan_iter(match=harness.prefix + "*|h", count=1000)]
        given = [k async for k in client.scan_iter(match=harness.prefix + "*|g", count=1000)]
    finally:
        await client.aclose()
    assert held == [] and given == []
    assert await limiter.quota_used("acct:x") == 410


async def _lose_redis_data(harness: Harness) -> None:
    """What a Redis restarted without persistence (or the tester's FLUSHDB) does to this
    limiter: every key of its prefix gone (the shared server's other keys are left alone)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=harness.prefix + "*", count=1000)]
        assert keys
        await client.delete(*keys)
    finally:
        await client.aclose()


async def test_a_settlement_after_redis_lost_its_data_charges_what_was_used(
    harness: Harness,
) -> None:
    """A request running when Redis lost its data: the counter is re-seeded from the usage
    records (90), which it is not in yet, so it holds none of the 209 reserved; its
    settlement charges the 28 used. It gave back 181 it never held: the quota of 300 read 0
    and the account got its month back (406 tokens spent, found by QA). The budget alike."""
    _redis_only(harness)
    limiter = harness.make(lease_ttl=30.0)
    month = month_of(time.time())
    checks = [Check.concurrent("key:k", 5), Check.monthly_quota("acct:x", 300)]
    spent, budget = await limiter.acquire_both(BUDGET, 200, checks, 100)
    assert spent.reservation is not None and budget is not None and budget.reservation
    await limiter.settle(spent.reservation, 90)
    await limiter.settle(budget.reservation, 100)
    slow, held = await limiter.acquire_both(BUDGET, 600, checks, 209)
    assert slow.reservation is not None and held is not None and held.reservation
    assert await limiter.quota_used("acct:x") == 299
    await _lose_redis_data(harness)
    await limiter.seed(Seed(month, {"acct:x": 90, "usd:acct:x": 100}))  # the records
    assert await limiter.quota_used("acct:x") == 90
    assert await limiter.settle(slow.reservation, 28)
    assert await limiter.settle(held.reservation, 150)
    assert await limiter.quota_used("acct:x") == 90 + 28
    assert await limiter.quota_used("usd:acct:x") == 100 + 150
    refused = await limiter.acquire(checks, 183)  # 118 + 183 > 300: the month still counts
    assert not refused.allowed and refused.failed == checks[1].resolved(time.time())


async def test_a_seed_keeps_the_reservations_in_flight(harness: Harness) -> None:
    """A seed raises a counter to the usage records, which hold no request still running: it
    raises what the counter holds besides their reservations, and they stay on top for their
    settlements to give back. Raising the whole counter swallowed them (299 raised to 400),
    and the settlement then gave back 181 tokens it no longer held (219, where the records
    say 428). It happens to a Redis seeded after an outage with requests in flight, and to
    the in-process fallback, seeded while an outage begins."""
    limiter = harness.make(lease_ttl=30.0)
    quota = [Check.monthly_quota("acct:x", 1000, "2026-11")]
    await limiter.settle(await take(limiter, quota, 100), 90)
    slow = await take(limiter, quota, 209)
    await limiter.seed(Seed("2026-11", {"acct:x": 60}))  # below the 90 used: no change
    assert await limiter.quota_used("acct:x", "2026-11") == 299
    await limiter.seed(Seed("2026-11", {"acct:x": 400}))  # other processes counted more
    assert await limiter.quota_used("acct:x", "2026-11") == 400 + 209
    assert await limiter.settle(slow, 28)
    assert await limiter.quota_used("acct:x", "2026-11") == 400 + 28


async def test_gateway_renews_running_requests_leases(harness: Harness) -> None:
    """Limits.run_renewal (a task of every gateway process) keeps a running request's slot
    past its lease TTL, on the real clock; stopped, it renews nothing more."""
    ttl = 1.5
    limiter = MemoryLimiter(lease_ttl=ttl) if harness.clock else harness.make(lease_ttl=ttl)
    limits = Limits(limiter, remote=harness.clock is None)
    checks = [Check.concurrent("acct:x", 1)]
    renewing = asyncio.create_task(limits.run_renewal())
    try:
        admission = await limits.admit(checks, 0, "m")
        await asyncio.sleep(ttl * 1.7)  # only waits: two passes renew it, each a TTL ahead
        assert not (await limiter.acquire(checks)).allowed
        await limits.settle_soon(admission, 0)
        await limits.settle_soon(Admission(await take(limiter, checks), {}), 0)
    finally:
        renewing.cancel()
    await limits.close()


# --- quota -----------------------------------------------------------------------------


async def test_quota_counts_per_month(limiter: Limiter) -> None:
    nov, dec = (
        Check.monthly_quota("acct:x", 1000, "2026-11"),
        Check.monthly_quota("acct:x", 1000, "2026-12"),
    )
    await take(limiter, [nov], 900)
    d = await limiter.acquire([nov], 200)
    assert not d.allowed and d.failed == nov and (d.used, d.requested) == (900, 200)
    await take(limiter, [dec], 1000)
    assert await limiter.quota_used("acct:x", "2026-11") == 900
    assert await limiter.quota_used("acct:x", "2026-12") == 1000
    assert await limiter.quota_used("acct:y", "2026-12") == 0


async def test_quota_month_derived_from_clock(harness: Harness) -> None:
    harness.travel(0)  # memory only
    assert harness.clock is not None
    harness.clock.now = NOV_30_LATE
    limiter = harness.make()
    checks = [Check.monthly_quota("acct:x", 100)]
    res = await take(limiter, checks, 100)
    assert res.checks[0].month == "2026-11"
    d = await limiter.acquire(checks, 1)
    assert not d.allowed and d.retry_after == pytest.approx(60.0)
    harness.travel(60.0)
    await take(limiter, checks, 100)
    assert await limiter.quota_used("acct:x") == 100  # December
    # Settling a November reservation in December corrects November.
    await limiter.settle(res, 40)
    assert await limiter.quota_used("acct:x", "2026-11") == 40


async def test_seeding_raises_quota_counters_and_never_lowers_them(limiter: Limiter) -> None:
    month = "2026-11"
    quota = Check.monthly_quota("acct:x", 1000, month)
    assert not await limiter.seeded(month)
    await limiter.settle(await take(limiter, [quota], 300), 300)  # counted before the seed
    await limiter.seed(Seed(month, {"acct:y": 700}, whole=False))  # one change's scopes
    assert await limiter.quota_used("acct:y", month) == 700
    assert not await limiter.seeded(month)  # the whole seed is still to come
    await limiter.seed(Seed(month, {"acct:x": 200, "acct:y": 950, "key:k": 40}))
    assert await limiter.seeded(month)
    assert not await limiter.seeded("2026-12")  # another month's counters are not
    assert await limiter.quota_used("acct:x", month) == 300
    assert await limiter.quota_used("acct:y", month) == 950
    assert await limiter.quota_used("key:k", month) == 40
    assert await limiter.quota_used("acct:y", "2026-12") == 0
    d = await limiter.acquire([Check.monthly_quota("acct:y", 1000, month)], 51)
    assert not d.allowed and d.used == 950  # the seeded usage is held to the quota
    await take(limiter, [Check.monthly_quota("acct:y", 1000, month)], 50)
    await limiter.seed(Seed(month, {"acct:x": 500, "acct:y": 10}))  # seeding again: raises
    assert await limiter.quota_used("acct:x", month) == 500
    assert await limiter.quota_used("acct:y", month) == 1000


async def test_seeding_raises_daily_buckets_and_never_lowers_them(limiter: Limiter) -> None:
    a, b = Check.rpd("acct:a", 10), Check.rpd("acct:b", 10)
    for _ in range(6):
        await take(limiter, [a])
    await limiter.seed(Seed("2026-11", {}, [(a, 3.0), (b, 8.0)]))
    d = await limiter.acquire([a])  # 6 taken, above the seed's 3: kept
    assert d.allowed and d.requests is not None and d.requests.remaining in (3, 4)
    for _ in range(2):
        await take(limiter, [b])
    refused = await limiter.acquire([b])  # 8 seeded + 2 taken: the day's 10 are used
    assert not refused.allowed and refused.failed == b and refused.used == 10


async def test_redis_seeds_many_buckets_in_batches(harness: Harness) -> None:
    if harness.backend == "memory":
        pytest.skip("the batches are Redis calls")
    from chatgate.ratelimit.redis import SEED_BATCH

    limiter = harness.make()
    used = {f"key:{i}": i + 1 for i in range(SEED_BATCH * 2 + 7)}
    await limiter.seed(Seed("2026-11", used, [(Check.rpd("key:r", 5), 5.0)]))
    for i in (0, SEED_BATCH - 1, SEED_BATCH, SEED_BATCH * 2 + 6):
        assert await limiter.quota_used(f"key:{i}", "2026-11") == i + 1
    assert not (await limiter.acquire([Check.rpd("key:r", 5)])).allowed
    client = aioredis.Redis.from_url(REDIS_URL)
    harness.clients.append(client)
    ttl = await client.ttl(harness.prefix + Check.monthly_quota("key:0", 1, "2026-11").key)
    # Kept as long as a counter the limiter makes: the month's end plus the retention.
    expected = month_end("2026-11") + rl.base.QUOTA_RETENTION - time.time()
    assert abs(ttl - expected) < 60
    assert abs(await client.ttl(harness.prefix + "seeded|2026-11") - expected) < 60


@pytest.mark.parametrize("seed", range(40))
async def test_level_from_counts_is_the_buckets_level(seed: int) -> None:
    """Requests taken at hour starts: the level worked out from the hourly counts is the
    level the limiter's own bucket reached (exact); a limit high enough that none is refused."""
    rng = random.Random(seed)
    clock = FakeClock(1795000000.0)
    limiter = MemoryLimiter(clock=clock)
    check = Check.rpd("acct:x", rng.choice([24, 100, 1000]))
    counts: list[tuple[float, int]] = []
    start = clock.now
    for hour in range(rng.randint(1, 30)):
        clock.now = start + hour * 3600
        n = rng.randint(0, 3) if check.limit == 24 else rng.randint(0, 60)
        taken = 0
        for _ in range(n):
            taken += (await limiter.acquire([check])).allowed
        counts.append((clock.now, taken))
    clock.now += rng.uniform(0, 7200)
    expected = limiter._level(check, clock.now)  # the bucket's own level, read without taking
    level = rl.level_from_counts(counts, clock.now, check.rate)
    assert math.isclose(level, expected, rel_tol=1e-9, abs_tol=1e-9)


# --- concurrency of callers ------------------------------------------------------------


async def test_200_concurrent_acquires_admit_exactly_n(harness: Harness) -> None:
    limiter = harness.make()
    checks = [Check.rpm("key:a", 50), Check.tpm("acct:x", 10_000)]
    decisions = await asyncio.gather(*(limiter.acquire(checks, 10) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50


async def test_two_processes_together_admit_exactly_n(harness: Harness) -> None:
    if harness.backend == "memory":
        pytest.skip("memory limits are per process by design")
    one, two = harness.make(), harness.make()
    checks = [Check.rpm("key:a", 30), Check.concurrent("acct:x", 1000)]
    decisions = await asyncio.gather(
        *(lim.acquire(checks) for _ in range(100) for lim in (one, two))
    )
    assert sum(d.allowed for d in decisions) == 30


async def test_reset_forgets_a_scope(limiter: Limiter) -> None:
    a, b = Check.rpm("key:a", 1), Check.rpm("key:b", 1)
    await take(limiter, [a])
    await take(limiter, [b])
    await limiter.reset("key:a")
    await take(limiter, [a])
    assert not (await limiter.acquire([b])).allowed


# --- time (memory clock) ---------------------------------------------------------------


async def test_refill_at_exactly_retry_after(harness: Harness) -> None:
    harness.travel(0)
    limiter = harness.make()
    checks = [Check.rpm("key:a", 3)]
    for _ in range(3):
        await take(limiter, checks)
    d = await limiter.acquire(checks)
    assert d.retry_after == pytest.approx(20.0)
    harness.travel(19.9)
    assert not (await limiter.acquire(checks)).allowed
    harness.travel(0.1)
    await take(limiter, checks)
    assert not (await limiter.acquire(checks)).allowed
    harness.travel(60.0)  # a full window: back to a full bucket of 3, no more
    for _ in range(3):
        await take(limiter, checks)
    assert not (await limiter.acquire(checks)).allowed


async def test_memory_state_stays_bounded(harness: Harness) -> None:
    harness.travel(0)
    limiter = harness.make(lease_ttl=30.0)
    assert isinstance(limiter, MemoryLimiter)
    for i in range(2000):
        await limiter.acquire(
            [Check.rpm(f"key:{i}", 5), Check.concurrent(f"key:{i}", 1), Check.tpm("acct", 10**9)],
            10,
        )
    assert len(limiter) > 4000
    harness.travel(3600.0)
    for _ in range(3000):
        await limiter.acquire([Check.rpm("key:hot", 10**6)])
    assert len(limiter) <= 10


# --- Redis specifics -------------------------------------------------------------------


def _counting_client(sent: list[str]) -> aioredis.Redis:
    class Counting(aioredis.Connection):
        async def send_command(self, *args: Any, **kwargs: Any) -> None:
            sent.append(str(args[0]).upper())
            await super().send_command(*args, **kwargs)

    pool = aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=Counting)
    return aioredis.Redis(connection_pool=pool)


async def test_redis_one_round_trip_per_request(harness: Harness) -> None:
    """Admission and the previous request's settlement: one ``EVALSHA``. An awaited settle
    with no admission after it goes out alone, after the flush delay (see test_redis.py)."""
    if harness.backend != "redis":
        pytest.skip("Redis only")
    sent: list[str] = []
    client = _counting_client(sent)
    harness.clients.append(client)
    limiter = RedisLimiter(client, prefix=harness.prefix)
    checks = [
        Check.rpm("key:a", 100),
        Check.tpm("key:a", 10_000),
        Check.rpd("acct:x", 1000),
        Check.concurrent("acct:x", 10),
        Check.monthly_quota("acct:x", 10**6),
    ]
    await take(limiter, checks, 10)  # connects and loads the script
    for _ in range(3):
        sent.clear()
        d = await limiter.acquire(checks, 100)
        assert sent == ["EVALSHA"]
        assert d.reservation is not None
        settled = limiter.settle_nowait(d.reservation, 42)
        assert sent == ["EVALSHA"] and not settled.done()  # queued, not sent
    sent.clear()
    refused = await limiter.acquire([Check.rpm("key:b", 0)])  # carries the last settlement
    assert not refused.allowed and sent == ["EVALSHA"] and settled.result()
    d = await limiter.acquire(checks, 100)
    assert d.reservation is not None
    sent.clear()
    assert await limiter.settle(d.reservation, 42)
    assert sent == ["EVALSHA"]
    assert await limiter.quota_used("acct:x") == 10 + 4 * 42
    # A monthly budget beside them: still one call, and both settlements ride on the next.
    sent.clear()
    d, budget = await limiter.acquire_both(BUDGET, 300, checks, 100)
    assert sent == ["EVALSHA"] and budget is not None
    assert d.reservation is not None and budget.reservation is not None
    limiter.settle_nowait(d.reservation, 42)
    limiter.settle_nowait(budget.reservation, 120)
    d, budget = await limiter.acquire_both(BUDGET, 300, checks, 100)
    assert sent == ["EVALSHA", "EVALSHA"] and budget is not None
    assert await limiter.quota_used("usd:acct:x") == 120 + 300


async def test_redis_through_a_redis_py_client_that_decodes_replies(harness: Harness) -> None:
    """A ``redis.asyncio`` client made with ``decode_responses=True`` answers the script's
    reply as text: the limiter reads it as from any other client (admit, refuse, settle,
    the quota read back), and the packed command reaches it as arguments."""
    if harness.backend != "redis":
        pytest.skip("Redis only")
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    harness.clients.append(client)
    limiter = RedisLimiter(client, prefix=harness.prefix)
    checks = [Check.rpm("key:a", 2), Check.tpm("key:a", 1000), Check.monthly_quota("acct:x", 500)]
    first = await limiter.acquire(checks, 100)
    assert first.allowed and first.reservation is not None
    assert first.tokens is not None and first.tokens.remaining == 900
    await limiter.settle(first.reservation, 40)
    second = await take(limiter, checks, 100)
    refused = await limiter.acquire(checks, 100)  # the rpm of 2
    assert not refused.allowed and refused.failed == checks[0] and refused.retry_after > 0
    await limiter.settle(second, 100)
    assert await limiter.quota_used("acct:x") == 140


async def test_redis_cancelled_acquire_leaks_nothing(harness: Harness) -> None:
    """A caller cancelled mid-EVALSHA: the script still runs, and what it took is released."""
    if harness.backend != "redis":
        pytest.skip("Redis only (the memory limiter never suspends inside acquire)")
    sent: list[str] = []
    client = _counting_client(sent)
    harness.clients.append(client)
    limiter = RedisLimiter(client, prefix=harness.prefix)
    await limiter.quota_used("acct:x")  # connect first
    checks = [Check.concurrent("acct:x", 1), Check.monthly_quota("acct:x", 1000)]
    sent.clear()
    task = asyncio.create_task(limiter.acquire(checks, 100))
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await limiter.aclose()  # waits for the background release
    assert sent == ["EVALSHA", "EVALSHA"]  # the acquire ran, then its release
    other = harness.make()
    assert await other.quota_used("acct:x") == 0
    await take(other, checks, 1000)
    # With a budget taken in the same call: both given back.
    limiter = RedisLimiter(client, prefix=harness.prefix)
    sent.clear()
    limits = [Check.concurrent("acct:y", 1), Check.monthly_quota("acct:y", 1000)]
    both = asyncio.create_task(limiter.acquire_both(BUDGET, 700, limits, 100))
    for _ in range(3):
        await asyncio.sleep(0)
    both.cancel()
    with pytest.raises(asyncio.CancelledError):
        await both
    await limiter.aclose()
    assert sent == ["EVALSHA", "EVALSHA"]
    assert await other.quota_used("usd:acct:x") == 0
    assert await other.quota_used("acct:y") == 0
    await take(other, limits, 1000)  # the slot is free again


def test_open_limiter_by_url() -> None:
    assert isinstance(rl.open_limiter(None), MemoryLimiter)
    assert isinstance(rl.open_limiter("memory://"), MemoryLimiter)
    limiter = rl.open_limiter("redis://127.0.0.1:6379/0", fail_open=False)
    assert isinstance(limiter, FailoverLimiter) and not limiter.fail_open
    assert isinstance(limiter.primary, RedisLimiter)
    with pytest.raises(ValueError):
        rl.open_limiter("postgres://x")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_redis_unreachable_raises_limiter_unavailable() -> None:
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{_dead_port()}", prefix="x:")
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire([Check.rpm("key:a", 1)])
        with pytest.raises(LimiterUnavailable):
            await limiter.quota_used("acct:x")
    finally:
        await limiter.aclose()


async def test_failover_fails_open_to_memory() -> None:
    dead = RedisLimiter.from_url(f"redis://127.0.0.1:{_dead_port()}", prefix="x:")
    limiter = FailoverLimiter(dead, MemoryLimiter(), fail_open=True)
    try:
        checks = [Check.rpm("key:a", 2), Check.monthly_quota("acct:x", 100)]
        a = await take(limiter, checks, 50)
        b = await take(limiter, checks, 50)
        assert not (await limiter.acquire(checks, 1)).allowed  # local limits still hold
        assert limiter.fallbacks == 3 and limiter.degraded
        assert await limiter.settle(a, 10)  # settled by the limiter that issued it
        assert await limiter.settle_nowait(b, 20)  # likewise
        assert await limiter.quota_used("acct:x") == 30
        # A budget with the limits: both reservations from the fallback, settled there.
        d, budget = await limiter.acquire_both(BUDGET, 300, [Check.rpm("key:c", 5)], 0)
        assert budget is not None and budget.reservation is not None
        assert d.reservation is not None and await limiter.settle(d.reservation, 0)
        assert await limiter.settle(budget.reservation, 100)
        assert await limiter.quota_used("usd:acct:x") == 100 and limiter.fallbacks == 4
    finally:
        await limiter.aclose()


async def test_failover_fails_closed() -> None:
    dead = RedisLimiter.from_url(f"redis://127.0.0.1:{_dead_port()}", prefix="x:")
    limiter = FailoverLimiter(dead, MemoryLimiter(), fail_open=False)
    try:
        for _ in range(2):  # the second one answers from the cooldown, without a connect
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire([Check.rpm("key:a", 2)])
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire_both(BUDGET, 1, [Check.rpm("key:a", 2)], 0)
        assert limiter.fallbacks == 0
    finally:
        await limiter.aclose()


class _Flaky(MemoryLimiter):
    """A primary whose store can be switched off, counting the calls that reach it."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.up = True
        self.calls = 0

    async def acquire(self, checks: Any, cost_tokens: int = 0) -> rl.Decision:
        self.calls += 1
        if not self.up:
            raise LimiterUnavailable("down")
        return await super().acquire(checks, cost_tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        if not self.up:
            raise LimiterUnavailable("down")
        return await super().settle(reservation, actual_tokens)

    async def seeded(self, month: str) -> bool:
        if not self.up:
            raise LimiterUnavailable("down")
        return await super().seeded(month)

    async def seed(self, seed: Seed) -> None:
        if not self.up:
            raise LimiterUnavailable("down")
        await super().seed(seed)


async def test_failover_cooldown_and_recovery() -> None:
    clock = FakeClock()
    primary = _Flaky(clock)
    limiter = FailoverLimiter(primary, MemoryLimiter(clock=clock), cooldown=1.0, clock=clock)
    checks = [Check.rpm("key:a", 100)]
    held = await take(limiter, checks)
    primary.up = False
    for _ in range(5):
        await take(limiter, checks)
    assert (primary.calls, limiter.fallbacks) == (2, 5)  # one try, then the cooldown
    assert not await limiter.settle(held, 0)  # settle never raises
    assert limiter.settle_failures == 1
    primary.up = True
    clock.now += 1.0
    await take(limiter, checks)
    assert (primary.calls, limiter.fallbacks) == (3, 5) and not limiter.degraded


async def test_an_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QA: a Redis outage wrote its warning at every retry, once a cooldown (a second) for as
    long as it lasted; now once when it begins, and once when the store answers again."""
    clock = FakeClock()
    primary = _Flaky(clock)
    limiter = FailoverLimiter(primary, MemoryLimiter(clock=clock), cooldown=1.0, clock=clock)
    checks = [Check.rpm("key:a", 1000)]
    primary.up = False
    with caplog.at_level(logging.WARNING, logger="chatgate.ratelimit"):
        for _ in range(30):  # 30 cooldowns: 30 retries of the store, each failing
            await take(limiter, checks)
            clock.now += 1.0
        assert primary.calls == 30
        primary.up = True
        await take(limiter, checks)
        await take(limiter, checks)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("rate limiter store unavailable (down); failing open")
    assert lines[1] == "rate limiter store available again"


async def test_failover_seeds_its_fallback_again_when_an_outage_begins() -> None:
    clock = FakeClock()
    primary = _Flaky(clock)
    fallback = MemoryLimiter(clock=clock)
    limiter = FailoverLimiter(primary, fallback, cooldown=1.0, clock=clock)
    month = month_of(clock.now)
    assert not await limiter.seeded(month)
    await limiter.seed(Seed(month, {"acct:x": 100}))
    assert await limiter.seeded(month)
    assert await primary.quota_used("acct:x") == 100 and await fallback.quota_used("acct:x") == 100
    quota = [Check.monthly_quota("acct:x", 1000)]
    await take(limiter, quota, 400)  # counted by the primary only
    primary.up = False
    # The outage begins: the fallback answers (its count stale) a request that ends.
    await limiter.settle(await take(limiter, quota, 10), 10)
    assert not await limiter.seeded(month)  # so it wants seeding again
    await limiter.seed(Seed(month, {"acct:z": 5}, whole=False))  # one change: not enough
    assert not await limiter.seeded(month)
    await limiter.seed(Seed(month, {"acct:x": 500}))  # what the records say by now
    assert await limiter.seeded(month)
    # Raised from 110 (its seed, then the request of the outage) to the records' 500, which
    # may hold that request already: never the sum, which could count it twice.
    assert await fallback.quota_used("acct:x") == 500
    assert await primary.quota_used("acct:x") == 500  # not touched while down
    closed = FailoverLimiter(_Flaky(clock), MemoryLimiter(clock=clock), fail_open=False)
    closed.primary.up = False  # type: ignore[attr-defined]
    with pytest.raises(LimiterUnavailable):
        await closed.acquire(quota, 1)
    assert await closed.seeded(month)  # failing closed, no fallback answers: no seed


async def test_failover_seeds_its_fallback_before_it_answers_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fallback is as its last seed, before the month's usage since: answering at once,
    it granted a spent quota again. With an owner that seeds it when an outage begins
    (:attr:`FailoverLimiter.outage_began`), its first admissions wait for that seed; one
    that does not come within ``seed_wait`` (the database down too) lets them through
    unseeded, once logged, and none waits after it."""
    clock = FakeClock()
    primary = _Flaky(clock)
    limiter = FailoverLimiter(primary, MemoryLimiter(clock=clock), clock=clock, seed_wait=30)
    month = month_of(clock.now)
    quota = [Check.monthly_quota("acct:x", 1000)]
    await limiter.seed(Seed(month, {}))
    await take(limiter, quota, 990)  # the primary's count; the fallback's is 0
    began: list[asyncio.Task[None]] = []

    async def seed_later() -> None:
        await asyncio.sleep(0.05)  # the records' query
        await limiter.seed(Seed(month, {"acct:x": 990}))

    limiter.outage_began = lambda: began.append(asyncio.create_task(seed_later()))
    primary.up = False
    refused = await limiter.acquire(quota, 50)
    assert not refused.allowed and len(began) == 1
    assert not (await limiter.acquire(quota, 50)).allowed and len(began) == 1  # one outage
    assert (await limiter.acquire(quota, 10)).allowed

    unseeded = FailoverLimiter(_Flaky(clock), MemoryLimiter(clock=clock), seed_wait=0.05)
    unseeded.outage_began = lambda: None  # its seed never comes
    unseeded.primary.up = False  # type: ignore[attr-defined]
    for _ in range(3):
        assert (await unseeded.acquire(quota, 50)).allowed
    assert caplog.text.count("not seeded") == 1


async def test_failover_seeds_its_primary_again_when_an_outage_ends() -> None:
    """What the fallback admitted during an outage is in the usage records, not in Redis's
    counters: once Redis answers again, it is seeded from the records (raised to them)."""
    clock = FakeClock()
    primary = _Flaky(clock)
    limiter = FailoverLimiter(primary, MemoryLimiter(clock=clock), cooldown=1.0, clock=clock)
    month = month_of(clock.now)
    await limiter.seed(Seed(month, {"acct:x": 100}))
    quota = [Check.monthly_quota("acct:x", 1000)]
    primary.up = False
    await take(limiter, quota, 300)  # the fallback admits it; the primary never sees it
    primary.up = True
    clock.now += 1.0
    assert not await limiter.seeded(month)  # the primary missed the outage's requests
    await take(limiter, quota, 0)  # answered by the primary again meanwhile
    assert limiter.fallbacks == 1 and not await limiter.seeded(month)
    await limiter.seed(Seed(month, {"acct:z": 5}, whole=False))  # one change: not enough
    assert not await limiter.seeded(month)
    await limiter.seed(Seed(month, {"acct:x": 400}))  # what the records say by now
    assert await limiter.seeded(month) and await primary.quota_used("acct:x") == 400
    refused = await limiter.acquire(quota, 601)
    assert not refused.allowed and refused.used == 400
    # Failing closed, nothing was admitted without the primary: nothing to seed it with.
    closed = FailoverLimiter(_Flaky(clock), MemoryLimiter(clock=clock), fail_open=False)
    await closed.seed(Seed(month, {}))
    closed.primary.up = False  # type: ignore[attr-defined]
    with pytest.raises(LimiterUnavailable):
        await closed.acquire(quota, 1)
    closed.primary.up = True  # type: ignore[attr-defined]
    clock.now += 2.0
    assert await closed.seeded(month)


# --- the package surface ---------------------------------------------------------------


def test_all_is_honest() -> None:
    assert sorted(rl.__all__) == sorted(
        name
        for name in vars(rl)
        if not name.startswith("_")
        and name not in {"annotations"}
        and not isinstance(vars(rl)[name], type(rl))
    )
    for name in rl.__all__:
        assert getattr(rl, name) is not None


def test_check_validation_and_months() -> None:
    with pytest.raises(ValueError):
        Check("key:a", "bogus", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Check.monthly_quota("acct:x", 1, "2026-13")
    with pytest.raises(ValueError):
        Check.rpm("key|a", 1)
    assert month_of(NOV_30_LATE) == "2026-11"
    assert month_end("2026-11") == NOV_30_LATE + 60
    assert month_end("2026-12") == 1798761600.0  # 2027-01-01
    assert Check.rpm("k", 1).bucket != Check.rpd("k", 1).bucket != Check.tpm("k", 1).bucket


async def test_the_gateways_lease_ttl_is_a_setting(tmp_path: Any) -> None:
    from chatgate.settings import Settings

    assert rl.DEFAULT_LEASE_TTL == 60.0  # a dead process's slots: a minute, not 15
    plain = Limits.from_settings(Settings(data_dir=tmp_path))
    assert plain.limiter.lease_ttl == rl.DEFAULT_LEASE_TTL
    shared = Limits.from_settings(Settings(data_dir=tmp_path, redis_url=REDIS_URL, lease_ttl=7.0))
    limiter = shared.limiter
    assert isinstance(limiter, FailoverLimiter)
    assert limiter.lease_ttl == limiter.primary.lease_ttl == limiter.fallback.lease_ttl == 7.0
    await shared.close()
    with pytest.raises(ValueError, match="CHATGATE_LEASE_TTL"):
        Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path), "CHATGATE_LEASE_TTL": "2"})
