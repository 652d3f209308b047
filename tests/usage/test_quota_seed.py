"""The limits come back from the usage records (SQLite and PostgreSQL): the queries read the
accounts whose plan has a quota or a daily limit and the keys with one of their own, this
month's tokens and the last day's hourly requests; :meth:`Limits.seed` puts them in the limiter
once, under the scopes the checks use."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatgate.accounts import Account, AccountStore, PlanStore
from chatgate.auth import Principal
from chatgate.keys.store import IssuedKey, KeyStore
from chatgate.limits import Limits, account_scope, checks_for, key_scope
from chatgate.ratelimit import Check, MemoryLimiter
from chatgate.ratelimit.base import month_span
from chatgate.settings import Secret
from chatgate.usage.queries import hourly_requests, quota_usage
from chatgate.usage.recorder import UsageRecorder
from tests.usage.factory import make_record


async def limited_and_not(
    engine: AsyncEngine, limit: str, on_plan: int, on_key: int
) -> tuple[Account, Account, IssuedKey, IssuedKey]:
    """Two new accounts: one on a plan setting ``limit`` to ``on_plan``, with a key of no limit
    of its own; one on a plan without it, with a key setting it to ``on_key``."""
    tag = secrets.token_hex(4)
    plans, accounts = PlanStore(engine), AccountStore(engine)
    keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
    await plans.create(f"limited-{tag}", **{limit: on_plan})
    await plans.create(f"open-{tag}", rpm=100)
    limited = await accounts.create(f"limited-{tag}@example.com", plan=f"limited-{tag}")
    other = await accounts.create(f"open-{tag}@example.com", plan=f"open-{tag}")
    plain = await keys.create(limited.id)
    own = await keys.create(other.id, limits={limit: on_key})
    return limited, other, plain, own


async def test_quota_usage_reads_this_months_tokens_of_scopes_with_quotas(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    capped, open_, plain, own = await limited_and_not(engine, "monthly_tokens", 1000, 500)
    stray = "key_" + secrets.token_hex(4)  # a key of no quota, of an account of none

    start, _, _ = month_span(time.time())
    now = time.time()
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for account, key, prompt, completion, at in [
        (capped.id, plain.record.id, 10, 5, now),
        (capped.id, plain.record.id, 100, 20, now),
        (capped.id, plain.record.id, 7000, 7000, start - 1),  # last month: not counted
        (open_.id, own.record.id, 30, 3, now),
        (open_.id, stray, 1, 1, now),
    ]:
        recorder.record(
            make_record(
                account_id=account,
                key_id=key,
                prompt_tokens=prompt,
                completion_tokens=completion,
                created_at=at,
            )
        )
    await recorder.close()

    used = await quota_usage(engine, int(start))
    assert used.accounts.get(capped.id) == 135
    assert open_.id not in used.accounts  # its plan has no quota
    assert used.keys.get(own.record.id) == 33
    assert plain.record.id not in used.keys and stray not in used.keys

    limits = Limits(MemoryLimiter())
    assert await limits.seed(engine)
    assert not await limits.seed(engine)  # once: the limiter holds them now
    limiter = limits.limiter
    assert await limiter.quota_used(account_scope(capped.id)) == 135
    assert await limiter.quota_used(key_scope(own.record.id)) == 33
    # Under the scopes the checks charge: the key's own quota holds the seeded 33.
    principal = Principal(own.record.id, open_.id, False, None, {}, {"monthly_tokens": 500})
    refused = await limiter.acquire(checks_for(principal), 468)
    assert not refused.allowed and refused.used == 33
    assert (await limiter.acquire(checks_for(principal), 467)).allowed


async def test_hourly_requests_seed_the_daily_limits(engine: AsyncEngine, tmp_path: Path) -> None:
    daily, other, plain, own = await limited_and_not(engine, "rpd", 10, 4)

    now = time.time()
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for account, key, at, status, admitted in [
        *[(daily.id, plain.record.id, now - 60, 200, True)] * 5,
        (daily.id, plain.record.id, now - 60, 429, True),  # the upstream's 429: taken
        (daily.id, plain.record.id, now - 60, 429, False),  # the limits': took nothing
        *[(daily.id, plain.record.id, now - 60, 400, False)] * 3,  # refused before them
        (daily.id, plain.record.id, now - 60, 404, False),
        (daily.id, plain.record.id, now - 3 * 86400, 200, True),  # days ago: drained
        *[(other.id, own.record.id, now - 30, 500, True)] * 3,  # failed after admission: taken
    ]:
        recorder.record(
            make_record(
                account_id=account, key_id=key, created_at=at, status=status, admitted=admitted
            )
        )
    await recorder.close()

    hour = int(now - 86400) // 3600 * 3600
    found = await hourly_requests(engine, hour)
    limit, counts = found.accounts[daily.id]
    assert limit == 10 and sum(n for _, n in counts) == 6
    assert other.id not in found.accounts
    assert found.keys[own.record.id][0] == 4
    assert sum(n for _, n in found.keys[own.record.id][1]) == 3
    assert plain.record.id not in found.keys

    limits = Limits(MemoryLimiter())
    assert await limits.seed(engine)
    account = Principal(plain.record.id, daily.id, False, None, {"rpd": 10}, {})
    for _ in range(4):  # 6 of 10 taken, less at most what drained in a minute or two
        assert (await limits.limiter.acquire(checks_for(account))).allowed
    refused = await limits.limiter.acquire(checks_for(account))
    assert not refused.allowed and refused.used == 10
    key = Principal(own.record.id, other.id, False, None, {}, {"rpd": 4})
    assert (await limits.limiter.acquire(checks_for(key))).allowed
    assert not (await limits.limiter.acquire(checks_for(key))).allowed


async def test_a_change_seeds_the_limits_it_begins(engine: AsyncEngine, tmp_path: Path) -> None:
    """A quota or daily limit that begins to apply mid-month (the account moved to a plan with
    one, or its plan given one) counted from 0 in a running process, and from the month's
    records in one started after it: the feed's change seeds the scopes it touches, and only
    those, and does not count as the whole seed."""
    first, second, first_key, second_key = await limited_and_not(engine, "rpm", 100, 100)
    bystander, _, bystander_key, _ = await limited_and_not(engine, "rpm", 100, 100)
    now = time.time()
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for account, key, tokens in [
        (first.id, first_key.record.id, 40),
        (second.id, second_key.record.id, 30),
        (bystander.id, bystander_key.record.id, 20),
    ]:
        for _ in range(3):
            recorder.record(
                make_record(
                    account_id=account,
                    key_id=key,
                    prompt_tokens=tokens,
                    completion_tokens=0,
                    created_at=now,
                )
            )
    await recorder.close()
    plans, accounts = PlanStore(engine), AccountStore(engine)
    limits = Limits(MemoryLimiter())
    used = limits.limiter.quota_used

    # An account moved to a plan with a quota and a daily limit: its scope, not the others.
    tag = secrets.token_hex(4)
    await plans.create(f"capped-{tag}", monthly_tokens=1000, rpd=10)
    await accounts.set_plan(first.id, f"capped-{tag}")
    assert await limits.seed(engine, ("account", first.id))
    assert await used(account_scope(first.id)) == 120
    assert await used(account_scope(bystander.id)) == 0
    daily = Principal(first_key.record.id, first.id, False, None, {"rpd": 10}, {})
    taken = await limits.limiter.acquire(checks_for(daily))
    assert taken.allowed and taken.requests is not None and taken.requests.remaining <= 6
    assert not await limits.limiter.seeded(month_span(now)[2])

    # The other account's plan given a quota: every account on it.
    other_plan = (await accounts.get(second.id)).plan
    await plans.update(other_plan, monthly_tokens=500)
    plan_id = next(p.id for p in await plans.list() if p.name == other_plan)
    assert await limits.seed(engine, ("plan", str(plan_id)))
    assert await used(account_scope(second.id)) == 90
    assert await used(account_scope(bystander.id)) == 0

    # Unknown ids seed nothing and fail nothing.
    for change in [("account", "acct_nope"), ("plan", "nope"), ("plan", "12345678")]:
        assert await limits.seed(engine, change)
    assert await used(account_scope(bystander.id)) == 0

    # What the feed awaits: the accounts' and plans' changes of a poll, never raising.
    await accounts.set_plan(bystander.id, f"capped-{tag}")
    await limits.seed_changes(engine, [("key", bystander_key.record.id), ("account", bystander.id)])
    assert await used(account_scope(bystander.id)) == 60
    broken = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/x.db")
    await limits.seed_changes(broken, [("plan", "1")])  # left to run_seeding, not raised
    await broken.dispose()


async def test_budgets_are_seeded_from_the_months_cost(engine: AsyncEngine, tmp_path: Path) -> None:
    """A monthly budget (US cents) counts nano-dollars under its own scope: the seed reads the
    recorded cost of this month, of the accounts whose plan has a budget and the keys with one."""
    from chatgate.limits import BUDGET_PREFIX, budget_checks_for, refusal
    from chatgate.usage.queries import budget_usage

    spender, other, plain, own = await limited_and_not(engine, "monthly_budget_cents", 500, 100)
    start, _, _ = month_span(time.time())
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for account, key, cost, at in [
        (spender.id, plain.record.id, 1.25, time.time()),
        (spender.id, plain.record.id, 0.5, time.time()),
        (spender.id, plain.record.id, 99.0, start - 1),  # last month
        (other.id, own.record.id, 0.75, time.time()),
    ]:
        recorder.record(make_record(account_id=account, key_id=key, cost=cost, created_at=at))
    await recorder.close()

    spent = await budget_usage(engine, int(start))
    assert spent.accounts == {spender.id: 1_750_000_000}  # $1.75, in nano-dollars
    assert spent.keys == {own.record.id: 750_000_000}
    limits = Limits(MemoryLimiter())
    assert await limits.seed(engine)
    used = limits.limiter.quota_used
    assert await used(BUDGET_PREFIX + account_scope(spender.id)) == 1_750_000_000
    assert await used(BUDGET_PREFIX + key_scope(own.record.id)) == 750_000_000
    assert await used(account_scope(spender.id)) == 0  # its tokens have no quota

    # The checks a request takes: $5.00 less $1.75 leaves room for $3.25, not $3.26.
    principal = Principal(
        plain.record.id, spender.id, False, None, {"monthly_budget_cents": 500}, {}
    )
    [budget] = budget_checks_for(principal)
    assert budget.limit == 5_000_000_000 and budget_checks_for(principal) is principal.budget_checks
    assert (await limits.limiter.acquire([budget], 3_250_000_000)).allowed
    refused = await limits.limiter.acquire([budget], 10_000_000)
    assert not refused.allowed
    error = refusal(refused, "gpt-priced")
    assert error.code == "insufficient_quota" and error.headers["x-should-retry"] == "false"
    assert "Monthly budget: Limit $5.00, Used $5.00, Requested up to $0.01" in error.message
    # Below a cent, what is used reads apart from the limit (it read "$0.01" for both).
    small = Check.monthly_quota("usd:acct:small", 10_000_000)  # a budget of one cent
    assert (await limits.limiter.acquire([small], 8_016_000)).allowed
    refused = await limits.limiter.acquire([small], 3_000_000)
    message = refusal(refused, "gpt-priced").message
    assert "Limit $0.01, Used $0.008016, Requested up to $0.003 " in message, message
