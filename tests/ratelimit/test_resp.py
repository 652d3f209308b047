"""The limiter's own Redis client (``chatgate/ratelimit/resp.py``): the wire format, pipelining
on one connection, failures, and the limiter on top of it (one command per acquire or settle,
scripts reloaded after a flush). Real Redis at 127.0.0.1:6379, keys under a random prefix; the
test that flushes the scripts has a redis-server of its own (the shared one's scripts are other
tests' and processes')."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from chatgate.ratelimit import Check, LimiterUnavailable, RedisLimiter
from chatgate.ratelimit.base import DEFAULT_LEASE_TTL, QUOTA_RETENTION, month_end
from chatgate.ratelimit.redis import MARKER_LIMIT
from chatgate.ratelimit.resp import (
    ReplyError,
    RespClient,
    ServerUnavailable,
    _Incomplete,
    _parse,
    encode,
    encode_int,
    encode_once,
    pack,
    parse_command,
)
from tests.redisserver import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


needs_redis = pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")


def test_pack_is_resp2_bulk_strings() -> None:
    assert pack("SET", "k", 12, 0.5, b"\x00") == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\n0.5\r\n$1\r\n\x00\r\n"
    )


def test_pack_encodes_repeats_as_the_first_time() -> None:
    """Short arguments are encoded once and looked up after: by type and value, so 1, 1.0
    and True (equal in Python) keep their own encodings; past the memo's size it starts
    over; long and unhashable ones are encoded each time."""
    for _ in range(2):
        assert pack(1, 1.0, True, "1", b"1") == (
            b"*5\r\n$1\r\n1\r\n$3\r\n1.0\r\n$4\r\nTrue\r\n$1\r\n1\r\n$1\r\n1\r\n"
        )
    long = "x" * 1000
    assert pack(long, bytearray(b"ab")) == b"*2\r\n$1000\r\n" + long.encode() + b"\r\n$2\r\nab\r\n"
    for i in range(10_000):  # more distinct ones than are kept (lease ids do this)
        assert pack(f"lease-{i}") == b"*1\r\n$%d\r\nlease-%d\r\n" % (6 + len(str(i)), i)
    assert pack("é") == b"*1\r\n$2\r\n\xc3\xa9\r\n"  # the length is in bytes


def test_encode_int_and_encode_once_are_encode() -> None:
    """The limiter's shortcuts (a table of small ints, strings sent once) encode as
    :func:`encode` does, across the table's edges."""
    for n in (-1025, -1, 0, 1, 1023, 1024, 10**12):
        assert encode_int(n) == encode(n) == b"$%d\r\n%d\r\n" % (len(str(n)), n)
    for text in ("", "lease-ff", "é"):
        assert encode_once(text) == encode(text)


def test_parse_every_reply_type() -> None:
    reply = b"*5\r\n:1\r\n$3\r\nabc\r\n$-1\r\n*1\r\n+OK\r\n-ERR bad\r\n"
    value, end = _parse(reply, 0)
    assert end == len(reply)
    assert value[:4] == [1, b"abc", None, ["OK"]]
    assert isinstance(value[4], ReplyError) and str(value[4]) == "ERR bad"
    loading, _ = _parse(b"-LOADING Redis is loading\r\n", 0)
    assert isinstance(loading, ServerUnavailable)  # a ConnectionError: "unavailable"
    inner, _ = _parse(b"*2\r\n$4\r\na\r\nb\r\n$0\r\n\r\n", 0)  # a CRLF inside a bulk string
    assert inner == [b"a\r\nb", b""]
    partials = (b"*2\r\n:1\r\n", b"$5\r\nab", b":12", b"*1\r\n$5\r\nab", b"*1\r\n$5", b"*1\r\n:")
    for partial in partials:
        with pytest.raises(_Incomplete):
            _parse(partial, 0)


@pytest.fixture
async def client() -> AsyncIterator[RespClient]:
    c = RespClient(REDIS_URL, timeout=2.0, connect_timeout=2.0)
    yield c
    await c.aclose()


@needs_redis
async def test_concurrent_calls_are_pipelined_on_one_connection(client: RespClient) -> None:
    key = f"test:resp:{secrets.token_hex(6)}"
    try:
        results = await asyncio.gather(*(client.call("INCR", key) for _ in range(200)))
        assert sorted(results) == list(range(1, 201))
        assert client.commands_sent == 200
        with pytest.raises(ReplyError):
            await client.call("NO-SUCH-COMMAND")
        assert await client.call("GET", key) == b"200"  # still in step after an error
    finally:
        await client.call("DEL", key)


async def test_no_reply_in_time_fails_every_pending_command() -> None:
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}", timeout=0.2)
    try:
        calls = [asyncio.ensure_future(client.call("PING")) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results)
    finally:
        await client.aclose()
        silent.close()
        await silent.wait_closed()


async def test_nothing_listening_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}", connect_timeout=0.5)
    with pytest.raises(OSError):
        await client.call("PING")
    limiter = RedisLimiter(client, prefix="x:")
    with pytest.raises(LimiterUnavailable):
        await limiter.acquire([Check.rpm("key:a", 1)])


async def test_limiter_sends_one_command_per_acquire_and_settle_and_reloads_scripts(
    own_redis: RedisServer,
) -> None:
    prefix = f"test:resp:{secrets.token_hex(6)}:"
    limiter = RedisLimiter.from_url(own_redis.url, prefix=prefix, timeout=2.0, connect_timeout=2.0)
    client = limiter._client  # the RespClient it made
    assert isinstance(client, RespClient)
    checks = [Check.rpm("key:a", 100), Check.concurrent("acct:x", 5), Check.tpm("acct:x", 10**6)]
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        first = await limiter.acquire(checks, 10)  # may load the scripts
        assert first.reservation is not None
        await limiter.settle(first.reservation, 3)
        for _ in range(3):
            before = client.commands_sent
            decision = await limiter.acquire(checks, 10)
            assert decision.allowed and client.commands_sent == before + 1
            assert decision.reservation is not None
            await limiter.settle(decision.reservation, 3)
            assert client.commands_sent == before + 2
        await admin.script_flush()  # e.g. a Redis restart: NOSCRIPT, then SCRIPT LOAD
        again = await limiter.acquire(checks, 10)
        assert again.allowed and again.reservation is not None
        await limiter.settle(again.reservation, 3)
    finally:
        await limiter.aclose()  # the server and its keys go with the fixture
        await admin.aclose()


def test_parse_command_is_the_inverse_of_pack() -> None:
    """How a command the limiter packed reaches a redis-py client: its arguments back."""
    assert parse_command(pack("EVALSHA", "abc", 2, "k\r\n1", "é", 0.5)) == [
        b"EVALSHA",
        b"abc",
        b"2",
        b"k\r\n1",
        "é".encode(),
        b"0.5",
    ]
    for broken in (b"", b"*2\r\n$1\r\na\r\n", b"$1\r\na\r\n", pack("a") + b"x"):
        with pytest.raises(ValueError):
            parse_command(broken)


async def test_the_limiters_commands_are_what_the_script_documents() -> None:
    """The Redis limiter builds each ``EVALSHA`` from parts encoded once (a key's checks,
    each queued settlement): every command sent must be, byte for byte, what limiter.lua's
    header documents for the calls made (KEYS: the settlements' buckets, then the checks';
    ARGV: the header, each settlement, each check), built here from the checks alone."""
    prefix = f"test:pack:{secrets.token_hex(6)}:"
    limiter = RedisLimiter.from_url(REDIS_URL, prefix=prefix, timeout=2.0)
    sent: list[bytes] = []
    start = limiter._start

    def recorded(packed: bytes) -> asyncio.Future[Any]:
        sent.append(packed)
        return start(packed)

    limiter._start = recorded  # type: ignore[method-assign]
    plan = (
        Check.rpm("key:a", 100),
        Check.tpm("key:a", 10**6),
        Check.concurrent("acct:x", 5),
        Check.monthly_quota("acct:x", 10**9),
        Check.tpm("acct:x", 10**6),
    )
    now = time.time()

    def wire(check: Check, admitted: bool = False) -> list[Any]:
        """A bucket as the script takes it: kind, limit, window (or the month's end); a
        requests bucket among the checks admitted is "p" (brought down to its limit)."""
        check = check.resolved(now)
        if admitted and check.kind == "requests":
            return ["p", check.limit, check.window]
        if check.kind == "quota":
            assert check.month is not None
            return ["q", check.limit, month_end(check.month)]
        if check.kind == "concurrency":
            return ["c", check.limit, 0.0]
        return ["r", check.limit, check.window]

    def command(
        lease: str,
        settlements: list[tuple[str, int, int]],
        checks: list[Check],
        cost: int,
        head: tuple[str, list[Check], int] = ("", [], 0),
    ) -> bytes:
        """``head``: the lease id, checks and cost of a reservation taken with ``checks``."""
        keys: list[str] = []
        settled: list[Any] = []
        for owner, delta, reserved in settlements:  # the slot always; tokens when delta != 0
            named = [c for c in plan if c.kind == "concurrency"]
            named += [c for c in plan if delta and c.charges_tokens and c.kind != "concurrency"]
            buckets = list({prefix + c.resolved(now).bucket: c for c in named}.items())
            keys += [key for key, _ in buckets]
            # -k: a first send, which no earlier call can have applied (see limiter.lua)
            settled += [owner, delta, reserved, -len(buckets)]
            settled += [v for _, c in buckets for v in wire(c)]
        head_lease, head_checks, head_cost = head
        keys += [prefix + c.resolved(now).bucket for c in head_checks + checks]
        costs = [head_cost if c.charges_tokens else 1 for c in head_checks]
        costs += [cost if c.charges_tokens else 1 for c in checks]
        argv = [len(settlements), QUOTA_RETENTION, lease, DEFAULT_LEASE_TTL, 1.0]
        argv += [len(head_checks), head_lease, *settled]
        both = head_checks + checks
        argv += [v for c, n in zip(both, costs, strict=True) for v in (*wire(c, True), n)]
        return pack("EVALSHA", limiter._script.sha, len(keys), *keys, *argv)

    try:
        open_ = []
        for tokens in (0, 7, 300):
            decision = await limiter.acquire(plan, tokens)
            assert decision.allowed and decision.reservation is not None
            open_.append(decision.reservation)
        limiter.settle_nowait(open_[0], 0)  # no tokens to give back: the slot only
        limiter.settle_nowait(open_[1], 2)
        last = await limiter.acquire(plan[:1], 0)  # carries both settlements
        assert last.allowed and last.reservation is not None
        await limiter.settle(open_[2], 450)  # alone, by the timer: more than reserved
        leases = [r.lease_id for r in open_]
        assert len(set(leases)) == 3
        expected = [
            command(lease, [], list(plan), n) for lease, n in zip(leases, (0, 7, 300), strict=True)
        ]
        settlements = [(leases[0], 0, 0), (leases[1], -5, 7)]
        expected.append(command(last.reservation.lease_id, settlements, list(plan[:1]), 0))
        expected.append(command("", [(leases[2], 150, 300)], [], 0))
        # A budget beside the limits: one call, its own lease on its marker (the budget is a
        # quota with no concurrency limit), its cost in its own unit.
        budget = (Check.monthly_quota("usd:acct:x", 10**12),)
        decision, held = await limiter.acquire_both(budget, 5000, plan, 40)
        assert held is not None and held.reservation is not None
        assert decision.reservation is not None
        marker = Check.concurrent("usd:acct:x", MARKER_LIMIT)
        head = (held.reservation.lease_id, [*budget, marker], 5000)
        expected.append(command(decision.reservation.lease_id, [], list(plan), 40, head))
        assert sent == expected
    finally:
        await limiter.reset("key:a")
        await limiter.reset("acct:x")
        await limiter.reset("usd:acct:x")
        await limiter.aclose()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS, its certificate signed by a CA of the test's own:
    the port and the CA's file."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make certificates")
    work = tmp_path_factory.mktemp("tls-redis")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (work / "san.txt").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days",
            "1", "-CAcreateserial", "-extfile", "san.txt", "-out", "server.crt")  # fmt: skip
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    tls_port = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(tls_port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(work)],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", tls_port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("this redis-server does not serve TLS")
                time.sleep(0.05)
        yield tls_port, work / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_rediss_url_takes_redis_py_s_tls_options(tls_redis: tuple[int, Path]) -> None:
    """``rediss://`` verifies the server against the system's CAs, as redis-py does; the URL's
    ``ssl_ca_certs`` names a private CA, ``ssl_cert_reqs=none`` skips the check, as redis-py
    reads them (limits used to fail open on such a Redis while /readyz, on redis-py, was
    green)."""
    port, ca = tls_redis
    base = f"rediss://127.0.0.1:{port}/0"
    for url in (f"{base}?ssl_ca_certs={ca}", f"{base}?ssl_cert_reqs=none"):
        client = RespClient(url)
        try:
            assert await client.call("PING") == "PONG", url
        finally:
            await client.aclose()
    unverified = RespClient(base)
    try:
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # the limiter: unavailable
            await unverified.call("PING")
    finally:
        await unverified.aclose()
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        RespClient(f"{base}?ssl_cert_reqs=sometimes")
