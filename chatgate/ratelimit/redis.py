"""The Redis limiter: limits shared by every gateway process, one round trip per request.

``acquire`` is ONE ``EVALSHA`` of ``acquire.lua`` for all checks of a request; ``settle`` is
one ``EVALSHA`` of ``settle.lua`` (none when there is nothing to adjust). The scripts are
files beside this module, loaded with :mod:`importlib.resources`; ``SCRIPT LOAD`` is sent
only when a server answers ``NOSCRIPT`` (then the ``EVALSHA`` is sent again: it did not run).

The connection: :meth:`RedisLimiter.from_url` uses :class:`~chatgate.ratelimit.resp.RespClient`,
one pipelined connection with a fraction of redis-py's CPU cost per call (see that module);
a ``redis.asyncio`` client passed to the constructor works too.

Time comes from the Redis server's ``TIME`` inside the scripts, not from the clients: GCRA
state stores timestamps, and skew between gateway machines would otherwise over- or
under-admit. The quota month is named on the client (its clock, ``clock``); an error of a
few milliseconds at a month boundary does not matter.

Every Redis failure that means "cannot reach or write the store" becomes
:class:`~chatgate.ratelimit.base.LimiterUnavailable`. Commands are never retried: a timed-out
``EVALSHA`` may have run, and running it twice would double-charge.

Cancellation: a request cancelled while its ``EVALSHA`` is in flight (the client went away)
does not cancel the call (it is on the wire already); its reply is still read, and whatever
it took is released, so a cancelled request leaks nothing. ``settle`` likewise always
completes.

Keys: ``{prefix}{scope}|{kind}|{window or month}``. In Redis Cluster all keys of one script
must share a slot: use a prefix with a hash tag, e.g. ``"{cg}:rl:"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from .base import (
    DEFAULT_CONCURRENCY_RETRY,
    DEFAULT_LEASE_TTL,
    KIND_CODE,
    QUOTA_RETENTION,
    RATE_KINDS,
    Check,
    Decision,
    Ledger,
    Limiter,
    LimiterUnavailable,
    Reservation,
    decide,
    month_end,
    month_of,
)
from .resp import ReplyError, RespClient

__all__ = ["DEFAULT_PREFIX", "RedisLimiter"]

T = TypeVar("T")
log = logging.getLogger("chatgate.ratelimit")

DEFAULT_PREFIX = "chatgate:rl:"
DEFAULT_TIMEOUT = 0.25

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # redis-py's; also BusyLoadingError (LOADING), AuthenticationError
    TimeoutError,
    ReadOnlyError,  # a replica after failover
    OutOfMemoryError,
    ClusterDownError,
    OSError,  # the builtin ConnectionError and TimeoutError (RespClient raises those)
)


class _Client(Protocol):
    async def call(self, *args: Any) -> Any: ...


class _RedisPy:
    """A ``redis.asyncio`` client behind :class:`RespClient`'s ``call``."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    async def call(self, *args: Any) -> Any:
        try:
            return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]
        except NoScriptError as exc:
            raise ReplyError(f"NOSCRIPT {exc}") from exc
        except ResponseError as exc:
            if isinstance(exc, _UNAVAILABLE):
                raise
            raise ReplyError(str(exc)) from exc


class _Script:
    """A Lua script run by ``EVALSHA``, loaded on ``NOSCRIPT``."""

    def __init__(self, name: str) -> None:
        self.body = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        # SHA-1 is what Redis names scripts by (EVALSHA), not a security measure.
        self.sha = hashlib.sha1(self.body.encode(), usedforsecurity=False).hexdigest()

    async def run(self, client: _Client, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await client.call("SCRIPT", "LOAD", self.body)
        return await client.call("EVALSHA", self.sha, len(keys), *keys, *args)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _span(check: Check) -> float:
    """The rate window, or the quota month's end; 0 for concurrency."""
    if check.kind == "quota":
        assert check.month is not None
        return month_end(check.month)
    return check.window if check.kind in RATE_KINDS else 0.0


def _code(check: Check) -> str:
    # The scripts treat requests and tokens alike: both are GCRA buckets.
    return "r" if check.kind in RATE_KINDS else KIND_CODE[check.kind]


class RedisLimiter(Limiter):
    """Limits kept in Redis. Build with :meth:`from_url`, or pass a client.

    ``client`` is a :class:`RespClient` or a ``redis.asyncio`` client; one passed in should
    have short timeouts and no retries (see :meth:`from_url`). It is closed by
    :meth:`aclose` only when this limiter made it.
    """

    def __init__(
        self,
        client: RespClient | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        concurrency_retry: float = DEFAULT_CONCURRENCY_RETRY,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
    ) -> None:
        self._raw_client = client
        self._client: _Client = client if isinstance(client, RespClient) else _RedisPy(client)
        self._prefix = prefix
        self._lease_ttl = lease_ttl
        self._concurrency_retry = concurrency_retry
        self._clock = clock
        self._owns_client = owns_client
        self._acquire = _Script("acquire.lua")
        self._settle = _Script("settle.lua")
        self._ledger = Ledger(time.monotonic)
        self._background: set[asyncio.Future[Any]] = set()
        # Lease ids (members of the concurrency sets, shared by every process): a random
        # prefix per limiter and a counter. Unique, and no system call per request.
        self._lease_prefix = secrets.token_hex(8) + "-"
        self._leases_issued = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = DEFAULT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> RedisLimiter:
        """A limiter with its own connection: tight timeouts, no retries (see ``resp``)."""
        client = RespClient(url, connect_timeout=connect_timeout, timeout=timeout)
        return cls(client, prefix=prefix, lease_ttl=lease_ttl, owns_client=True)

    @property
    def prefix(self) -> str:
        """The key prefix of every bucket."""
        return self._prefix

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._keep(task)
        return task

    def _keep(self, future: asyncio.Future[Any]) -> None:
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _quiet_settle(self, reservation: Reservation, actual_tokens: int) -> None:
        try:
            await self.settle(reservation, actual_tokens)
        except LimiterUnavailable as exc:
            log.warning("rate limiter: orphaned reservation not released (%s)", exc)

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script.run(self._client, keys, args)
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Check and take every limit in ONE ``EVALSHA`` (atomic, one round trip)."""
        now = self._clock()
        resolved = tuple(c.resolved(now) for c in checks)
        costs = [cost_tokens if c.charges_tokens else 1 for c in resolved]
        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        keys = [self._prefix + c.bucket for c in resolved]
        args: list[Any] = [lease_id, self._lease_ttl, self._concurrency_retry, QUOTA_RETENTION]
        for check, cost in zip(resolved, costs, strict=True):
            args += [_code(check), check.limit, _span(check), cost]
        # The reply is a future, awaited through a shield: if this caller is cancelled, the
        # script (on the wire already) still runs, and what it took is given back.
        call = self._start(self._acquire, keys, args)
        try:
            try:
                reply = await asyncio.shield(call)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                call = self._spawn(self._run(self._acquire, keys, args))  # it did not run
                reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            orphan = Reservation(lease_id, resolved, cost_tokens)
            self._keep(call)
            call.add_done_callback(lambda done: self._release_orphan(done, orphan))
            raise
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        allowed, failed = int(reply[0]), int(reply[1])
        retry = float(reply[2])
        levels = [float(x) for x in reply[3:]]
        reservation = None
        if allowed:
            reservation = Reservation(lease_id, resolved, cost_tokens)
            self._ledger.add(lease_id)
        return decide(
            resolved,
            levels,
            costs,
            None if allowed else failed - 1,
            float("inf") if retry < 0 else retry,
            reservation,
        )

    def _release_orphan(self, done: asyncio.Future[Any], reservation: Reservation) -> None:
        """The caller of ``acquire`` was cancelled: give back what the script took."""
        if done.cancelled() or done.exception() is not None:
            return
        if int(done.result()[0]):
            self._ledger.add(reservation.lease_id)
            self._spawn(self._quiet_settle(reservation, 0))

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Adjust tokens and quota to ``actual_tokens`` and free the slot: one ``EVALSHA``."""
        if not self._ledger.take(reservation.lease_id):
            return False
        delta = actual_tokens - reservation.tokens
        keys: list[str] = []
        args: list[Any] = [reservation.lease_id, QUOTA_RETENTION]
        for check in reservation.checks:
            key = self._prefix + check.bucket
            wanted = check.kind == "concurrency" or (delta != 0 and check.charges_tokens)
            if wanted and key not in keys:
                keys.append(key)
                args += [_code(check), check.limit, _span(check)]
        if not keys:
            return True
        args.append(delta)
        # Shielded and kept: a settle in a cancelled request's ``finally`` still completes.
        call = self._start(self._settle, keys, args)
        self._keep(call)
        try:
            await asyncio.shield(call)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await asyncio.shield(self._spawn(self._run(self._settle, keys, args)))
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return True

    def _start(self, script: _Script, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Run ``script``: sent at once when connected (a bare future), else in a task."""
        if isinstance(self._client, RespClient):
            call = self._client.submit("EVALSHA", script.sha, len(keys), *keys, *args)
            if call is not None:
                return call
        return self._spawn(self._run(script, keys, args))

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: this month)."""
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        try:
            value = await self._client.call("GET", self._prefix + check.bucket)
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return int(value) if value is not None else 0

    async def reset(self, scope: str) -> None:
        """Delete every bucket of ``scope`` (SCAN + DEL; admin and tests)."""
        pattern = _glob_escape(self._prefix + scope + "|") + "*"
        try:
            cursor: Any = b"0"
            while True:
                cursor, keys = await self._client.call(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", 500
                )
                if keys:
                    await self._client.call("DEL", *keys)
                if int(cursor) == 0:
                    break
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Finish background releases; close the client when this limiter created it."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_client:
            await self._raw_client.aclose()
