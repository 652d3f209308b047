"""Redis pub/sub wake-ups of the invalidation feed (:mod:`chatgate.notify`), on a real Redis:
the shared one (a channel per test) and, where it must die, a redis-server this file owns.

The end-to-end tests set the database poll to many seconds, so that only a Redis message can
explain a change reaching the other process within a second.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio
import requests

from chatgate.accounts import AccountStore
from chatgate.db.engine import create_engine, migrate
from chatgate.keys import format as keyfmt
from chatgate.keys.store import KeyStore
from chatgate.notify import Listener, Notifier, feed_channel
from chatgate.settings import Secret, Settings
from tests.helpers import REDIS_URL, Gateway, Upstream, drop_redis_prefix, make_gateway
from tests.redisserver import RedisServer
from tests.test_limits_e2e import BODY

FAST = 1.0  # seconds: the bound for a change to reach every process


def _settings(url: str = REDIS_URL) -> Settings:
    return Settings(redis_url=url, redis_prefix=f"cgnotify-{secrets.token_hex(4)}:")


async def _until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Wakes:
    """Counts ``wake`` calls, as :meth:`chatgate.auth.Authenticator.wake` would receive them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


# -- publisher and listener, in process ------------------------------------------------------


async def test_a_publish_wakes_every_listener() -> None:
    settings = _settings()
    wakes = [Wakes(), Wakes()]
    tasks = []
    for wake in wakes:
        listener = Listener.from_settings(settings)
        assert listener is not None
        tasks.append(asyncio.create_task(listener.run(wake)))
    try:
        # Subscribing wakes once by itself: changes made before it were announced to nobody.
        await _until(lambda: all(w.count == 1 for w in wakes), 5)
        notifier = Notifier.from_settings(settings)
        assert notifier is not None
        start = time.monotonic()
        await notifier.publish()
        await _until(lambda: all(w.count == 2 for w in wakes), FAST)
        elapsed = time.monotonic() - start
        print(f"\npublish -> both listeners woken: {elapsed * 1000:.1f} ms")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_without_redis_url_there_is_nothing_to_run() -> None:
    settings = Settings()
    assert Notifier.from_settings(settings) is None and Listener.from_settings(settings) is None
    assert settings.effective_invalidation_poll == 0.25
    assert _settings().effective_invalidation_poll == 1.0
    assert Settings.from_env({"CHATGATE_INVALIDATION_POLL": "30"}).effective_invalidation_poll == 30
    assert feed_channel(Settings(redis_prefix="x:")) == "x:invalidations"


async def test_a_listener_cancelled_as_it_connects_stops() -> None:
    """Cancelled at any moment of its start (a server stopped as it starts, or while it
    reconnects), the listener ends. redis-py connects and writes through ``asyncio.wait_for``,
    which on Python 3.11 swallows a cancel that comes as the write completes: the listener
    went on listening, and a stop waited for it forever (``chatgate serve`` with Redis on a
    port in use hung instead of reporting it)."""
    settings = _settings()
    for step in range(40):
        listener = Listener.from_settings(settings)
        assert listener is not None
        task = asyncio.create_task(listener.run(Wakes()))
        await asyncio.sleep(step * 0.0005)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        if not done:  # cancel it for good, then fail
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
        assert done, f"the listener ran on after a cancel {step * 0.5} ms into its start"


async def test_publish_to_a_dead_redis_neither_raises_nor_waits_and_logs_once(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_settings(_settings(own_redis.url))
    assert notifier is not None
    own_redis.stop(signal.SIGKILL)
    with caplog.at_level(logging.INFO, logger="chatgate.notify"):
        for _ in range(3):
            start = time.monotonic()
            await notifier.publish()  # no exception
            assert time.monotonic() - start < 0.5
        own_redis.start()
        await notifier.publish()
    messages = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == "chatgate.notify"
    ]
    assert [level for level, _ in messages] == ["WARNING", "INFO"], messages
    assert "cannot publish" in messages[0][1] and "publishing again" in messages[1][1]


async def test_listener_reconnects_after_redis_restarts(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(own_redis.url)
    listener, notifier = Listener.from_settings(settings), Notifier.from_settings(settings)
    assert listener is not None and notifier is not None
    wakes = Wakes()
    with caplog.at_level(logging.INFO, logger="chatgate.notify"):
        task = asyncio.create_task(listener.run(wakes))
        try:
            await _until(lambda: listener.subscribed, 5)
            own_redis.stop(signal.SIGKILL)
            await _until(lambda: not listener.subscribed, 5)
            await asyncio.sleep(2.0)  # several failed reconnections: still one log line
            own_redis.start()
            await _until(lambda: listener.subscribed, 10)
            assert wakes.count == 2  # the first subscription, and the catch-up after the outage
            await notifier.publish()
            await _until(lambda: wakes.count == 3, FAST)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "chatgate.notify"]
    assert [level for level, _ in levels] == ["WARNING", "INFO"], levels
    assert "subscribed again" in levels[1][1]


async def test_only_committed_invalidations_are_announced(tmp_path: Path) -> None:
    """A change publishes after its commit; one that changes nothing or fails publishes not."""
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=REDIS_URL,
        redis_prefix=f"cgnotify-{secrets.token_hex(4)}:",
    )
    engine = create_engine(settings)
    await migrate(engine)
    notifier = Notifier.from_settings(settings)
    keys = KeyStore(engine, Secret("s-" + secrets.token_hex(8)), notifier=notifier)
    accounts = AccountStore(engine, notifier)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    await pubsub.subscribe(feed_channel(settings))
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"  # type: ignore[index]

    async def announced() -> int:
        count = 0
        while await pubsub.get_message(timeout=0.3) is not None:
            count += 1
        return count

    try:
        account = await accounts.create(f"n-{secrets.token_hex(4)}@example.com")
        assert await announced() == 0  # a new account invalidates nothing
        issued = await keys.create(account.id)
        assert await announced() == 1
        await keys.revoke(issued.record.id)
        assert await announced() == 1
        assert (await keys.revoke_by_key(issued.key)).outcome == "already_revoked"
        assert (await keys.revoke_by_key(keyfmt.generate())).outcome == "unknown"
        with pytest.raises(Exception, match="No such account"):
            await accounts.set_plan("acct_missing", "free")  # rolls back
        assert await announced() == 0
        await accounts.set_plan(account.id, "pro")
        assert await announced() == 1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        await engine.dispose()


# -- two real server processes ---------------------------------------------------------------


def _status(node: Gateway, key: str) -> int:
    """A cheap authenticated request: 200, or 401 once the key is refused."""
    return requests.get(
        node.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def _chat(node: Gateway, key: str) -> requests.Response:
    return requests.post(
        node.url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def _rpm(node: Gateway, key: str) -> str:
    """The requests-per-minute limit the node applies to ``key`` (its plan's, here)."""
    response = _chat(node, key)
    assert response.status_code == 200, response.text
    return response.headers["x-ratelimit-limit-requests"]


def _seconds_until(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"not seen within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def _nodes(tmp_path: Path, pg_url: str, upstream: Upstream, env: dict[str, str]) -> list[Gateway]:
    return [
        make_gateway(tmp_path / f"n{i}", database_url=pg_url, upstream=upstream, extra_env=env)
        for i in range(2)
    ]


def _account(node: Gateway, plan: str, *, admin: bool = False) -> tuple[str, str]:
    """A new account on ``plan``: its email and the account's first key."""
    email = f"n{secrets.token_hex(4)}@example.com"
    node.cli("accounts", "create", email, "--plan", plan, *(["--admin"] if admin else []))
    return email, str(node.cli_json("keys", "create", "--account", email)["key"])


def test_changes_reach_the_other_process_by_pubsub_within_a_second(
    pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    prefix = f"cgnotify-{secrets.token_hex(4)}:"
    env = {
        "CHATGATE_REDIS_URL": REDIS_URL,
        "CHATGATE_REDIS_PREFIX": prefix,
        "CHATGATE_INVALIDATION_POLL": "30",  # the feed alone would take up to 30 s
        "CHATGATE_KEY_CACHE_TTL": "600",  # and the cache TTL far longer
    }
    nodes = _nodes(tmp_path, pg_url, upstream, env)
    cli = nodes[0]  # the CLI: a third process, with the same settings
    cli.cli("migrate")  # before any node: the commands below make no database
    plan_a, plan_b = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    cli.cli("plans", "create", plan_a, "--rpm", "1000")
    cli.cli("plans", "create", plan_b, "--rpm", "999")
    email, owner_key = _account(cli, plan_a)
    victims = [cli.cli_json("keys", "create", "--account", email) for _ in range(2)]
    _, admin_key = _account(cli, "enterprise", admin=True)
    for node in nodes:
        node.start()
    timings: dict[str, float] = {}
    try:
        for node in nodes:  # everything cached on both
            assert [_status(node, v["key"]) for v in victims] == [200, 200]
            assert _rpm(node, owner_key) == "1000"

        # Revoked through one server's API: the other refuses the key.
        revoked = requests.post(
            f"{nodes[0].url}/api/keys/{victims[0]['id']}/revoke",
            headers={"Authorization": f"Bearer {owner_key}"},
            timeout=10,
        )
        assert revoked.status_code == 200, revoked.text
        timings["revoke via /api/keys"] = _seconds_until(
            lambda: _status(nodes[1], victims[0]["key"]) == 401, FAST
        )

        # Revoked with the CLI (its own process): both servers refuse the key.
        cli.cli("keys", "revoke", victims[1]["id"])
        timings["revoke via CLI"] = _seconds_until(
            lambda: [_status(n, victims[1]["key"]) for n in nodes] == [401, 401], FAST
        )

        # The account moved to another plan with the CLI.
        cli.cli("accounts", "set-plan", email, plan_b)
        timings["set-plan via CLI"] = _seconds_until(
            lambda: _rpm(nodes[1], owner_key) == "999", FAST
        )

        # The plan's limits changed through one server's admin API.
        patched = requests.patch(
            f"{nodes[0].url}/api/admin/plans/{plan_b}",
            json={"rpm": 998},
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=10,
        )
        assert patched.status_code == 200, patched.text
        timings["plan update via API"] = _seconds_until(
            lambda: _rpm(nodes[1], owner_key) == "998", FAST
        )
    finally:
        for node in nodes:
            node.stop()
        drop_redis_prefix(prefix)
    print("\n" + "\n".join(f"{what}: {sec * 1000:.0f} ms" for what, sec in timings.items()))


def test_redis_down_requests_served_and_changes_arrive_by_the_poll(
    pg_url: str, upstream: Upstream, tmp_path: Path, own_redis: RedisServer
) -> None:
    poll = 3.0
    env = {
        "CHATGATE_REDIS_URL": own_redis.url,
        "CHATGATE_INVALIDATION_POLL": str(poll),
        "CHATGATE_KEY_CACHE_TTL": "600",
    }
    nodes = _nodes(tmp_path, pg_url, upstream, env)
    cli = nodes[0]
    cli.cli("migrate")
    plan = f"d{secrets.token_hex(3)}"
    cli.cli("plans", "create", plan, "--rpm", "1000")  # limited: the Redis limiter is in play
    email, keep = _account(cli, plan)
    victims = [cli.cli_json("keys", "create", "--account", email) for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            assert [_status(node, v["key"]) for v in [*victims, {"key": keep}]] == [200] * 3
        own_redis.stop(signal.SIGKILL)

        # Requests are still served (the limiter fails open), changes still commit...
        assert [_status(n, keep) for n in nodes] == [200, 200]
        assert [_chat(n, keep).status_code for n in nodes] == [200, 200]
        start = time.monotonic()
        result = cli.cli("keys", "revoke", victims[0]["id"])
        assert result.returncode == 0
        assert time.monotonic() - start < 10  # the CLI's start-up, not a hang on Redis
        # ... and reach every server by the database poll.
        waited = _seconds_until(
            lambda: [_status(n, victims[0]["key"]) for n in nodes] == [401, 401], poll + 1.5
        )
        assert [_status(n, keep) for n in nodes] == [200, 200]

        # Redis comes back: the listeners subscribe again and pub/sub carries changes again.
        own_redis.start()
        deadline = time.monotonic() + 15
        while not all("subscribed again" in n.logs() for n in nodes):
            assert time.monotonic() < deadline, "a listener did not subscribe again"
            time.sleep(0.1)
        revoked = requests.post(
            f"{nodes[0].url}/api/keys/{victims[1]['id']}/revoke",
            headers={"Authorization": f"Bearer {keep}"},
            timeout=10,
        )
        assert revoked.status_code == 200, revoked.text
        again = _seconds_until(lambda: _status(nodes[1], victims[1]["key"]) == 401, FAST)
    finally:
        for node in nodes:
            node.stop()
        own_redis.stop(signal.SIGKILL)
    for node in nodes:
        assert node.logs().count("invalidation channel: not subscribed") == 1
    print(f"\nRedis down, by the poll ({poll} s): {waited:.2f} s; back on pub/sub: {again:.3f} s")
