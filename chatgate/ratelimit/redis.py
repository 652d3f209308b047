"""The Redis limiter: limits shared by every gateway process, one round trip per request.

``acquire`` is ONE ``EVALSHA`` of ``acquire.lua`` for all checks of a request; ``settle`` is
one ``EVALSHA`` of ``settle.lua`` (none when there is nothing to adjust). The scripts are
files beside this module, loaded with :mod:`importlib.resources`; ``register_script`` sends
``SCRIPT LOAD`` only the first time a server answers ``NOSCRIPT``.

Time comes from the Redis server's ``TIME`` inside the scripts, not from the clients: GCRA
state stores timestamps, and skew between gateway machines would otherwise over- or
under-admit. The quota month is named on the client (its clock, ``clock``); an error of a
few milliseconds at a month boundary does not matter.

Every Redis failure that means "cannot reach or write the store" becomes
:class:`~chatgate.ratelimit.base.LimiterUnavailable`. Commands are never retried: a timed-out
``EVALSHA`` may have run, and running it twice would double-charge.

Cancellation: a request cancelled while its ``EVALSHA`` is in flight (the client went away)
does not cancel the call; it finishes in the background and whatever it took is released,
so a cancelled request leaks nothing. ``settle`` likewise always completes.

Keys: ``{prefix}{scope}|{kind}|{window or month}``. In Redis Cluster all keys of one script
must share a slot: use a prefix with a hash tag, e.g. ``"{cg}:rl:"``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
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

__all__ = ["DEFAULT_PREFIX", "RedisLimiter"]

T = TypeVar("T")
log = logging.getLogger("chatgate.ratelimit")

DEFAULT_PREFIX = "chatgate:rl:"
DEFAULT_TIMEOUT = 0.25
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT = 1.0

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # also BusyLoadingError (LOADING), AuthenticationError
    TimeoutError,
    ReadOnlyError,  # a replica after failover
    OutOfMemoryError,
    ClusterDownError,
    OSError,  # includes the builtin TimeoutError
)


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


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
    """Limits kept in Redis. Build with :meth:`from_url`, or pass a ``redis.asyncio`` client.

    A client passed in should have short timeouts and no retries (see :meth:`from_url`);
    it is not closed by :meth:`aclose`.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        concurrency_retry: float = DEFAULT_CONCURRENCY_RETRY,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._lease_ttl = lease_ttl
        self._concurrency_retry = concurrency_retry
        self._clock = clock
        self._owns_client = owns_client
        self._acquire = client.register_script(_script("acquire.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._ledger = Ledger(time.monotonic)
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = DEFAULT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    ) -> RedisLimiter:
        """A limiter with its own client: tight socket timeouts and no command retries.

        The pool blocks up to ``pool_timeout`` for a free connection when all
        ``max_connections`` are busy (a burst), rather than failing as if Redis were down.
        """
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(Redis.from_pool(pool), prefix=prefix, lease_ttl=lease_ttl, owns_client=True)

    @property
    def prefix(self) -> str:
        """The key prefix of every bucket."""
        return self._prefix

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _release_orphan(self, task: asyncio.Task[Decision]) -> None:
        """The caller of ``acquire`` was cancelled: give back what the script took."""
        if task.cancelled() or task.exception() is not None:
            return
        reservation = task.result().reservation
        if reservation is not None:
            self._spawn(self._quiet_settle(reservation, 0))

    async def _quiet_settle(self, reservation: Reservation, actual_tokens: int) -> None:
        try:
            await self.settle(reservation, actual_tokens)
        except LimiterUnavailable as exc:
            log.warning("rate limiter: orphaned reservation not released (%s)", exc)

    async def _run(
        self, script: AsyncScript, keys: list[str], args: list[str | int | float]
    ) -> Any:
        try:
            return await script(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Check and take every limit in ONE ``EVALSHA`` (atomic, one round trip)."""
        task = self._spawn(self._acquire_now(checks, cost_tokens))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphan)
            raise

    async def _acquire_now(self, checks: Sequence[Check], cost_tokens: int) -> Decision:
        now = self._clock()
        resolved = tuple(c.resolved(now) for c in checks)
        costs = [c.cost(cost_tokens) for c in resolved]
        lease_id = secrets.token_hex(8)
        keys = [self._prefix + c.bucket for c in resolved]
        args: list[str | int | float] = [
            lease_id,
            self._lease_ttl,
            self._concurrency_retry,
            QUOTA_RETENTION,
        ]
        for check, cost in zip(resolved, costs, strict=True):
            args += [_code(check), check.limit, _span(check), cost]
        reply = await self._run(self._acquire, keys, args)
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

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Adjust tokens and quota to ``actual_tokens`` and free the slot: one ``EVALSHA``."""
        if not self._ledger.take(reservation.lease_id):
            return False
        delta = actual_tokens - reservation.tokens
        keys: list[str] = []
        args: list[str | int | float] = [reservation.lease_id, QUOTA_RETENTION]
        for check in reservation.checks:
            key = self._prefix + check.bucket
            wanted = check.kind == "concurrency" or (
                delta != 0 and check.kind in ("tokens", "quota")
            )
            if wanted and key not in keys:
                keys.append(key)
                args += [_code(check), check.limit, _span(check)]
        if not keys:
            return True
        args.append(delta)
        # Shielded: a settle in a cancelled request's ``finally`` still completes.
        await asyncio.shield(self._spawn(self._run(self._settle, keys, args)))
        return True

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: this month)."""
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        try:
            value = await self._client.get(self._prefix + check.bucket)
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return int(value) if value is not None else 0

    async def reset(self, scope: str) -> None:
        """Delete every bucket of ``scope`` (SCAN + DEL; admin and tests)."""
        pattern = _glob_escape(self._prefix + scope + "|") + "*"
        try:
            keys = [k async for k in self._client.scan_iter(match=pattern, count=500)]
            if keys:
                await self._client.delete(*keys)
        except _UNAVAILABLE as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Finish background releases; close the client when this limiter created it."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()
