"""The Redis limiter: limits shared by every gateway process, one round trip per request.

Every call to Redis is ONE ``EVALSHA`` of ``limiter.lua``, a script that first applies
settlements and then checks and takes every limit of one request, atomically. The script is
a file beside this module, loaded with :mod:`importlib.resources`; ``SCRIPT LOAD`` is sent
only when a server answers ``NOSCRIPT`` (then the ``EVALSHA`` is sent again: it did not run).

Settlements ride on the next admission. :meth:`RedisLimiter.settle_nowait` sends nothing: it
queues the settlement in this process, and the next :meth:`~RedisLimiter.acquire` carries
every queued settlement, applied in order before its own checks in the same script. A busy
process so pays one round trip per request, not two (one to admit, one to settle). When no
acquire comes within ``flush_delay`` of the oldest queued settlement, a timer sends them all
in one call (the same script with no checks; at most ``MAX_BATCH`` settlements per call).
:meth:`~RedisLimiter.settle` queues and then waits for the reply of the call that carried
its settlement, so "settled when it returns" still holds; :meth:`~RedisLimiter.aclose` sends
whatever is queued and waits for it.

What the delay changes:

- Within one process, nothing: its queued settlements are applied before its next admission,
  so a concurrency limit of 1 used sequentially admits request 2 right after request 1 has
  settled.
- Between processes, a freed concurrency slot, returned tokens and a corrected quota are
  seen up to ``flush_delay`` (plus a round trip) later than the settle: a request of another
  process may be refused for a slot that is free already (it is told to retry within the
  concurrency hint, 1 s by default). Limits are never exceeded by it: a late settlement only
  keeps the reserved amount charged a little longer.
- A process that dies loses the settlements it had queued (at most ``flush_delay`` worth):
  their reservations stay charged as reserved and their slots stay held until the lease
  TTL, the backstop for any process that dies in the middle of requests anyway.

Ordering: :class:`~chatgate.ratelimit.resp.RespClient` sends every call on one pipelined
connection in the order made, so settlements sent in an earlier batch (more than
``MAX_BATCH`` queued) are applied before the admission that follows them. With a
``redis.asyncio`` client (a pool of connections) separate calls may overtake each other.

The connection: :meth:`RedisLimiter.from_url` uses :class:`~chatgate.ratelimit.resp.RespClient`,
one pipelined connection with a fraction of redis-py's CPU cost per call (see that module);
a ``redis.asyncio`` client passed to the constructor works too.

Time comes from the Redis server's ``TIME`` inside the script, not from the clients: GCRA
state stores timestamps, and skew between gateway machines would otherwise over- or
under-admit. The quota month is named on the client (its clock, ``clock``); an error of a
few milliseconds at a month boundary does not matter.

Every Redis failure that means "cannot reach or write the store" becomes
:class:`~chatgate.ratelimit.base.LimiterUnavailable`. Commands are never retried: a timed-out
``EVALSHA`` may have run, and running it twice would double-charge. The settlements it
carried fail (their ``settle`` raises :class:`~chatgate.ratelimit.base.LimiterUnavailable`)
and are sent again, every :data:`RETRY_DELAY`, when that cannot count twice: when the call
certainly did not run, and otherwise when they free a concurrency slot (the script then
moves a settlement's tokens only if its slot was still held; while no call that carried it
can have run, whatever became of the slot: ``_Part.k``). Checks with a quota and no
concurrency limit hold a marker lease for that (:func:`_marker`). Only a settlement of rate
checks alone, in a call that may have run, is dropped: its reserved tokens drain.

Cancellation: a request cancelled while its ``EVALSHA`` is in flight (the client went away)
does not cancel the call (it is on the wire already); its reply is still read, and whatever
it took is released, so a cancelled request leaks nothing. ``settle`` likewise always
completes: its settlement is queued before it first waits, and is sent whatever happens to
the caller.

Keys: ``{prefix}{scope}|{kind}|{window or month}``. Every key a call touches, the carried
settlements' and the checks', is passed in ``KEYS``. In Redis Cluster all keys of one script
must share a slot: use a prefix with a hash tag, e.g. ``"{cg}:rl:"``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, NamedTuple, Protocol, TypeVar

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
    CompiledChecks,
    Decision,
    Ledger,
    Limiter,
    LimiterUnavailable,
    Reservation,
    Resolved,
    Seed,
    decide,
    month_end,
    month_of,
)
from .program import LEVELS_AT, compile_checks
from .resp import (
    NotSent,
    ReplyError,
    RespClient,
    ServerUnavailable,
    encode,
    encode_int,
    encode_once,
    parse_command,
)

__all__ = ["DEFAULT_FLUSH_DELAY", "DEFAULT_PREFIX", "MAX_BATCH", "RedisLimiter"]

T = TypeVar("T")
log = logging.getLogger("chatgate.ratelimit")

DEFAULT_PREFIX = "chatgate:rl:"
DEFAULT_TIMEOUT = 0.25
DEFAULT_FLUSH_DELAY = 0.02
"""Seconds a settlement waits for an admission to ride on before a timer sends it.

Why 20 ms: it bounds how stale other processes' view of a freed slot or returned tokens can
be, and that is 1/50 of the 1 s a client refused for concurrency is told to wait, and far
below an LLM request's own duration, so no client can tell. It also bounds how long an
awaited ``settle`` waits when the process is idle. And it is long enough to save the
round trip whenever it matters: with requests arriving at ``r`` per second, a settlement
finds no admission within the delay with probability about ``exp(-r * 0.02)``, under 2% from
200 requests/s per process; below that rate a second command per request costs Redis nothing
worth saving.
"""
SEED_BATCH = 500
"""Buckets raised by one call of a seed at most (Redis runs nothing else meanwhile)."""
MAX_BATCH = 64
"""Settlements carried by one call at most: Redis runs nothing else while a script runs, and
64 settlements (a few hundred key updates) keep one call near a millisecond."""
RETRY_DELAY = 1.0
"""Seconds before settlements whose call failed (Redis unreachable or refusing, or the call
lost) are sent again, where that cannot count twice; again and again, until they apply or
:data:`HOLD_LIMIT` (or the lease TTL, if longer) has passed."""
HOLD_LIMIT = 900.0
"""Seconds a failed settlement is sent again at most: its lease may have expired by then, but
one with tokens to give back (a quota's unused reservation) still applies them when the
lease's slot has not been pruned yet, or when it holds no slot; and a Redis outage rarely
lasts longer."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # redis-py's; also BusyLoadingError (LOADING), AuthenticationError
    TimeoutError,
    ReadOnlyError,  # a replica after failover
    OutOfMemoryError,
    ClusterDownError,
    OSError,  # the builtin ConnectionError and TimeoutError (RespClient raises those)
)


class _Part(NamedTuple):
    """A part of an ``EVALSHA``, encoded (RESP bulk strings): its KEYS and its ARGV, and
    how many of each it holds; ``again``: whether it may be sent again after a call that may
    have run (it applies once whatever: a settlement that frees a slot, a renewal).
    ``k``: its bucket count as the script takes it, ``-nkeys`` while no call that carried it
    can have run (its tokens then move even when its lease is gone), else ``nkeys``."""

    keys: bytes
    nkeys: int
    args: bytes
    nargs: int
    again: bool
    k: bytes


def _unsure(part: _Part) -> _Part:
    """A queued settlement whose call may have run: its count made positive again, so the
    script moves its tokens only if it still frees a slot (it applies once)."""
    at = 0
    for _ in range(3):  # past the lease id, the delta and the reserved tokens ($n, data)
        line = part.args.index(b"\r\n", at)
        at = line + 2 + int(part.args[at + 1 : line]) + 2
    line = part.args.index(b"\r\n", at)
    end = line + 2 + int(part.args[at + 1 : line]) + 2
    k = encode_int(part.nkeys)
    return part._replace(args=part.args[:at] + k + part.args[end:], k=k)


# A queued settlement: its part of the call (its buckets in KEYS; in ARGV the lease id, the
# delta, the reserved tokens, the bucket count, then kind/limit/span per bucket), and the
# future its settle waits on.
_Settlement = tuple[_Part, asyncio.Future[bool]]
_NO_SETTLEMENTS: list[_Settlement] = []  # never appended to
_NO_LEASE = encode_once("")  # a call that carries settlements only
_NO_SPLIT = encode(0, "")  # ARGV[6] and ARGV[7]: the checks are one reservation's


MARKER_LIMIT = 2**31 - 1
"""The limit of a marker lease (:func:`_marker`): never reached."""


def _marker(resolved: tuple[Check, ...]) -> tuple[Check, ...]:
    """A concurrency check no request can fail, for each quota scope with no concurrency
    limit of its own: its lease marks the request in Redis, so that a settlement lost after it
    was written is sent again and applies once (the script then moves its tokens only if it
    frees the lease), as one with a real concurrency limit is. Without it the quota kept the
    whole reservation charged. Its set also keeps the quota's charge until the request settles
    (limiter.lua): a scope's own, so that any request of that scope, whatever its key, gives a
    dead process's charge back. It costs such a request a lease in a sorted set while it
    runs."""
    limited = {check.scope for check in resolved if check.kind == "concurrency"}
    quotas = [c.scope for c in resolved if c.kind == "quota" and c.scope not in limited]
    return tuple(Check.concurrent(scope, MARKER_LIMIT) for scope in dict.fromkeys(quotas))


class _Plan(Resolved):
    """A tuple of checks as the script takes them, for one quota month, encoded once: KEYS,
    and ARGV as one part per value, each check's token cost left to fill in (``tokens``:
    the slots of token costs); a settlement's part, with and without tokens to give back;
    and ``granted``, the allowed decision from the script's reply (compiled, see
    :mod:`.program`). ``wire``: the checks the script sees, a :func:`_marker` after the
    resolved ones (the reply's levels hold one more then; the decisions read the resolved)."""

    __slots__ = ("args", "granted", "keys", "nkeys", "renew", "settle", "tokens", "wire")

    def __init__(self, checks: Sequence[Check], now: float, prefix: str) -> None:
        super().__init__(checks, now)
        resolved = self.resolved
        self.wire = resolved + _marker(resolved)
        self.nkeys = len(self.wire)
        self.keys = encode(*[prefix + check.bucket for check in self.wire])
        self.args: list[bytes] = []
        self.tokens: list[int] = []
        for check in self.wire:
            if check.charges_tokens:
                self.tokens.append(len(self.args) + 3)
            self.args += [encode(v) for v in (*_bucket(check), 1)]
        # A settlement names each bucket once: the slots always, token buckets when the real
        # tokens differ from the reserved ones (index: whether they do).
        self.settle = tuple(self._settlement(prefix, with_tokens) for with_tokens in (False, True))
        self.renew = self._settlement(prefix, False, renew=True)
        self.granted = compile_checks(resolved).granted

    def _settlement(self, prefix: str, with_tokens: bool, renew: bool = False) -> _Part:
        """The settlement's KEYS, and its ARGV after the lease id, delta and bucket count;
        ``renew``: a lease renewal's instead (the slots, each with the code ``n``)."""
        keys: list[str] = []
        args: list[Any] = []
        # The slots first: the script moves a settlement's tokens only if it freed one.
        for check in sorted(self.wire, key=lambda check: check.kind != "concurrency"):
            key = prefix + check.bucket
            wanted = check.kind == "concurrency" or (with_tokens and check.charges_tokens)
            if wanted and key not in keys:
                keys.append(key)
                args += ("n", check.limit, 0.0) if renew else _bucket(check)
        leased = any(check.kind == "concurrency" for check in self.wire)
        sure = encode(-len(keys))  # no call has carried it yet (see _Part)
        return _Part(encode(*keys), len(keys), encode(*args), len(args), leased, sure)


class _Client(Protocol):
    async def call(self, *args: Any) -> Any: ...

    async def send(self, packed: bytes) -> Any: ...


class _RedisPy:
    """A ``redis.asyncio`` client behind :class:`RespClient`'s ``call`` and ``send``."""

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

    async def send(self, packed: bytes) -> Any:
        """A command the limiter packed (an array of bulk strings), as redis-py takes it."""
        name, *args = parse_command(packed)
        reply = await self.call(name.decode(), *args)  # by name: redis-py's reply callbacks
        return reply.encode() if isinstance(reply, str) else reply  # decode_responses=True


class _Script:
    """A Lua script run by ``EVALSHA``, loaded on ``NOSCRIPT``."""

    def __init__(self, name: str) -> None:
        self.body = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        # SHA-1 is what Redis names scripts by (EVALSHA), not a security measure.
        self.sha = hashlib.sha1(self.body.encode(), usedforsecurity=False).hexdigest()

    async def run(self, client: _Client, packed: bytes, *, load: bool = False) -> Any:
        """``packed`` (an ``EVALSHA`` of this script); on ``NOSCRIPT`` (it did not run)
        ``SCRIPT LOAD`` and send it again.

        ``load``: the server answered ``NOSCRIPT`` already, so load first.
        """
        if not load:
            try:
                return await client.send(packed)
            except ReplyError as exc:
                if not _noscript(exc):
                    raise
        await client.call("SCRIPT", "LOAD", self.body)
        return await client.send(packed)


def _noscript(exc: BaseException | None) -> bool:
    return isinstance(exc, ReplyError) and str(exc).startswith("NOSCRIPT")


def _unavailable(exc: BaseException) -> LimiterUnavailable:
    error = LimiterUnavailable(f"redis: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _span(check: Check) -> float:
    """The rate window, or the quota month's end; 0 for concurrency."""
    if check.kind == "quota":
        assert check.month is not None
        return month_end(check.month)
    return check.window if check.kind in RATE_KINDS else 0.0


def _bucket(check: Check) -> tuple[str, int, float]:
    """A bucket as the script takes it: kind code, limit, window (or the month's end)."""
    return _code(check), check.limit, _span(check)


def _code(check: Check) -> str:
    # Both are GCRA buckets to the script: "p" (requests) is brought down to its limit when
    # found above it, "r" (tokens) keeps what a settlement owes (see limiter.lua).
    if check.kind in RATE_KINDS:
        return "p" if check.kind == "requests" else "r"
    return KIND_CODE[check.kind]


def _never_ran(exc: BaseException) -> bool:
    """Whether a failed call certainly did not run: no connection could be made, or the
    server refused it before running it (``LOADING``, ``READONLY``, ...). A call lost after it
    was written may have run: only its settlements that apply once are sent again."""
    cause: BaseException | None = exc
    for _ in range(4):  # LimiterUnavailable from the client's error: a link or two
        if cause is None:
            return False
        if isinstance(cause, NotSent | ServerUnavailable):
            return True
        cause = cause.__cause__
    return False


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a background call's error as seen: its settlements' futures carry it."""
    if not future.cancelled():
        future.exception()


def _costed(plan: _Plan, cost: int) -> list[bytes]:
    """The plan's ARGV for its checks, with ``cost`` in its token slots."""
    args = plan.args
    if plan.tokens:
        args = args.copy()
        encoded = encode_int(cost)
        for slot in plan.tokens:
            args[slot] = encoded
    return args


def _refused(plan: _Plan, reply: list[bytes], at: int, cost: int, failed: int) -> Decision:
    """The refusal of ``plan``'s checks from a script's reply: their levels from ``at``,
    ``failed`` the index of the failing one among them."""
    resolved = plan.resolved
    retry = float(reply[2])
    return decide(
        resolved,
        [float(level) for level in reply[at : at + len(resolved)]],
        [cost if check.charges_tokens else 1 for check in resolved],
        failed,
        float("inf") if retry < 0 else retry,
        None,
    )


class RedisLimiter(Limiter):
    """Limits kept in Redis. Build with :meth:`from_url`, or pass a client.

    ``client`` is a :class:`RespClient` or a ``redis.asyncio`` client; one passed in should
    have short timeouts and no retries (see :meth:`from_url`). It is closed by
    :meth:`aclose` only when this limiter made it. ``flush_delay``: seconds a settlement
    waits for an admission to ride on before it is sent alone (see
    :data:`DEFAULT_FLUSH_DELAY` and the module docstring).
    """

    def __init__(
        self,
        client: RespClient | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        concurrency_retry: float = DEFAULT_CONCURRENCY_RETRY,
        flush_delay: float = DEFAULT_FLUSH_DELAY,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
    ) -> None:
        if not flush_delay >= 0:
            raise ValueError("flush_delay must be >= 0 seconds")
        self._raw_client = client
        self._client: _Client = client if isinstance(client, RespClient) else _RedisPy(client)
        self._prefix = prefix
        self.lease_ttl = lease_ttl
        self._concurrency_retry = concurrency_retry
        self._flush_delay = flush_delay
        self._clock = clock
        self._owns_client = owns_client
        self._script = _Script("limiter.lua")
        self._evalsha = encode("EVALSHA", self._script.sha)
        # The header's values that never change (ARGV[2], ARGV[4] and ARGV[5]).
        self._retention = encode(QUOTA_RETENTION)
        self._lease_tail = encode(lease_ttl, concurrency_retry)
        self._ledger = Ledger(time.monotonic)
        self._background: set[asyncio.Future[Any]] = set()
        # Settlements not sent yet, oldest first; when (loop time) the oldest was queued;
        # and the timer that sends them if no admission comes first. The timer is not
        # cancelled when an admission takes the list: it stays armed, and when it fires it
        # sends the list only if its oldest settlement has waited the whole delay, else it
        # is set again for that one. So a busy process arms a timer every flush_delay, not
        # one per request. ``_armed``: when the waiting the timer measures began.
        self._pending: list[_Settlement] = []
        self._oldest = 0.0
        self._armed = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Settlements (and renewals) whose call failed and that cannot count twice if sent
        # again (the call certainly did not run, see _never_ran, or the part applies once,
        # _Part.again), held for RETRY_DELAY and sent again; when each first failed, to give
        # up on it after HOLD_LIMIT.
        self._held: list[_Settlement] = []
        self._failed_at: dict[_Part, float] = {}
        self._retry_timer: asyncio.TimerHandle | None = None
        # Lease ids (members of the concurrency sets, shared by every process): a random
        # prefix per limiter and a counter. Unique, and no system call per request.
        self._lease_prefix = secrets.token_hex(8) + "-"
        self._leases_issued = 0
        # A key's checks in their wire form (see _Plan).
        self._plans = CompiledChecks(functools.partial(_Plan, prefix=prefix))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = DEFAULT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        flush_delay: float = DEFAULT_FLUSH_DELAY,
    ) -> RedisLimiter:
        """A limiter with its own connection: tight timeouts, no retries (see ``resp``)."""
        client = RespClient(url, connect_timeout=connect_timeout, timeout=timeout)
        return cls(
            client, prefix=prefix, lease_ttl=lease_ttl, flush_delay=flush_delay, owns_client=True
        )

    @property
    def prefix(self) -> str:
        """The key prefix of every bucket."""
        return self._prefix

    @property
    def pending(self) -> int:
        """Settlements queued and not sent yet."""
        return len(self._pending)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self._keep(task)
        return task

    def _keep(self, future: asyncio.Future[Any]) -> None:
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _run(self, packed: bytes, load: bool = False) -> Any:
        try:
            return await self._script.run(self._client, packed, load=load)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    # --- sending ---------------------------------------------------------------------------

    def _dispatch(
        self, packed: bytes, batch: list[_Settlement], taken: tuple[Reservation, ...]
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Send one ``EVALSHA`` now: the call (the first reply), and the future of its final
        reply, which also settles ``batch``.

        Final: after one ``SCRIPT LOAD`` and resend on ``NOSCRIPT``; failures that mean
        "unavailable" become :class:`LimiterUnavailable`. The outcome is decided here, in
        callbacks on the call, not by whoever awaits it: a caller that is cancelled cancels
        the outcome future and nothing else (``batch`` is settled all the same).
        ``taken``: what the call's checks take when they are allowed, given back when the
        outcome was cancelled before the reply came.
        """
        call = self._start(packed)
        outcome: asyncio.Future[Any] = call.get_loop().create_future()
        call.add_done_callback(
            functools.partial(self._replied, packed, batch, outcome, False, taken)
        )
        return call, outcome

    def _start(self, packed: bytes) -> asyncio.Future[Any]:
        """Run the script: sent at once when connected (a bare future), else in a task."""
        if isinstance(self._client, RespClient):
            call = self._client.submit_packed(packed)
            if call is not None:
                return call
        return self._spawn(self._run(packed))

    def _replied(
        self,
        packed: bytes,
        batch: list[_Settlement],
        outcome: asyncio.Future[Any],
        reloaded: bool,
        taken: tuple[Reservation, ...],
        call: asyncio.Future[Any],
    ) -> None:
        exc = LimiterUnavailable("redis: call cancelled") if call.cancelled() else call.exception()
        if exc is None:
            if self._failed_at:  # settlements sent again after an outage: applied now
                for part, _ in batch:
                    self._failed_at.pop(part, None)
            for _, settled in batch:
                if not settled.done():
                    settled.set_result(True)
            if not outcome.done():
                outcome.set_result(call.result())
            elif taken and outcome.cancelled():
                self._release_orphan(call.result(), taken)
            return
        if _noscript(exc) and not reloaded:  # it did not run: load the script, send it again
            again = self._spawn(self._run(packed, load=True))
            again.add_done_callback(
                functools.partial(self._replied, packed, batch, outcome, True, taken)
            )
            return
        if batch:  # what may have run is sent again only where it applies once
            if _never_ran(exc):
                self._hold(batch)
            else:
                self._hold([(self._unsure(part), done) for part, done in batch if part.again])
        if isinstance(exc, _UNAVAILABLE):
            exc = _unavailable(exc)
        for _, settled in batch:
            if not settled.done():
                settled.set_exception(exc)
        if not outcome.done():
            outcome.set_exception(exc)

    def _unsure(self, part: _Part) -> _Part:
        """:func:`_unsure`, keeping when the part first failed."""
        unsure = _unsure(part)
        if part in self._failed_at:
            self._failed_at[unsure] = self._failed_at.pop(part)
        return unsure

    def _hold(self, batch: list[_Settlement]) -> None:
        """Keep settlements whose call failed, to send again after RETRY_DELAY: a Redis
        outage would otherwise leave their concurrency slots taken until the leases expire,
        and their unused reserved tokens charged. The caller passes only those that cannot
        count twice. Their callers still see the failure (they must not wait on an outage);
        one that first failed longer ago than :data:`HOLD_LIMIT` is let go."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit = max(HOLD_LIMIT, self.lease_ttl)
        for part, _ in batch:
            if now - self._failed_at.setdefault(part, now) < limit:
                retry: asyncio.Future[bool] = loop.create_future()
                retry.add_done_callback(_retrieve)
                self._held.append((part, retry))
            else:
                del self._failed_at[part]
        if self._held and self._retry_timer is None:
            self._retry_timer = loop.call_later(RETRY_DELAY, self._retry_held)

    def _retry_held(self) -> list[asyncio.Future[Any]]:
        """Send the held settlements again, and the queued ones, now (the retry timer, a
        seed, or a stop): the calls sent."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self._pending.extend(self._held)
        self._held = []
        return self._flush()

    def _take_pending(self) -> list[_Settlement]:
        """The queued settlements for the call about to go, oldest first; at most
        ``MAX_BATCH``: older ones beyond that are sent first, in calls of their own."""
        batch = self._pending
        if not batch:
            return _NO_SETTLEMENTS
        self._pending = []
        while len(batch) > MAX_BATCH:
            self._send_settlements(batch[:MAX_BATCH])
            batch = batch[MAX_BATCH:]
        return batch

    def _packed(
        self,
        batch: Sequence[tuple[_Part, object]],
        lease: bytes,
        keys: bytes = b"",
        nkeys: int = 0,
        args: Sequence[bytes] = (),
        split: bytes = _NO_SPLIT,
    ) -> bytes:
        """The ``EVALSHA`` (in RESP) carrying ``batch`` and the checks (their ``keys``, and
        ``args`` a part per value), for the request whose lease id is ``lease`` (encoded);
        ``split``: ARGV[6] and ARGV[7] (see :meth:`acquire_both`). The settlements' and the
        checks' parts were encoded once; only counts are here."""
        nargs = 7 + len(args)
        for part, _ in batch:
            nkeys += part.nkeys
            nargs += part.nargs
        return b"".join(
            [
                b"*%d\r\n" % (3 + nkeys + nargs),
                self._evalsha,
                encode_int(nkeys),
                *[part.keys for part, _ in batch],
                keys,
                encode_int(len(batch)),
                self._retention,
                lease,
                self._lease_tail,
                split,
                *[part.args for part, _ in batch],
                *args,
            ]
        )

    def _send_settlements(self, batch: list[_Settlement]) -> asyncio.Future[Any]:
        """One call carrying ``batch`` and no checks (kept until answered)."""
        _, outcome = self._dispatch(self._packed(batch, _NO_LEASE), batch, ())
        self._keep(outcome)
        outcome.add_done_callback(_retrieve)
        return outcome

    def _flush(self) -> list[asyncio.Future[Any]]:
        """Send every queued settlement now (the timer, or a caller that cannot wait)."""
        batch = self._take_pending()
        return [self._send_settlements(batch)] if batch else []

    def _arm(self, loop: asyncio.AbstractEventLoop, start: float) -> None:
        """Set the timer to fire ``flush_delay`` after ``start`` (loop time)."""
        self._armed = start
        self._timer = loop.call_at(start + self._flush_delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._pending:
            return
        if self._oldest <= self._armed:  # the oldest has waited the whole delay
            self._flush()
        else:  # queued after an admission took the list the timer was set for
            self._arm(asyncio.get_running_loop(), self._oldest)

    # --- the Limiter API -------------------------------------------------------------------

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Apply the queued settlements, then check and take every limit: ONE ``EVALSHA``."""
        plan = self._plans.for_checks(checks, self._clock())
        self._leases_issued += 1
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        batch = self._take_pending()
        args = _costed(plan, cost_tokens)
        packed = self._packed(batch, encode_once(lease_id), plan.keys, plan.nkeys, args)
        reservation = Reservation(lease_id, plan.resolved, cost_tokens)
        reply = await self._admission(packed, batch, (reservation,))
        if reply[0] == b"1":
            self._ledger.add(reservation)
            return plan.granted(reply, cost_tokens, reservation)
        return _refused(plan, reply, LEVELS_AT, cost_tokens, int(reply[1]) - 1)

    async def acquire_both(
        self, first: Sequence[Check], first_cost: int, checks: Sequence[Check], cost_tokens: int
    ) -> tuple[Decision, Decision | None]:
        """:meth:`.Limiter.acquire_both` in ONE ``EVALSHA``: the script checks ``first`` and
        then ``checks`` and takes all or nothing; ``first``'s concurrency sets (a budget's
        marker lease) hold a lease id of their own (ARGV[6] and ARGV[7]), so each
        reservation settles, renews and applies once on its own, as after two calls."""
        now = self._clock()
        head = self._plans.for_checks(first, now)
        plan = self._plans.for_checks(checks, now)
        self._leases_issued += 2
        head_id = f"{self._lease_prefix}{self._leases_issued - 1:x}"
        lease_id = f"{self._lease_prefix}{self._leases_issued:x}"
        batch = self._take_pending()
        packed = self._packed(
            batch,
            encode_once(lease_id),
            head.keys + plan.keys,
            head.nkeys + plan.nkeys,
            [*_costed(head, first_cost), *_costed(plan, cost_tokens)],
            encode(head.nkeys, head_id),
        )
        held = Reservation(head_id, head.resolved, first_cost)
        reservation = Reservation(lease_id, plan.resolved, cost_tokens)
        reply = await self._admission(packed, batch, (held, reservation))
        if reply[0] == b"1":
            self._ledger.add(held)
            self._ledger.add(reservation)
            levels = reply[:LEVELS_AT] + reply[LEVELS_AT + head.nkeys :]  # the second's
            return plan.granted(levels, cost_tokens, reservation), Decision(True, held)
        failed = int(reply[1]) - 1
        if failed < head.nkeys:
            return _refused(head, reply, LEVELS_AT, first_cost, failed), None
        at = LEVELS_AT + head.nkeys
        return _refused(plan, reply, at, cost_tokens, failed - head.nkeys), None

    async def _admission(
        self, packed: bytes, batch: list[_Settlement], taken: tuple[Reservation, ...]
    ) -> list[bytes]:
        """Send an admission and wait for its reply, split at the spaces.

        If this caller is cancelled, the script (on the wire already) still runs and the
        settlements it carries are settled: cancelling the outcome stops nothing but this
        wait. What the script took (``taken``) is given back, by _replied when the cancel
        came first, here when the reply had come already.
        """
        call, outcome = self._dispatch(packed, batch, taken)
        try:
            reply: bytes = await outcome
        except asyncio.CancelledError:
            if outcome.cancelled():
                self._keep(call)  # aclose waits for its reply (and the release)
            elif outcome.done() and outcome.exception() is None:
                self._release_orphan(outcome.result(), taken)
            raise
        return reply.split(b" ")

    def _release_orphan(self, reply: bytes, taken: tuple[Reservation, ...]) -> None:
        """The caller of an admission was cancelled: give back what the script took."""
        if reply.startswith(b"1 "):
            for reservation in taken:
                self._ledger.add(reservation)
                self.settle_nowait(reservation, 0).add_done_callback(_log_orphan)

    def settle_nowait(self, reservation: Reservation, actual_tokens: int) -> asyncio.Future[bool]:
        """Queue the settlement (nothing is sent here); its future resolves once applied.

        It rides on this limiter's next :meth:`acquire`, or the timer sends it after
        ``flush_delay``. The future fails with :class:`LimiterUnavailable` when the call
        carrying it does; it resolves to False at once when ``reservation`` was settled
        already or is too old, and to True at once when there is nothing to adjust.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._ledger.take(reservation.lease_id):
            future.set_result(False)
            return future
        delta = actual_tokens - reservation.tokens
        part = self._plans.for_resolved(reservation.checks).settle[delta != 0]
        if not part.nkeys:
            future.set_result(True)
            return future
        self._queue(loop, part, reservation.lease_id, delta, reservation.tokens, future)
        return future

    def _queue(
        self,
        loop: asyncio.AbstractEventLoop,
        part: _Part,
        lease_id: str,
        delta: int,
        reserved: int,
        future: asyncio.Future[bool],
    ) -> None:
        """Queue ``part`` of a plan for ``lease_id`` (a settlement or a renewal) for the next
        call, and make sure the timer will send it if no admission does. ``reserved``: the
        tokens the reservation holds (what the script charges instead of ``delta`` where
        Redis lost them, see limiter.lua)."""
        head = encode_once(lease_id) + encode_int(delta) + encode_int(reserved) + part.k
        if not self._pending:
            self._oldest = loop.time()
        if self._timer is None:
            self._arm(loop, self._oldest)
        queued = _Part(part.keys, part.nkeys, head + part.args, part.nargs + 4, part.again, part.k)
        self._pending.append((queued, future))

    def renew_leases(self, age: float) -> int:
        """Queue a renewal of the slots of each reservation open for more than ``age``
        seconds (see :meth:`.Limiter.renew_leases`): it rides on the next call like a
        settlement, and, idempotent, is queued again by the next pass whatever became of it.
        A renewal that reaches Redis after its request's settlement finds no lease to renew."""
        held = self._ledger.older_than(age)
        if not held:
            return 0
        loop = asyncio.get_running_loop()
        for reservation in held:
            part = self._plans.for_resolved(reservation.checks).renew
            if part.nkeys:
                renewed: asyncio.Future[bool] = loop.create_future()
                renewed.add_done_callback(_retrieve)
                self._queue(loop, part, reservation.lease_id, 0, 0, renewed)
        return len(held)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Queue the settlement and wait until the call carrying it has been answered.

        That call is this limiter's next :meth:`acquire` or, within ``flush_delay``, a timer's
        flush. The settlement is queued before this first waits, so it is applied even when
        the caller is cancelled (e.g. in a cancelled request's ``finally``).
        """
        return await self.settle_nowait(reservation, actual_tokens)

    async def _applied(self) -> None:
        """Send the queued settlements and wait for them, so a read or a reset comes after."""
        sent = self._flush()
        if sent:
            await asyncio.wait(sent)

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s quota in ``month`` (default: this month).

        This process's queued settlements are sent first: it reads its own corrections.
        """
        check = Check.monthly_quota(scope, 0, month or month_of(self._clock()))
        await self._applied()
        try:
            value = await self._client.call("GET", self._prefix + check.bucket)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return int(value) if value is not None else 0

    def _seeded_key(self, month: str) -> str:
        return f"{self._prefix}seeded|{month}"  # no scope is "seeded": no bucket's name

    async def seeded(self, month: str) -> bool:
        """Whether the month's marker, set by the last :meth:`seed`, is still there: a Redis
        that lost its data lost the marker with the buckets."""
        try:
            return bool(await self._client.call("EXISTS", self._seeded_key(month)))
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def seed(self, seed: Seed) -> None:
        """Raise each counter and bucket of ``seed`` to at least its value, then set the
        month's marker if the seed is whole (only then: a seed cut short is done again).

        The values go as settlements of the kinds ``Q`` and ``R`` ("raise to at least") of the
        limiter's own script, :data:`SEED_BATCH` a call: one body of Lua for buckets. This
        process's settlements, queued or held after a failed call, are sent first: a request
        that ended may be in the records already, and a quota counter's seed keeps what the
        requests not settled in Redis hold on top of them (limiter.lua).
        """
        buckets: list[tuple[str, Any, tuple[str, int, float]]] = [
            (Check.monthly_quota(scope, 0, seed.month).key, tokens, ("Q", 0, month_end(seed.month)))
            for scope, tokens in seed.quotas.items()
        ]
        buckets += [(check.key, level, ("R", *_bucket(check)[1:])) for check, level in seed.rates]
        one = encode_int(1)
        parts = [  # a settlement each, of one bucket, as _queue would make it (none is held)
            (
                _Part(
                    encode(self._prefix + key), 1, encode("", value, 0, 1, *bucket), 7, False, one
                ),
                None,
            )
            for key, value, bucket in buckets
        ]
        sent = self._retry_held()
        if sent:
            await asyncio.wait(sent)
        try:
            for at in range(0, len(parts), SEED_BATCH):
                await self._run(self._packed(parts[at : at + SEED_BATCH], _NO_LEASE))
            if seed.whole:
                expires = int(month_end(seed.month) + QUOTA_RETENTION)
                await self._client.call("SET", self._seeded_key(seed.month), "1", "EXAT", expires)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def reset(self, scope: str) -> None:
        """Delete every bucket of ``scope`` (SCAN + DEL; admin and tests).

        Queued settlements are sent first, so none re-creates a bucket after the reset.
        """
        await self._applied()
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
            raise _unavailable(exc) from exc

    async def aclose(self) -> None:
        """Send the queued settlements and wait for every call in flight; then close the
        client when this limiter created it."""
        self._retry_held()  # one more try for the held ones
        while True:
            self._flush()
            if not self._background:
                break
            # Finishing a call may queue more (an orphan's release): hence the loop.
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._held:
            log.warning(
                "rate limiter: %d settlements not applied, Redis unavailable at stop "
                "(their leases expire on their own)",
                len(self._held),
            )
            self._held = []
            self._failed_at.clear()
        if self._owns_client:
            await self._raw_client.aclose()


def _log_orphan(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("rate limiter: orphaned reservation not released (%s)", future.exception())
