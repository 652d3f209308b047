"""The Redis limiter's round trips (``chatgate/ratelimit/redis.py``): settlements ride on the
next admission, so a request costs one ``EVALSHA``, not two; a timer sends them when no
admission comes; ``aclose`` sends what is queued; failures reach the settles they carried.

Commands are counted by the server, with ``INFO commandstats`` (what ``bench/run.py`` reads),
on a redis-server of this module's own: the shared one counts every other test's commands too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from chatgate.limits import Admission, Limits
from chatgate.ratelimit import (
    Check,
    FailoverLimiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    Reservation,
)
from chatgate.ratelimit.redis import MAX_BATCH
from chatgate.ratelimit.resp import RespClient
from tests.helpers import free_port
from tests.redisserver import RedisServer

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server to start"
)

NEVER = 3600.0  # a flush delay no test waits for: only an admission or aclose sends


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    await client.config_resetstat()
    yield client
    await client.aclose()


class Made:
    """Limiters made by one test, all closed at its end (a flush at most, if any is left)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"test:rlb:{secrets.token_hex(4)}:"
        self.limiters: list[RedisLimiter] = []

    def __call__(self, flush_delay: float = NEVER, timeout: float = 2.0) -> RedisLimiter:
        limiter = RedisLimiter.from_url(
            self.url,
            prefix=self.prefix,
            flush_delay=flush_delay,
            timeout=timeout,
            connect_timeout=timeout,
        )
        self.limiters.append(limiter)
        return limiter


@pytest.fixture
async def make(server: RedisServer) -> AsyncIterator[Made]:
    made = Made(server.url)
    yield made
    for limiter in made.limiters:
        await limiter.aclose()


async def evalsha_calls(admin: aioredis.Redis) -> int:
    """``EVALSHA`` calls since the test's ``CONFIG RESETSTAT`` (NOSCRIPT answers included)."""
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def take(limiter: RedisLimiter, checks: list[Check], tokens: int = 0) -> Reservation:
    decision = await limiter.acquire(checks, tokens)
    assert decision.allowed, decision
    assert decision.reservation is not None
    return decision.reservation


CHECKS = [
    Check.rpm("key:a", 10_000),
    Check.tpm("key:a", 10**7),
    Check.concurrent("acct:x", 50),
    Check.monthly_quota("acct:x", 10**9),
]


# --- one round trip per request --------------------------------------------------------


async def test_n_requests_cost_n_evalsha(make: Made, admin: aioredis.Redis) -> None:
    """Admit, settle, admit, settle...: each settlement rides on the next admission; the last
    one goes out with ``aclose``. The default flush delay: no timer fires between the
    settle and the next acquire, since nothing waits in between."""
    limiter = make(flush_delay=0.02)
    await take(limiter, CHECKS, 10)  # connects and loads the script
    await admin.config_resetstat()
    client = limiter._client
    assert isinstance(client, RespClient)
    sent_before = client.commands_sent
    n = 50
    for _ in range(n):
        res = await take(limiter, CHECKS, 100)
        limiter.settle_nowait(res, 42)
    assert limiter.pending == 1  # request n's settlement: nothing followed it
    assert await evalsha_calls(admin) == n
    assert client.commands_sent - sent_before == n
    await limiter.aclose()
    assert await evalsha_calls(admin) == n + 1
    assert await admin.zcard(make.prefix + "acct:x|c") == 1  # only the warm-up's slot
    assert await make().quota_used("acct:x") == 10 + 42 * n  # the warm-up is not settled


async def test_concurrent_requests_through_limits_cost_about_one_evalsha_each(
    make: Made, admin: aioredis.Redis
) -> None:
    """The gateway's own path (``Limits.admit`` then ``settle_soon``), 8 requests at a time
    with a short "upstream" wait: N requests, N ``EVALSHA`` plus a few timer flushes (at
    the end, and wherever the shared machine stalls the loop for 20 ms)."""
    limits = Limits(make(flush_delay=0.02), remote=True)
    await limits.admit(CHECKS, 10, "m")  # connect, load the script (never settled)
    await admin.config_resetstat()
    n, workers = 200, 8

    async def worker() -> None:
        for _ in range(n // workers):
            admission = await limits.admit(CHECKS, 100, "m")
            await asyncio.sleep(0.002)  # the upstream call
            await limits.settle_soon(admission, 30)

    await asyncio.gather(*(worker() for _ in range(workers)))
    await limits.close()  # sends what is still queued
    calls = await evalsha_calls(admin)
    assert n + 1 <= calls <= n + n // 10, calls  # two per request before
    assert await make().quota_used("acct:x") == 10 + 30 * n


async def test_many_settlements_go_in_few_calls(make: Made, admin: aioredis.Redis) -> None:
    limiter = make()
    checks = [Check.concurrent("acct:x", 1000), Check.tpm("acct:x", 10**6)]
    held = [await take(limiter, checks, 100) for _ in range(150)]
    await admin.config_resetstat()
    futures = [limiter.settle_nowait(res, 10) for res in held]
    await limiter.aclose()
    assert all(f.result() for f in futures)
    assert await evalsha_calls(admin) == math.ceil(150 / MAX_BATCH)  # 3 calls, not 150
    assert await admin.zcard(make.prefix + "acct:x|c") == 0
    level = float(await admin.hget(make.prefix + "acct:x|t|60", "l") or 0)
    assert level <= 150 * 10  # charged the 10 used, not the 100 reserved


# --- what a process sees of its own settlements -----------------------------------------


async def test_sequential_concurrency_one_is_admitted_at_once(make: Made) -> None:
    """The settlement of request 1 is applied in the same script, just before request 2's
    admission: no timer involved (it would take an hour here)."""
    one, other = make(), make()
    checks = [Check.concurrent("acct:x", 1), Check.tpm("acct:x", 100)]
    first = await take(one, checks, 80)
    one.settle_nowait(first, 20)
    # Another process sees the slot freed only once the settlement has been sent.
    assert not (await other.acquire(checks, 10)).allowed
    second = await take(one, checks, 80)  # 20 used + 80 fit; the slot is free
    assert (await other.acquire(checks, 10)).failed == checks[1]  # 6 s, longer than a slot's
    assert (await other.acquire(checks[:1])).failed == checks[0]  # request 2 holds it
    one.settle_nowait(second, 0)

    limits = Limits(one, remote=True)  # the same through the gateway's calls
    for _ in range(3):
        admission = await limits.admit(checks, 50, "m")
        await limits.settle_soon(admission, 5)
    assert one.pending == 1
    await limits.close()  # sends it
    assert (await other.acquire(checks, 10)).allowed


async def test_timer_sends_settlements_when_no_admission_follows(
    make: Made, admin: aioredis.Redis
) -> None:
    limiter = make(flush_delay=0.05)
    checks = [Check.tpm("key:a", 100), Check.concurrent("key:a", 1)]
    res = await take(limiter, checks, 80)
    bucket = make.prefix + "key:a|t|60"
    assert float(await admin.hget(bucket, "l") or 0) > 79.0
    await admin.config_resetstat()
    settled = limiter.settle_nowait(res, 20)
    assert limiter.pending == 1 and not settled.done()
    assert await asyncio.wait_for(settled, 5.0) is True  # the timer's flush answered
    assert limiter.pending == 0
    level = float(await admin.hget(bucket, "l") or 0)
    assert 19.0 < level <= 20.0  # back from 80 to the 20 used (minus what drained)
    assert await admin.zcard(make.prefix + "key:a|c") == 0
    assert await evalsha_calls(admin) == 1
    assert (await make().acquire(checks, 80)).allowed  # another process sees it all


async def test_awaited_settle_returns_once_applied(make: Made) -> None:
    limiter, other = make(flush_delay=0.01), make()
    checks = [Check.monthly_quota("acct:x", 1000), Check.concurrent("acct:x", 1)]
    res = await take(limiter, checks, 300)
    assert await limiter.settle(res, 120)
    assert await other.quota_used("acct:x") == 120
    assert (await other.acquire(checks, 1)).allowed
    assert not await limiter.settle(res, 120)  # once only, and nothing queued for it
    assert limiter.pending == 0


async def test_aclose_sends_queued_settlements(make: Made) -> None:
    limiter = make()
    checks = [Check.monthly_quota("acct:x", 1000), Check.concurrent("acct:x", 1)]
    res = await take(limiter, checks, 300)
    settled = limiter.settle_nowait(res, 30)
    await asyncio.sleep(0.05)
    assert not settled.done() and limiter.pending == 1  # waiting for an admission
    await limiter.aclose()
    assert settled.result() is True
    other = make()
    assert await other.quota_used("acct:x") == 30
    assert (await other.acquire(checks, 1)).allowed


async def test_reads_and_resets_come_after_own_settlements(make: Made) -> None:
    limiter = make()
    checks = [Check.monthly_quota("acct:x", 1000), Check.tpm("acct:x", 1000)]
    res = await take(limiter, checks, 300)
    limiter.settle_nowait(res, 30)
    assert await limiter.quota_used("acct:x") == 30
    res = await take(limiter, checks, 300)
    limiter.settle_nowait(res, 1000)  # would re-create the buckets after the reset
    await limiter.reset("acct:x")
    assert await limiter.quota_used("acct:x") == 0


# --- cancellation and NOSCRIPT ----------------------------------------------------------


async def test_cancelled_settle_and_cancelled_acquire_still_settle(make: Made) -> None:
    limiter, other = make(), make()
    checks = [Check.concurrent("acct:x", 2)]
    a, b = await take(limiter, checks), await take(limiter, checks)
    task = asyncio.create_task(limiter.settle(a, 0))
    await asyncio.sleep(0)  # queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    carried = limiter.settle_nowait(b, 0)
    acquiring = asyncio.create_task(limiter.acquire(checks))  # carries both settlements
    await asyncio.sleep(0)
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    assert await asyncio.wait_for(carried, 5.0) is True
    await limiter.aclose()  # the cancelled acquire's slot is released too
    assert (await other.acquire([Check.concurrent("acct:x", 2)])).allowed
    assert (await other.acquire([Check.concurrent("acct:x", 2)])).allowed


async def test_acquire_cancelled_after_its_reply_came_leaks_nothing(
    make: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands after the script's reply was read but before the caller resumed (the
    reply's future is done; the caller sees CancelledError): what was taken is given back."""
    limiter, other = make(), make()
    checks = [Check.concurrent("acct:x", 1), Check.monthly_quota("acct:x", 1000)]
    first = await take(limiter, checks, 1)  # connected, the script loaded
    limiter.settle_nowait(first, 0)  # freed by the next admission
    acquiring: asyncio.Task[object] | None = None
    dispatch = limiter._dispatch

    def cancel_on_reply(*args: object) -> object:
        call, outcome = dispatch(*args)  # type: ignore[arg-type]
        # Runs before the caller's own wake-up, which outcome gets when the caller awaits it.
        outcome.add_done_callback(lambda _: acquiring.cancel() if acquiring else None)
        return call, outcome

    monkeypatch.setattr(limiter, "_dispatch", cancel_on_reply)
    acquiring = asyncio.create_task(limiter.acquire(checks, 500))
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    monkeypatch.undo()
    assert limiter.pending == 1  # the release, queued
    await limiter.aclose()
    assert await other.quota_used("acct:x") == 0
    assert (await other.acquire(checks, 1000)).allowed  # the slot is free


async def test_aclose_waits_for_the_reply_of_a_cancelled_acquire(make: Made) -> None:
    """Cancelled with its script on the wire, then the limiter closed at once: closing waits
    for that reply, and gives back what the script took."""
    limiter, other = make(), make()
    checks = [Check.concurrent("acct:x", 1), Check.monthly_quota("acct:x", 1000)]
    limiter.settle_nowait(await take(limiter, checks, 1), 0)  # connected, the script loaded
    acquiring = asyncio.create_task(limiter.acquire(checks, 500))
    await asyncio.sleep(0)  # the call is written
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    await limiter.aclose()
    assert await other.quota_used("acct:x") == 0
    assert (await other.acquire(checks, 1000)).allowed


async def test_a_busy_limiter_keeps_one_timer(make: Made) -> None:
    """Settlements queued again and again, each taken by the next admission: the timer set for
    the first is not cancelled and set anew each time, and when it fires it sends nothing
    that has not waited the whole delay."""
    limiter = make(flush_delay=1.0)
    checks = [Check.concurrent("acct:x", 2)]
    res = await take(limiter, checks)
    limiter.settle_nowait(res, 0)
    timer = limiter._timer
    assert timer is not None
    for _ in range(5):
        await asyncio.sleep(0.05)
        res = await take(limiter, checks)  # carries the queued settlement
        assert limiter.pending == 0
        settled = limiter.settle_nowait(res, 0)
        assert limiter._timer is timer
    while limiter._timer is timer:  # until it fires, ~1 s after the first settlement
        await asyncio.sleep(0.01)
    assert not settled.done() and limiter.pending == 1  # 0.75 s old: it waits
    assert limiter._timer is not None  # set again, for that one
    assert await asyncio.wait_for(settled, 5.0) is True


async def test_noscript_resends_once_and_settles_once(make: Made, admin: aioredis.Redis) -> None:
    limiter = make()
    checks = [Check.monthly_quota("acct:x", 10_000)]
    res = await take(limiter, checks, 100)
    settled = limiter.settle_nowait(res, 130)  # +30: applied twice it would read 160
    await admin.script_flush()  # a restart or failover: the script is gone
    await admin.config_resetstat()
    await take(limiter, checks, 10)  # NOSCRIPT, SCRIPT LOAD, the same call again
    assert settled.result() is True
    assert await evalsha_calls(admin) == 2
    assert await limiter.quota_used("acct:x") == 140


# --- a dead Redis -----------------------------------------------------------------------


async def test_dead_redis_fails_the_settlements_it_was_sent(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisLimiter.from_url(own_redis.url, prefix="t:", flush_delay=0.01, timeout=0.5)
    failover = FailoverLimiter(limiter, MemoryLimiter())
    checks = [Check.concurrent("acct:x", 10)]
    try:
        held = [await take(limiter, checks) for _ in range(3)]
        ridden = [await failover.acquire(checks) for _ in range(3)]
        own_redis.stop(signal.SIGKILL)
        with pytest.raises(LimiterUnavailable):  # the timer's flush failed
            await limiter.settle(held[0], 0)
        carried = limiter.settle_nowait(held[1], 0)
        with pytest.raises(LimiterUnavailable):  # the admission that carried it failed
            await limiter.acquire(checks)
        with pytest.raises(LimiterUnavailable):
            await carried
        with caplog.at_level(logging.WARNING, logger="chatgate.limits"):
            limits = Limits(limiter, remote=True)
            await limits.settle_soon(Admission(held[2], {}), 0)  # queued, never raises
            await limits.close()
        assert "could not settle" in caplog.text
        # Behind the failover: not raised, counted.
        first = ridden[0].reservation
        assert first is not None
        assert await failover.settle(first, 0) is False
        second = ridden[1].reservation
        assert second is not None
        assert await failover.settle_nowait(second, 0) is False
        assert failover.settle_failures == 2
    finally:
        await limiter.aclose()


async def test_a_redis_refusing_writes_is_unavailable_not_an_error(
    own_redis: RedisServer,
) -> None:
    """A Redis that cannot save its snapshot refuses every write (``-MISCONF``, as when its
    disk is full), and one restarted with a password refuses a connection that sent none
    (``-NOAUTH``): the store cannot be used, so the limiter is unavailable and the failover
    answers as the policy says, instead of each request failing with a 500."""
    admin = aioredis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter.from_url(own_redis.url, prefix="t:", timeout=2.0)
    failover = FailoverLimiter(limiter, MemoryLimiter())
    checks = [Check.rpm("key:a", 100)]
    try:
        await take(limiter, checks)
        shutil.rmtree(own_redis.dir)  # nowhere to write a snapshot
        await admin.config_set("save", "3600 1")
        await admin.bgsave()
        for _ in range(100):
            if (await admin.info("persistence"))["rdb_last_bgsave_status"] == "err":
                break
            await asyncio.sleep(0.05)
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire(checks)
        assert (await failover.acquire(checks)).allowed
        assert failover.fallbacks == 1
        await admin.config_set("save", "")  # writes accepted again
        await take(limiter, checks)
        await admin.config_set("requirepass", "p" + secrets.token_hex(8))
        fresh = RedisLimiter.from_url(own_redis.url, prefix="t:", timeout=2.0)
        try:
            with pytest.raises(LimiterUnavailable):  # -ERR Protocol error (a long command)
                await fresh.acquire(checks)
            with pytest.raises(LimiterUnavailable):  # -NOAUTH
                await fresh.quota_used("acct:x")
        finally:
            await fresh.aclose()
    finally:
        await limiter.aclose()
        await admin.aclose()


async def _admitted_within(limiter: RedisLimiter, checks: list[Check], tokens: int) -> bool:
    """Whether ``limiter`` admits the request within 10 s (polling; no time is asserted)."""
    for _ in range(50):
        if (await limiter.acquire(checks, tokens)).allowed:
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.parametrize("outage", ["read-only", "down"])
async def test_settlements_that_did_not_run_are_sent_again(
    own_redis: RedisServer, outage: str
) -> None:
    """Settlements whose call certainly did not run (Redis refusing it as a read-only replica,
    or not reachable at all) are sent again once it is back: they were dropped, so the
    request's concurrency slot stayed taken until its lease expired (15 minutes) and its
    unused reserved tokens stayed charged. Here the slot (a limit of 1) and 700 of 1,000
    tokens come back, and another process is admitted."""
    admin = aioredis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter.from_url(own_redis.url, prefix="t:", flush_delay=0.01, timeout=2.0)
    other = RedisLimiter.from_url(own_redis.url, prefix="t:", timeout=2.0)
    checks = [Check.concurrent("acct:x", 1), Check.tpm("acct:x", 1000)]
    try:
        held = await take(limiter, checks, 800)
        assert not (await other.acquire(checks, 800)).allowed
        if outage == "read-only":
            await admin.replicaof("127.0.0.1", str(free_port()))  # a master that is gone
        else:
            await admin.save()  # the lease and the tokens survive the restart below
            own_redis.stop()
        with pytest.raises(LimiterUnavailable):  # the caller still hears of the outage
            await limiter.settle(held, 100)
        if outage == "read-only":
            await admin.replicaof("NO", "ONE")
        else:
            own_redis.start()
        assert await _admitted_within(other, checks, 800)
    finally:
        await limiter.aclose()
        await other.aclose()
        await admin.aclose()


@pytest.mark.parametrize("plan", ["quota only", "concurrency"])
async def test_a_failed_settlement_outlives_a_short_lease(
    own_redis: RedisServer, plan: str
) -> None:
    """Failed settlements are sent again for HOLD_LIMIT (15 minutes), not only for the lease
    TTL (now 60 s by default; 3 s here): a quota's unused reservation still comes back after
    an outage longer than the TTL. With a concurrency limit the lease is gone by then (its
    set expired in Redis); the settlement moves its tokens all the same, since no call that
    carried it can have run (a negative bucket count tells the script so)."""
    admin = aioredis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter.from_url(
        own_redis.url, prefix="h:", flush_delay=0.01, timeout=1.0, lease_ttl=3.0
    )
    checks = [Check.monthly_quota("acct:x", 1000)]
    if plan == "concurrency":
        checks.insert(0, Check.concurrent("acct:x", 2))
    try:
        held = await take(limiter, checks, 800)
        await admin.save()  # the counter survives the restart below
        own_redis.stop()
        with pytest.raises(LimiterUnavailable):
            await limiter.settle(held, 100)
        await asyncio.sleep(4.5)  # longer than the lease TTL; sent again every second meanwhile
        own_redis.start()
        for _ in range(50):  # the next resend applies it (polling; no time is asserted)
            if await limiter.quota_used("acct:x") == 100:
                break
            await asyncio.sleep(0.2)
        assert await limiter.quota_used("acct:x") == 100  # 700 unused tokens given back
    finally:
        await limiter.aclose()
        await admin.aclose()


class LossyProxy:
    """A TCP proxy in front of a real redis-server that loses the next ``EVALSHA`` on demand,
    closing the client's connection after it was written: ``lose = "request"``, and Redis
    never gets it; ``lose = "reply"``, and Redis runs it but its answer never comes back. The
    client cannot tell the two apart (a call lost after it was written may have run)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.lose: str | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        drop_reply = asyncio.Event()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if drop_reply.is_set():
                    break
                writer.write(data)
            writer.close()

        relay = asyncio.create_task(replies())
        try:
            while data := await reader.read(65536):
                if self.lose is not None and b"EVALSHA" in data:
                    lost, self.lose = self.lose, None
                    if lost == "request":
                        break
                    drop_reply.set()
                up_writer.write(data)
        finally:
            if not drop_reply.is_set():
                relay.cancel()
                writer.close()
            await asyncio.sleep(0.1)  # a dropped reply: Redis has answered by then
            up_writer.close()


@pytest.mark.parametrize("plan", ["concurrency", "quota only"])
@pytest.mark.parametrize("lost", ["request", "reply"])
async def test_a_lost_settlement_that_frees_a_slot_is_sent_again_and_applies_once(
    server: RedisServer, lost: str, plan: str
) -> None:
    """A settlement whose call was lost after it was written may have run, so it was not sent
    again: when it had not run, its request's concurrency slot stayed taken until its lease
    expired (15 minutes). A settlement that frees a slot is now sent again, and applies once
    (its tokens move only with the slot): here the slot (a limit of 1) comes back, and the
    quota holds the real 100 tokens, not the 800 reserved (the request lost) nor 100 - 700
    again (the reply lost: the first call ran). A plan with a quota and no concurrency limit
    holds a marker lease for it (``_marker``): it kept the 800 before."""
    proxy = await LossyProxy(server.port).start()
    prefix = f"test:lossy:{secrets.token_hex(4)}:"
    limiter = RedisLimiter.from_url(proxy.url, prefix=prefix, flush_delay=0.01, timeout=2.0)
    other = RedisLimiter.from_url(server.url, prefix=prefix, timeout=2.0)
    checks = [Check.monthly_quota("acct:x", 10**6)]
    if plan == "concurrency":
        checks.insert(0, Check.concurrent("acct:x", 1))
    try:
        held = await take(limiter, checks, 800)
        proxy.lose = lost
        with pytest.raises(LimiterUnavailable):  # the caller hears of it, and goes on
            await limiter.settle(held, 100)
        assert await _admitted_within(other, checks, 0)
        await asyncio.sleep(2.5)  # only waits: the resend (every second) has gone by then
        assert await other.quota_used("acct:x") == 100
    finally:
        await limiter.aclose()
        await other.aclose()
        await proxy.close()
