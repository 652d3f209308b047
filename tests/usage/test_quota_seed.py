"""The month's quota counters come back from the usage records (SQLite and PostgreSQL): the
query reads the accounts whose plan has a quota and the keys with one of their own, this
month only; :meth:`Limits.seed_quotas` puts them in the limiter once, under the scopes the
checks use."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore, PlanStore
from chatgate.auth import Principal
from chatgate.keys.store import KeyStore
from chatgate.limits import Limits, account_scope, checks_for, key_scope
from chatgate.ratelimit import MemoryLimiter
from chatgate.ratelimit.base import month_span
from chatgate.settings import Secret
from chatgate.usage.queries import quota_usage
from chatgate.usage.recorder import UsageRecorder
from tests.usage.factory import make_record


async def test_quota_usage_reads_this_months_tokens_of_scopes_with_quotas(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    tag = secrets.token_hex(4)
    plans, accounts = PlanStore(engine), AccountStore(engine)
    keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)))
    await plans.create(f"quota-{tag}", monthly_tokens=1000)
    await plans.create(f"open-{tag}", rpm=10)
    capped = await accounts.create(f"capped-{tag}@example.com", plan=f"quota-{tag}")
    open_ = await accounts.create(f"open-{tag}@example.com", plan=f"open-{tag}")
    plain = await keys.create(capped.id)
    own = await keys.create(open_.id, limits={"monthly_tokens": 500})

    start, _, _ = month_span(time.time())
    now = time.time()
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for account, key, prompt, completion, at in [
        (capped.id, plain.record.id, 10, 5, now),
        (capped.id, plain.record.id, 100, 20, now),
        (capped.id, plain.record.id, 7000, 7000, start - 1),  # last month: not counted
        (open_.id, own.record.id, 30, 3, now),
        (open_.id, "key_" + tag, 1, 1, now),  # a key of no quota, of an account of none
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
    assert plain.record.id not in used.keys and "key_" + tag not in used.keys

    limits = Limits(MemoryLimiter())
    assert await limits.seed_quotas(engine)
    assert not await limits.seed_quotas(engine)  # once: the limiter holds them now
    limiter = limits.limiter
    assert await limiter.quota_used(account_scope(capped.id)) == 135
    assert await limiter.quota_used(key_scope(own.record.id)) == 33
    # Under the scopes the checks charge: the key's own quota holds the seeded 33.
    principal = Principal(own.record.id, open_.id, False, None, {}, {"monthly_tokens": 500})
    refused = await limiter.acquire(checks_for(principal), 468)
    assert not refused.allowed and refused.used == 33
    assert (await limiter.acquire(checks_for(principal), 467)).allowed
