"""Rate-limit types, the :class:`Limiter` ABC, and the fail-open/fail-closed wrapper.

Algorithms (the same in :mod:`.memory` and in the Redis Lua scripts):

- ``requests`` and ``tokens`` (rpm, tpm, rpd): GCRA, the generic cell rate algorithm, in
  its continuous-state leaky-bucket form (ITU-T I.371 defines the two equivalent forms).
  The state per bucket is ``(level, stamp)``: ``level`` drains at ``limit / window`` units
  per second; a cost ``c`` is admitted when ``level + c <= limit``. Equivalent to the
  virtual-scheduling form (``TAT = stamp + level * window / limit``) but integer costs at one
  instant add up exactly, with no float drift at the boundary. A full bucket admits
  ``limit`` at once, then one unit every ``window / limit`` seconds.
- ``concurrency``: a set of leases (lease id -> expiry). A slot is held until the request
  settles, or until its lease expires, so a crashed process cannot leak slots. A live
  process renews the leases of its requests still running (:meth:`Limiter.renew_leases`,
  every third of the TTL), so a request longer than the TTL keeps its slot.
- ``quota`` (monthly tokens): a counter per scope and calendar month in UTC (``"2026-11"``).

A request passes a list of :class:`Check`; :meth:`Limiter.acquire` takes all of them or none.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import functools
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = [
    "DEFAULT_LEASE_TTL",
    "Check",
    "Decision",
    "FailoverLimiter",
    "Kind",
    "Limiter",
    "LimiterUnavailable",
    "RateStatus",
    "Reservation",
    "Seed",
    "level_from_counts",
    "month_end",
    "month_of",
    "month_span",
]

log = logging.getLogger("chatgate.ratelimit")

Kind = Literal["requests", "tokens", "concurrency", "quota"]
KINDS: tuple[Kind, ...] = ("requests", "tokens", "concurrency", "quota")
RATE_KINDS: frozenset[str] = frozenset({"requests", "tokens"})

# One-letter codes used in storage keys and in the Lua scripts.
KIND_CODE: dict[str, str] = {"requests": "r", "tokens": "t", "concurrency": "c", "quota": "q"}

DEFAULT_LEASE_TTL = 60.0
"""Seconds a concurrency slot is held when its request never settles and nothing renews its
lease: how long a process that died (with Redis) keeps its requests' slots taken. A running
request's process renews its lease every third of this (:meth:`Limiter.renew_leases`), so a
request may run for any length of time."""
DEFAULT_CONCURRENCY_RETRY = 1.0
"""retry_after hint for a full concurrency limit: a slot frees when any request ends."""
FALLBACK_SEED_WAIT = 1.0
"""Seconds the fallback's first admissions of an outage wait for its seed at most (see
:attr:`FailoverLimiter.outage_began`); then it answers unseeded, and later ones do not wait."""
QUOTA_RETENTION = 40 * 86400.0
"""Seconds a month's quota counter is kept after the month ends (for reporting)."""
SETTLE_DEADLINE = 6 * 3600.0
"""A reservation not settled within this many seconds is forgotten (settle is then a no-op)."""
EPS = 1e-6
"""Tolerance, in units of cost, for float noise in drained levels."""
RESET_TIE = 1e-6
"""Seconds within which two checks' resets count as equal (see :func:`most_restrictive`)."""

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


class LimiterUnavailable(Exception):
    """The limiter's store (Redis) cannot be reached; the caller picks fail-open or closed."""


# The month that ``month_of`` last answered, as (first second, next month's first second, text):
# every request of a month asks the same, and ``gmtime`` plus formatting is not free.
_month_span: tuple[float, float, str] = (0.0, -1.0, "")


def month_of(ts: float) -> str:
    """The UTC calendar month of unix time ``ts`` as ``"YYYY-MM"``."""
    start, end, text = _month_span
    if start <= ts < end:
        return text
    return month_span(ts)[2]


def month_span(ts: float) -> tuple[float, float, str]:
    """The UTC calendar month of unix time ``ts``: (its first second, the next month's, its
    ``"YYYY-MM"``)."""
    global _month_span
    if _month_span[0] <= ts < _month_span[1]:
        return _month_span
    t = time.gmtime(ts)
    text = f"{t.tm_year:04d}-{t.tm_mon:02d}"
    _month_span = (float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))), month_end(text), text)
    return _month_span


@functools.lru_cache(maxsize=64)
def month_end(month: str) -> float:
    """Unix time at which ``month`` (``"YYYY-MM"``, UTC) ends: the next month's first second."""
    match = _MONTH.match(month)
    if match is None:
        raise ValueError(f"month must look like 2026-11, not {month!r}")
    year, mon = int(match.group(1)), int(match.group(2))
    year, mon = (year + 1, 1) if mon == 12 else (year, mon + 1)
    return float(calendar.timegm((year, mon, 1, 0, 0, 0, 0, 0, 0)))


@dataclass(frozen=True, slots=True)
class Check:
    """One limit a request must pass.

    ``window`` is the rate window in seconds (``requests``, ``tokens``); ``month`` names the
    quota bucket (``quota``; derived from the limiter's clock when ``None``). The cost of a
    request is 1 for ``requests`` and ``concurrency`` and the reserved tokens for ``tokens``
    and ``quota``. Checks naming the same bucket (scope, kind, window) are charged once, so
    pass a key's override instead of, not beside, the plan's value for the same scope.
    """

    scope: str
    kind: Kind
    limit: int
    window: float = 60.0
    month: str | None = None
    # Derived once here, read on every request: the storage key ("" for a quota whose month
    # is not resolved yet: :attr:`bucket` checks, limiters given resolved checks read ``key``),
    # whether the cost is the reserved tokens, whether it is a GCRA bucket and its drain
    # rate, whether it still needs a month; plus the last month this check was resolved to.
    key: str = field(init=False, repr=False, compare=False)
    charges_tokens: bool = field(init=False, repr=False, compare=False)
    is_rate: bool = field(init=False, repr=False, compare=False)
    rate: float = field(init=False, repr=False, compare=False)  # units per second (GCRA)
    floating: bool = field(init=False, repr=False, compare=False)  # a quota of "this month"
    _resolved: tuple[str, Check] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown limit kind {self.kind!r}")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")
        if self.kind in RATE_KINDS and not self.window > 0:
            raise ValueError("a rate limit needs a window > 0 seconds")
        if self.month is not None and not _MONTH.match(self.month):
            raise ValueError(f"month must look like 2026-11, not {self.month!r}")
        if "|" in self.scope:
            raise ValueError("a scope may not contain '|'")
        code = KIND_CODE[self.kind]
        if self.kind in RATE_KINDS:
            bucket = f"{self.scope}|{code}|{self.window:g}"
        elif self.kind == "quota":
            bucket = f"{self.scope}|{code}|{self.month}" if self.month is not None else ""
        else:
            bucket = f"{self.scope}|{code}"
        object.__setattr__(self, "key", bucket)
        object.__setattr__(self, "floating", self.kind == "quota" and self.month is None)
        object.__setattr__(self, "charges_tokens", self.kind in ("tokens", "quota"))
        object.__setattr__(self, "is_rate", self.kind in RATE_KINDS)
        rate = self.limit / self.window if self.kind in RATE_KINDS else 0.0
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "_resolved", None)

    @classmethod
    def rpm(cls, scope: str, limit: int) -> Check:
        """Requests per minute."""
        return cls(scope, "requests", limit, 60.0)

    @classmethod
    def rpd(cls, scope: str, limit: int) -> Check:
        """Requests per day."""
        return cls(scope, "requests", limit, 86400.0)

    @classmethod
    def tpm(cls, scope: str, limit: int) -> Check:
        """Tokens per minute."""
        return cls(scope, "tokens", limit, 60.0)

    @classmethod
    def concurrent(cls, scope: str, limit: int) -> Check:
        """Requests in flight at once."""
        return cls(scope, "concurrency", limit, 0.0)

    @classmethod
    def monthly_quota(cls, scope: str, limit: int, month: str | None = None) -> Check:
        """Tokens per calendar month (UTC)."""
        return cls(scope, "quota", limit, 0.0, month)

    def cost(self, tokens: int) -> int:
        """What one request reserving ``tokens`` costs against this check."""
        return tokens if self.charges_tokens else 1

    def resolved(self, now: float) -> Check:
        """This check with its quota month filled in from unix time ``now``.

        The resolved copy is kept for the month, so a plan's checks, built once per key,
        resolve without building anything on later requests.
        """
        if not self.floating:
            return self
        month = month_of(now)
        cached = self._resolved
        if cached is not None and cached[0] == month:
            return cached[1]
        check = dataclasses.replace(self, month=month)
        object.__setattr__(self, "_resolved", (month, check))
        return check

    @property
    def bucket(self) -> str:
        """The storage key of this check's state (``scope|code|window-or-month``)."""
        if not self.key:
            raise ValueError("resolve the quota month first")
        return self.key


@dataclass(slots=True)  # not frozen: built per request, and 3x cheaper so
class RateStatus:
    """Values for the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers."""

    limit: int
    remaining: int
    reset_after: float  # seconds until the bucket is back to full


@dataclass(slots=True)  # not frozen: built per request, and 3x cheaper so
class Reservation:
    """What an admitted request took, to hand back to :meth:`Limiter.settle`."""

    lease_id: str
    checks: tuple[Check, ...]  # quota months resolved
    tokens: int  # reserved tokens (the cost of ``tokens`` and ``quota`` checks)


@dataclass(slots=True)  # not frozen: built per request, and 3x cheaper so
class Decision:
    """The answer to :meth:`Limiter.acquire`.

    When refused, ``failed`` is the check that answers among those that refuse (see
    :func:`answers_refusal`: a quota, else the longest wait), ``used`` what it had used,
    ``requested`` what this request asked of it, and ``retry_after`` seconds until it could
    pass (``math.inf`` when it never can: the cost exceeds the limit).
    ``requests``/``tokens`` carry header values: the most restrictive check of each kind, as
    an allowed request's (of the levels it found, since it took nothing).
    """

    allowed: bool
    reservation: Reservation | None = None
    failed: Check | None = None
    used: int = 0
    requested: int = 0
    retry_after: float = 0.0
    requests: RateStatus | None = None
    tokens: RateStatus | None = None

    @property
    def limit(self) -> int:
        """The failing check's limit (0 when allowed)."""
        return self.failed.limit if self.failed is not None else 0

    @property
    def remaining(self) -> int:
        """What the failing check had left (0 when allowed)."""
        return max(self.limit - self.used, 0)


def used_units(level: float) -> int:
    """Whole units in use at ``level`` (a partly drained unit is still in use)."""
    used = math.ceil(level - EPS)
    return used if used > 0 else 0


def answers_refusal(check: Check, wait: float, best: Check | None, best_wait: float) -> bool:
    """Whether ``check``, which refuses this request for ``wait`` seconds (``math.inf``:
    never passes), answers the refusal instead of ``best``, the one chosen so far among the
    checks before it (``None``: none yet), which refuses for ``best_wait``.

    A quota answers over any rate or concurrency limit: its refusal says the month is spent,
    and is not retried (a rate limit's would be, only to meet the quota's). Among quotas the
    first; among the others the longest wait, the first on a tie (waits within
    :data:`RESET_TIE` of each other tie: both limiters work them out in floats, in different
    expressions). So ``retry_after`` is a wait after which every limit that refused lets the
    request through. Both limiters choose by it (``limiter.lua`` writes it out).
    """
    if best is None:
        return True
    if best.kind == "quota":
        return False
    return check.kind == "quota" or wait > best_wait + RESET_TIE


def most_restrictive(pairs: Iterable[tuple[Check, float]]) -> RateStatus | None:
    """Header values for the most restrictive of rate checks of one kind, each with its
    bucket's level: the fewest remaining, then the longest reset; the first on a tie (resets
    within :data:`RESET_TIE` of each other tie: float noise in a drained level must not
    decide which limit the headers show). The compiled admissions of both limiters
    (:mod:`.program`) work the same out inline; property tests hold them to it.

    Refusals come through here (both limiters' admissions work the header values out in
    compiled code, :mod:`.program`), so :func:`used_units` is written out inline and a
    :class:`RateStatus` is built only for a check that is the most restrictive so far.
    """
    best: RateStatus | None = None
    for check, level in pairs:
        limit = check.limit
        used = math.ceil(level - EPS)  # used_units(level)
        remaining = limit - used if used > 0 else limit
        if remaining < 0:
            remaining = 0
        reset = level * check.window / limit if limit > 0 else check.window
        if not reset > 0:
            reset = 0.0
        if (
            best is None
            or remaining < best.remaining
            or (remaining == best.remaining and reset > best.reset_after + RESET_TIE)
        ):
            best = RateStatus(limit, remaining, reset)
    return best


def decide(
    checks: Sequence[Check],
    levels: Sequence[float],
    costs: Sequence[int],
    failed: int | None,
    retry_after: float,
    reservation: Reservation | None,
) -> Decision:
    """Build a :class:`Decision` from each check's state before this request.

    Shared by every implementation so they agree on rounding and header choice.
    ``failed`` is the index of the check that answers the refusal (:func:`answers_refusal`),
    or ``None``. The headers are the most restrictive of each kind either way, as a success
    reports them (a refusal's of the levels before it, since it took nothing): the failing
    check's own values made a 429 report another limit than the 200 before it.
    """
    after = failed is None
    rates: dict[str, list[tuple[Check, float]]] = {"requests": [], "tokens": []}
    for check, level, cost in zip(checks, levels, costs, strict=True):
        if check.is_rate:
            rates[check.kind].append((check, level + cost if after else level))
    requests = most_restrictive(rates["requests"])
    tokens = most_restrictive(rates["tokens"])
    if failed is None:
        return Decision(True, reservation, requests=requests, tokens=tokens)
    check = checks[failed]
    return Decision(
        False,
        None,
        failed=check,
        used=used_units(levels[failed]),
        requested=costs[failed],
        retry_after=retry_after,
        requests=requests,
        tokens=tokens,
    )


class Resolved:
    """A tuple of checks with their quota months resolved, valid from ``since`` until
    ``until`` (one month, or forever when no check floats with the month): what each limiter
    compiles a key's checks into derives from it (:class:`CompiledChecks`)."""

    __slots__ = ("checks", "resolved", "since", "until")

    def __init__(self, checks: Sequence[Check], now: float) -> None:
        self.checks = checks
        self.since, self.until = -math.inf, math.inf
        if any(check.floating for check in checks):
            self.since, self.until, _ = month_span(now)
        self.resolved = tuple(check.resolved(now) for check in checks)


R = TypeVar("R", bound=Resolved)


class CompiledChecks(Generic[R]):
    """A limiter's compiled form of each key's checks, kept by the tuple's identity.

    The gateway passes the same tuple for every request of a key (see
    :func:`chatgate.limits.checks_for`), so it is compiled once per key and quota month; any
    other sequence is compiled afresh. A settlement finds it again by its reservation's
    resolved tuple. At most ``limit`` entries (two per key); when full, all are dropped and
    rebuilt on their next request.
    """

    def __init__(self, build: Callable[[Sequence[Check], float], R], limit: int = 20_000) -> None:
        self._build = build
        self._limit = limit
        self._by_id: dict[int, R] = {}

    def for_checks(self, checks: Sequence[Check], now: float) -> R:
        """The compiled form of ``checks`` valid at ``now``."""
        compiled = self._by_id.get(id(checks))
        if (
            compiled is None
            or compiled.checks is not checks
            or not compiled.since <= now < compiled.until
        ):
            compiled = self._build(checks, now)
            if isinstance(checks, tuple):  # immutable: safe to keep by identity
                if len(self._by_id) >= self._limit:
                    self._by_id.clear()
                self._by_id[id(checks)] = compiled
                self._by_id[id(compiled.resolved)] = compiled
        return compiled

    def for_resolved(self, resolved: tuple[Check, ...]) -> R:
        """The compiled form whose resolved checks are ``resolved`` (a reservation's)."""
        compiled = self._by_id.get(id(resolved))
        if compiled is None or compiled.resolved is not resolved:
            compiled = self._build(resolved, 0.0)  # resolved already: any time will do
        return compiled


class Ledger:
    """Open reservations by lease id, oldest first, so each settles at most once, and the
    old ones can be found to renew their leases.

    Entries older than ``max_age`` are forgotten (amortised O(1)), so a caller that never
    settles cannot grow it without bound.
    """

    def __init__(self, clock: Callable[[], float], max_age: float = SETTLE_DEADLINE) -> None:
        self._clock = clock
        self._max_age = max_age
        self._open: OrderedDict[str, tuple[float, Reservation]] = OrderedDict()

    def add(self, reservation: Reservation, now: float | None = None) -> None:
        """Remember an open reservation (``now``: the clock's time, when the caller has it)."""
        if now is None:
            now = self._clock()
        self._open[reservation.lease_id] = (now, reservation)
        while self._open:
            oldest, (at, _) = next(iter(self._open.items()))
            if now - at < self._max_age:
                break
            del self._open[oldest]

    def take(self, lease_id: str) -> bool:
        """Forget ``lease_id``; True when it was open (the first settle)."""
        return self._open.pop(lease_id, None) is not None

    def older_than(self, age: float) -> list[Reservation]:
        """The open reservations added more than ``age`` seconds ago, oldest first."""
        cutoff = self._clock() - age
        found: list[Reservation] = []
        for at, reservation in self._open.values():
            if at > cutoff:
                break
            found.append(reservation)
        return found

    def held(self) -> dict[str, int]:
        """The tokens the open reservations hold of each quota counter (by its key): what a
        seed must not swallow (:meth:`Limiter.seed`). O(open reservations)."""
        held: dict[str, int] = {}
        for _, reservation in self._open.values():
            if reservation.tokens:
                for key in {check.key for check in reservation.checks if check.kind == "quota"}:
                    held[key] = held.get(key, 0) + reservation.tokens
        return held

    def __len__(self) -> int:
        return len(self._open)


@dataclass(frozen=True, slots=True)
class Seed:
    """What the usage records say a limiter's buckets hold at least (:meth:`Limiter.seed`).

    ``quotas``: tokens of ``month`` per scope; ``rates``: rate checks (requests per day) and
    their buckets' level now (:func:`level_from_counts`). ``whole``: every scope with a limit
    is in it, so the store counts as seeded for ``month`` after it; False for the scopes of
    one change (a plan, an account, a key), which must not stand in for the whole seed.
    """

    month: str
    quotas: Mapping[str, int]
    rates: Sequence[tuple[Check, float]] = ()
    whole: bool = True


def level_from_counts(counts: Iterable[tuple[float, int]], now: float, rate: float) -> float:
    """The level at ``now`` of a GCRA bucket draining ``rate`` a second that took ``counts``
    (time bucket start, units taken in it), empty before them.

    A bucket's level is the most, over every earlier time ``t``, of what it took since ``t``
    less what drained since (Lindley's recursion unrolled). Known only at the buckets' starts,
    this is that most over those ``t``: exact when each bucket's units came at its start, never
    above the true level otherwise.
    """
    level = 0.0
    taken = 0
    for start, units in sorted(counts, reverse=True):
        taken += units
        level = max(level, taken - max(now - start, 0.0) * rate)
    return level


class Limiter(ABC):
    """Checks and takes the limits of one request, atomically, and settles them after."""

    lease_ttl: float = DEFAULT_LEASE_TTL
    """Seconds a concurrency slot is held when nothing settles or renews it."""

    @abstractmethod
    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Evaluate every check; take all of them only if all pass.

        ``cost_tokens`` is the reservation for ``tokens`` and ``quota`` checks (prompt
        tokens + ``max_tokens``, or a ceiling). On success ``Decision.reservation`` must be
        settled (or released) exactly once. Raises :class:`LimiterUnavailable` when the
        store cannot be reached.
        """

    async def acquire_both(
        self, first: Sequence[Check], first_cost: int, checks: Sequence[Check], cost_tokens: int
    ) -> tuple[Decision, Decision | None]:
        """:meth:`acquire` of ``first`` at ``first_cost`` and of ``checks`` at
        ``cost_tokens``, all or nothing: two reservations, each settled on its own (a monthly
        budget counted in money beside the limits counted in tokens).

        Allowed: ``(checks' decision, first's decision)``. Refused: ``(the refusal, None)``,
        ``first``'s when both would refuse, and nothing taken. ``first`` must be quotas
        alone: this default (in process, where nothing comes between the two calls) takes
        ``first`` and gives it back if ``checks`` refuse, which is exact for a quota; a
        remote limiter does both in one round trip.
        """
        head = await self.acquire(first, first_cost)
        if head.reservation is None:
            return head, None
        try:
            decision = await self.acquire(checks, cost_tokens)
        except BaseException:
            await self.settle(head.reservation, 0)
            raise
        if decision.reservation is None:
            await self.settle(head.reservation, 0)
            return decision, None
        return decision, head

    @abstractmethod
    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Charge ``actual_tokens`` instead of the reserved amount and free the concurrency slot.

        Unused tokens go back to ``tokens`` buckets and the monthly quota; extra tokens are
        charged even into debt. Returns False (and does nothing) when this reservation was
        already settled or is too old. Raises :class:`LimiterUnavailable`.
        """

    def settle_nowait(self, reservation: Reservation, actual_tokens: int) -> asyncio.Future[bool]:
        """Start :meth:`settle` without waiting for it: its outcome, as a future.

        For an answer that must not wait on the store. A limiter that batches (Redis) queues
        the settlement here, before returning, so its next :meth:`acquire` already accounts
        for it; this default runs :meth:`settle` in a task. The caller keeps the future and
        retrieves its exception (:class:`LimiterUnavailable`, as :meth:`settle` raises).
        :meth:`aclose` finishes what this started before it releases any connection.
        """
        return asyncio.ensure_future(self.settle(reservation, actual_tokens))

    async def release(self, reservation: Reservation) -> bool:
        """Settle a request that produced nothing (failed upstream, rejected later)."""
        return await self.settle(reservation, 0)

    def renew_leases(self, age: float) -> int:
        """Hold the concurrency slots of the reservations still open that were admitted more
        than ``age`` seconds ago for a full :attr:`lease_ttl` from now; how many there were.

        The gateway calls it every third of the TTL (:meth:`chatgate.limits.Limits.run_renewal`):
        a request that runs longer than the TTL (a long stream, retries of a slow upstream)
        keeps its slot, and a process that dies stops renewing, so its slots still free within
        one TTL. It never waits on the store: a remote limiter queues the renewals like
        settlements (a renewal is idempotent, so one whose call may have failed is sent again
        on the next pass).
        """
        return 0

    @abstractmethod
    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Tokens charged to ``scope``'s monthly quota in ``month`` (default: this month)."""

    @abstractmethod
    async def seeded(self, month: str) -> bool:
        """Whether this store's counters hold the usage recorded before it began counting
        (:meth:`seed` ran for ``month`` since the store last lost them).

        A new process's memory, or a Redis that restarted without persistence, starts every
        bucket empty: without a seed, every account would get its month's quota and its day's
        requests back. Raises :class:`LimiterUnavailable`.
        """

    @abstractmethod
    async def seed(self, seed: Seed) -> None:
        """Raise each counter and bucket of ``seed`` to at least its value, and note its month
        as seeded (if the seed is whole).

        Never lowers one: what this store counted since it lost them may not all be recorded
        yet. A quota counter's reservations still open are not in the records yet: what the
        counter holds besides them is raised, and they stay on top (their settlements give
        them back). Raises :class:`LimiterUnavailable`.
        """

    @abstractmethod
    async def reset(self, scope: str) -> None:
        """Forget every bucket of ``scope`` (admin and tests)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections held by this limiter."""


class FailoverLimiter(Limiter):
    """Use ``primary`` (Redis); when it is unavailable, fail open to ``fallback`` or closed.

    Fail-open answers from ``fallback`` (per-process limits) and counts it in ``fallbacks``;
    fail-closed re-raises :class:`LimiterUnavailable` (the gateway answers 503). After a
    failure the primary is skipped for ``cooldown`` seconds, so a dead Redis costs one
    timeout per cooldown, not one per request. Settle failures are logged and counted in
    ``settle_failures``, never raised: the response has gone out, and leases expire anyway.
    """

    def __init__(
        self,
        primary: Limiter,
        fallback: Limiter,
        *,
        fail_open: bool = True,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        seed_wait: float = FALLBACK_SEED_WAIT,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.fail_open = fail_open
        self.cooldown = cooldown
        self.seed_wait = seed_wait
        self.fallbacks = 0
        self.settle_failures = 0
        self.outage_began: Callable[[], None] | None = None
        """Called when an outage begins and the fallback is to answer (failing open): the
        owner seeds it at once (:meth:`seed`). Meanwhile the fallback admits nothing, up to
        ``seed_wait`` seconds: its buckets are stale (the primary counted since its last
        seed), and every process would grant a spent month's quota again until then."""
        self._clock = clock
        self._down_until = -math.inf
        self._outage = False  # the primary failed, and has not answered an admission since
        self._seeded_now: asyncio.Event | None = None  # set by the outage's first seed
        self._from_fallback = Ledger(clock)
        self._fallback_seeded: set[str] = set()  # months seeded since the last outage began
        # The fallback admitted requests the primary never counted (an outage, failing open):
        # the primary wants seeding from the usage records once it answers again.
        self._primary_missed = False
        self.lease_ttl = primary.lease_ttl

    @property
    def degraded(self) -> bool:
        """True while the primary is being skipped after a failure."""
        return self._clock() < self._down_until

    @property
    def answering_from_fallback(self) -> bool:
        """True in an outage failing open: the fallback answers, and counts only this
        process's admissions (the owner seeds it again and again from the usage records, which
        hold the other processes' too; see ``Limits.run_seeding``)."""
        return self._outage and self.fail_open

    def _mark_down(self, exc: LimiterUnavailable) -> None:
        self._primary_missed = self._primary_missed or self.fail_open
        if not self._outage:  # it begins (not a retry of the primary within one)
            self._outage = True
            # The fallback's buckets missed what the primary counted: seed them again.
            self._fallback_seeded.clear()
            if self.fail_open and self.outage_began is not None:
                self._seeded_now = asyncio.Event()
                self.outage_began()
            # Once an outage, not at each retry (it was a line a second while it lasted: QA).
            log.warning(
                "rate limiter store unavailable (%s); failing %s, trying it again every %.1fs",
                exc,
                "open" if self.fail_open else "closed",
                self.cooldown,
            )
        self._down_until = self._clock() + self.cooldown

    def _recovered(self) -> None:
        """The primary answered an admission again: the outage is over."""
        self._outage = False
        log.warning("rate limiter store available again")

    def _primary_up(self) -> bool:
        """Whether to ask the primary; raises while it is skipped and the policy fails closed."""
        if not self.degraded:
            return True
        if not self.fail_open:
            raise LimiterUnavailable("rate limiter store unavailable (cooling down)")
        return False

    def _primary_failed(self, exc: LimiterUnavailable) -> None:
        """The primary could not answer an admission: skip it; raise when failing closed."""
        self._mark_down(exc)
        if not self.fail_open:
            raise exc

    async def _fallback_seeded_first(self) -> None:
        """Wait for the outage's seed of the fallback (:attr:`outage_began`), ``seed_wait``
        seconds at most: then it answers unseeded (the database may be down too), and no
        later admission waits."""
        seeding = self._seeded_now
        if seeding is None or seeding.is_set():
            return
        try:
            async with asyncio.timeout(self.seed_wait):
                await seeding.wait()
        except TimeoutError:
            if not seeding.is_set():
                seeding.set()
                log.warning(
                    "the fallback limits were not seeded in %gs: answering unseeded", self.seed_wait
                )

    async def acquire(self, checks: Sequence[Check], cost_tokens: int = 0) -> Decision:
        """Acquire from the primary, or per the fail-open policy from the fallback."""
        if self._primary_up():
            try:
                decision = await self.primary.acquire(checks, cost_tokens)
            except LimiterUnavailable as exc:
                self._primary_failed(exc)
            else:
                if self._outage:
                    self._recovered()
                return decision
        await self._fallback_seeded_first()
        self.fallbacks += 1
        decision = await self.fallback.acquire(checks, cost_tokens)
        if decision.reservation is not None:
            self._from_fallback.add(decision.reservation)
        return decision

    async def acquire_both(
        self, first: Sequence[Check], first_cost: int, checks: Sequence[Check], cost_tokens: int
    ) -> tuple[Decision, Decision | None]:
        """:meth:`.Limiter.acquire_both` from the primary, or per the policy the fallback."""
        if self._primary_up():
            try:
                both = await self.primary.acquire_both(first, first_cost, checks, cost_tokens)
            except LimiterUnavailable as exc:
                self._primary_failed(exc)
            else:
                if self._outage:
                    self._recovered()
                return both
        await self._fallback_seeded_first()
        self.fallbacks += 1
        both = await self.fallback.acquire_both(first, first_cost, checks, cost_tokens)
        for decision in both:
            if decision is not None and decision.reservation is not None:
                self._from_fallback.add(decision.reservation)
        return both

    async def settle(self, reservation: Reservation, actual_tokens: int) -> bool:
        """Settle with whichever limiter issued ``reservation``; never raises unavailability."""
        if self._from_fallback.take(reservation.lease_id):
            return await self.fallback.settle(reservation, actual_tokens)
        try:
            return await self.primary.settle(reservation, actual_tokens)
        except LimiterUnavailable as exc:
            return self._settle_failed(exc)

    def settle_nowait(self, reservation: Reservation, actual_tokens: int) -> asyncio.Future[bool]:
        """:meth:`settle` started at once (queued, with a batching primary); never fails with
        unavailability: the future then resolves to False."""
        if self._from_fallback.take(reservation.lease_id):
            return self.fallback.settle_nowait(reservation, actual_tokens)
        inner = self.primary.settle_nowait(reservation, actual_tokens)
        outer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        inner.add_done_callback(functools.partial(self._settled, outer))
        return outer

    def _settled(self, outer: asyncio.Future[bool], inner: asyncio.Future[bool]) -> None:
        if inner.cancelled():
            outer.cancel()
            return
        exc = inner.exception()
        if outer.done():
            return
        if exc is None:
            outer.set_result(inner.result())
        elif isinstance(exc, LimiterUnavailable):
            outer.set_result(self._settle_failed(exc))
        else:
            outer.set_exception(exc)

    def _settle_failed(self, exc: LimiterUnavailable) -> bool:
        """A settle the primary could not apply: counted, logged once per cooldown."""
        self.settle_failures += 1
        self._mark_down(exc)
        return False

    def renew_leases(self, age: float) -> int:
        """Renew in both limiters: each holds the leases it issued."""
        return self.primary.renew_leases(age) + self.fallback.renew_leases(age)

    async def quota_used(self, scope: str, month: str | None = None) -> int:
        """Read from the primary; from the fallback when failing open."""
        try:
            return await self.primary.quota_used(scope, month)
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            return await self.fallback.quota_used(scope, month)

    async def seeded(self, month: str) -> bool:
        """The primary's answer; while it is down and failing open, whether the fallback was
        seeded since the outage began (its buckets were stale from before); once it is up
        again after such an outage, False until it is seeded (what the fallback admitted
        meanwhile is in the usage records, not in the primary's counters)."""
        if not self.degraded:
            if self._primary_missed:
                return False
            try:
                return await self.primary.seeded(month)
            except LimiterUnavailable as exc:
                self._mark_down(exc)
        return not self.fail_open or month in self._fallback_seeded

    async def seed(self, seed: Seed) -> None:
        """Seed the primary unless it is down, and the fallback always (it answers the next
        outage); never raises unavailability."""
        if not self.degraded:
            try:
                await self.primary.seed(seed)
            except LimiterUnavailable as exc:
                self._mark_down(exc)
            else:
                self._primary_missed = self._primary_missed and not seed.whole
        await self.fallback.seed(seed)
        if seed.whole:
            self._fallback_seeded.add(seed.month)
            if self._seeded_now is not None:
                self._seeded_now.set()

    async def reset(self, scope: str) -> None:
        """Reset ``scope`` in both limiters."""
        await self.fallback.reset(scope)
        await self.primary.reset(scope)

    async def aclose(self) -> None:
        """Close both limiters."""
        await self.primary.aclose()
        await self.fallback.aclose()
