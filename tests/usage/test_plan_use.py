"""The dashboard's "today" and "this month" sums (:func:`usage_view.plan_use`)."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.dashboard.usage_view import plan_use
from chatgate.usage.tables import DAY, HOUR, MINUTE, usage_rollups
from tests.usage.factory import new_account


async def test_todays_requests_are_counted_as_the_daily_limit_counts_them(
    engine: AsyncEngine,
) -> None:
    """QA: after an upgrade across migration 0009 (which filled in ``admitted`` in the hourly
    rollups only), the page showed the day's row, 5 of the day's 17 requests, while the
    requests-per-day limit (seeded from the hourly rows) counted 17 and refused the 21st of 20.
    Here the three widths of one day as that upgrade left them."""
    account = new_account()
    now = int(time.time())
    hour = now // HOUR * HOUR
    rows = [
        (MINUTE, now // MINUTE * MINUTE, 17, 17),
        (HOUR, hour, 17, 17),  # filled in by the migration
        (DAY, now // DAY * DAY, 17, 5),  # only what came after it
    ]
    async with engine.begin() as conn:
        await conn.execute(
            usage_rollups.insert(),
            [
                {
                    "width": width,
                    "bucket_start": start,
                    "account_id": account,
                    "key_id": "key_x",
                    "model": "gpt-test",
                    "endpoint": "chat.completions",
                    "requests": requests,
                    "prompt_tokens": 10 * requests,
                    "completion_tokens": 5 * requests,
                    "cost_nanousd": 0,
                    "errors": 0,
                    "rate_limited": 0,
                    "admitted": admitted,
                }
                for width, start, requests, admitted in rows
            ],
        )
    try:
        use = await plan_use(engine, account, now=now)
        assert use.admitted_today == 17
        assert use.tokens_today == 17 * 15 and use.requests_today == 17
    finally:
        async with engine.begin() as conn:
            mine = usage_rollups.c.account_id == account
            await conn.execute(sa.delete(usage_rollups).where(mine))
