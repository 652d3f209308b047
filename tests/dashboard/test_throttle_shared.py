"""Throttles shared through Redis: N processes hold an attacker to one budget, not N.

Against the real Redis (a prefix of this test's own) and, for the outage, a redis-server this
test owns and stops."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatgate.dashboard.throttle import ACCOUNT_FAILURES
from chatgate.settings import Settings
from chatgate.throttle import RedisWindow, connect
from tests.dashboard.conftest import PASSWORD, make_user
from tests.dashboard.test_throttle import attempt
from tests.helpers import REDIS_URL, Gateway
from tests.redisserver import RedisServer


def settings_for(url: str, prefix: str) -> Settings:
    return Settings.from_env({"CHATGATE_REDIS_URL": url, "CHATGATE_REDIS_PREFIX": prefix})


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"cgthrottle-{secrets.token_hex(4)}:"
    yield prefix
    client = Redis.from_url(REDIS_URL)
    async for key in client.scan_iter(match=prefix + "*"):
        await client.delete(key)
    await client.aclose()


async def test_two_clients_share_one_budget(prefix: str) -> None:
    settings = settings_for(REDIS_URL, prefix)
    first, second = connect(settings), connect(settings)  # as two processes would
    assert first is not None and second is not None
    try:
        a = RedisWindow(first, "login", 4, 60.0, prefix=prefix)
        b = RedisWindow(second, "login", 4, 60.0, prefix=prefix)
        for window in (a, b, a, b):
            assert await window.retry_after("victim@example.com") == 0
            await window.hit("victim@example.com")
        # Four events in all: both now refuse, for about the window's length.
        assert 55 < await a.retry_after("victim@example.com") <= 60
        assert 55 < await b.retry_after("victim@example.com") <= 60
        assert await b.retry_after("someone-else@example.com") == 0
        # take(): counts only what fits.
        assert [await a.take("10.0.0.9") for _ in range(4)] == [0, 0, 0, 0]
        assert await b.take("10.0.0.9") > 0
        # A successful login forgets the account's failures everywhere.
        await b.reset("victim@example.com")
        assert await a.retry_after("victim@example.com") == 0
        # Neither the email nor the address appears in Redis's key space.
        keys = [k.decode() async for k in first.scan_iter(match=prefix + "*")]
        assert keys and not any("victim" in k or "10.0.0.9" in k for k in keys)
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_key_that_is_not_utf8_is_counted(prefix: str) -> None:
    """An address from ``X-Forwarded-For`` with bytes that are not UTF-8 (aiohttp reads them
    as lone surrogates) is counted like any other, not a 500."""
    client = connect(settings_for(REDIS_URL, prefix))
    assert client is not None
    try:
        window = RedisWindow(client, "signup", 1, 60.0, prefix=prefix)
        assert await window.take("10.0.0.\udcff") == 0
        assert await window.take("10.0.0.\udcff") > 0
        assert await window.take("10.0.0.\udcfe") == 0
    finally:
        await client.aclose()


async def test_redis_down_counts_in_process(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect(settings_for(own_redis.url, "t:"))
    assert client is not None
    window = RedisWindow(client, "login", 2, 60.0, prefix="t:")
    try:
        await window.hit("a@x")
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="chatgate.throttle"):
            assert await window.retry_after("a@x") == 0  # only this process's count: 0
            await window.hit("a@x")
            await window.hit("a@x")
            assert await window.retry_after("a@x") > 0  # held back in process
        assert sum("Redis unavailable" in r.getMessage() for r in caplog.records) == 1
        own_redis.start()  # an empty server (no persistence): counting starts over there
        assert await window.retry_after("a@x") == 0
        await window.hit("a@x")
        assert await window.retry_after("a@x") == 0
        await window.hit("a@x")
        assert await window.retry_after("a@x") > 0
    finally:
        await client.aclose()


def test_guessing_across_two_servers_shares_one_budget(pair: list[Gateway]) -> None:
    nodes = pair  # two servers on one database and one Redis
    victim = make_user(nodes[0], login=False)
    # Alternate between the two servers: per process each would allow ACCOUNT_FAILURES.
    for i in range(ACCOUNT_FAILURES):
        assert attempt(nodes[i % 2], victim.email, f"guess {i}").status_code == 401
    assert attempt(nodes[0], victim.email, PASSWORD).status_code == 429
    assert attempt(nodes[1], victim.email, PASSWORD).status_code == 429
