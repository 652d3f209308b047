"""Plans and keys -> limiter checks; decisions -> OpenAI's 429s and ``x-ratelimit-*`` headers.

Scopes: the account (``acct:<id>``) is held to its plan; a key (``key:<id>``) additionally to
its own overrides, when it has any. Checks run key first, then account; when some refuse, a
quota answers (``insufficient_quota``, not retried), else the one with the longest wait, whose
wait is ``retry-after`` (:func:`chatgate.ratelimit.base.answers_refusal`). Token limits
reserve ``prompt tokens + max_tokens`` (or ``default_max_tokens``) before the call and settle
to the real usage after (:meth:`Limits.settle_soon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.auth import Principal
from chatgate.ratelimit import (
    Check,
    Decision,
    FailoverLimiter,
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RateStatus,
    Reservation,
)
from chatgate.ratelimit.base import Seed, level_from_counts, month_span
from chatgate.settings import Settings
from chatgate.timefmt import reset_text
from chatgate.usage.queries import Change, budget_usage, hourly_requests, quota_usage
from chatgate.usage.tables import DAY, HOUR, NANOS_PER_CENT

log = logging.getLogger(__name__)

_WINDOW_TEXT = {60.0: ("per min", "M"), 86400.0: ("per day", "D")}
CHANGE_SEED_WAIT = 0.5
"""Seconds the invalidation feed waits for changes' seeds before it applies the changes
anyway (see :meth:`Limits.seed_changes`): revocations and disables stay within a second."""

SEED_INTERVAL = 5.0
"""Seconds between checks that the limiter is seeded (see :meth:`Limits.seed`): how long a
Redis that lost its data counts quotas and daily limits from 0."""

OUTAGE_SEED_INTERVAL = 1.0
"""Seconds between seeds of the in-process fallback while it answers a Redis outage: each
process counts only its own admissions then, and the others' reach it through the usage
records (flushed every second). Seeded once, at the outage's start, each process admitted
up to a quota's (or a day's requests') whole remainder by itself: QA, 1,668 tokens recorded
against a 600-token quota on three nodes in a 20-second outage."""


def checks_for(principal: Principal) -> tuple[Check, ...]:
    """The checks one request of ``principal`` must pass, key scope first.

    Built once per principal and kept on it (see :attr:`Principal.limit_checks`), with
    whether one charges tokens (:attr:`Principal.limit_tokens`, see :func:`needs_tokens`).
    """
    checks = principal.limit_checks
    if checks is None:
        checks = _build_checks(principal)
        # Cache slots of a frozen value; the tokens flag first: the checks mark all set.
        object.__setattr__(principal, "limit_tokens", needs_tokens(checks))
        ceiling = min((c.limit for c in checks if c.kind == "tokens"), default=None)
        object.__setattr__(principal, "token_ceiling", ceiling)
        object.__setattr__(principal, "limit_checks", checks)
    return checks


BUDGET_PREFIX = "usd:"
"""A budget's limiter scope is its key's or account's scope behind this: its counter is a
monthly quota of nano-dollars beside the quota of tokens."""


def budget_checks_for(principal: Principal) -> tuple[Check, ...]:
    """The monthly budgets of ``principal``'s key and account (``monthly_budget_cents``), as
    quota checks counting nano-dollars; built once per principal and kept on it."""
    checks = principal.budget_checks
    if checks is None:
        checks = tuple(
            Check.monthly_quota(BUDGET_PREFIX + scope, cents * NANOS_PER_CENT)
            for scope, limits in (
                (key_scope(principal.key_id), principal.key_limits),
                (account_scope(principal.account_id), principal.limits),
            )
            if (cents := limits.get("monthly_budget_cents")) is not None
        )
        object.__setattr__(principal, "budget_checks", checks)
    return checks


def request_checks_for(principal: Principal) -> tuple[Check, ...]:
    """The request-rate checks (rpm, rpd) of ``principal``'s key and account alone: what a
    call that uses no model and no tokens (a session write) counts against; built once per
    principal and kept on it. Not concurrency, tokens or quotas: such a call is a database
    write, not a model's time or output, and is refused neither while the account's streams
    run nor once its month's tokens are spent."""
    checks = principal.request_checks
    if checks is None:
        checks = tuple(check for check in checks_for(principal) if check.kind == "requests")
        object.__setattr__(principal, "request_checks", checks)
    return checks


def dollars(nanos: int) -> str:
    """Nano-dollars as a price, in cents where that is exact (``$12.34``), else to the
    millionth of a dollar rounded up (``$0.008016``): a budget of a cent with $0.008016
    spent must not read "Limit $0.01, Used $0.01" while requests still pass."""
    micros = -(-max(nanos, 0) // 1000)
    whole, part = divmod(micros, 1_000_000)
    return f"${whole:,}.{f'{part:06d}'.rstrip('0').ljust(2, '0')}"


def key_scope(key_id: str) -> str:
    """The limiter scope of an API key's own limits."""
    return f"key:{key_id}"


def account_scope(account_id: str) -> str:
    """The limiter scope of an account's plan."""
    return f"acct:{account_id}"


def _build_checks(principal: Principal) -> tuple[Check, ...]:
    checks: list[Check] = []
    for scope, limits in (
        (key_scope(principal.key_id), principal.key_limits),
        (account_scope(principal.account_id), principal.limits),
    ):
        rpm, tpm, rpd = limits.get("rpm"), limits.get("tpm"), limits.get("rpd")
        concurrency, monthly = limits.get("concurrency"), limits.get("monthly_tokens")
        if rpm is not None:
            checks.append(Check.rpm(scope, rpm))
        if rpd is not None:
            checks.append(Check.rpd(scope, rpd))
        if tpm is not None:
            checks.append(Check.tpm(scope, tpm))
        if concurrency is not None:
            checks.append(Check.concurrent(scope, concurrency))
        if monthly is not None:
            checks.append(Check.monthly_quota(scope, monthly))
    return tuple(checks)


def needs_tokens(checks: Sequence[Check]) -> bool:
    """True when a token count matters (a tokens or quota check is present)."""
    return any(check.charges_tokens for check in checks)


def headers_for(decision: Decision) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers (and ``retry-after`` on a refusal)."""
    # Every limited answer comes through here. The usual one (admitted, under limits of both
    # kinds) is one literal, names as constants: a dict built at its size, ~0.5 us less than
    # filling one in. Refusals and plans limiting one kind take the loop.
    status, tokens = decision.requests, decision.tokens
    if decision.allowed and status is not None and tokens is not None:
        return {
            "x-ratelimit-limit-requests": str(status.limit),
            "x-ratelimit-remaining-requests": str(status.remaining),
            "x-ratelimit-reset-requests": reset_text(status.reset_after),
            "x-ratelimit-limit-tokens": str(tokens.limit),
            "x-ratelimit-remaining-tokens": str(tokens.remaining),
            "x-ratelimit-reset-tokens": reset_text(tokens.reset_after),
        }
    headers: dict[str, str] = {}
    for kind, of_kind in (("requests", status), ("tokens", tokens)):
        if of_kind is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(of_kind.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(of_kind.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = reset_text(of_kind.reset_after)
    if not decision.allowed and math.isfinite(decision.retry_after):
        headers["retry-after"] = str(max(math.ceil(decision.retry_after), 1))
        headers["retry-after-ms"] = str(max(math.ceil(decision.retry_after * 1000), 1))
    return headers


def refusal(decision: Decision, model: str) -> errors.APIError:
    """The OpenAI-shaped error for a refused decision."""
    check = decision.failed
    assert check is not None
    headers = headers_for(decision)
    wait = ""
    if math.isfinite(decision.retry_after):
        wait = f" Please try again in {reset_text(decision.retry_after)}."
    else:  # it can never pass (more than the limit, or a limit of 0): retrying cannot help
        headers["x-should-retry"] = "false"
    if check.kind == "quota" and check.scope.startswith(BUDGET_PREFIX):
        headers["x-should-retry"] = "false"
        return errors.InsufficientQuota(
            "You exceeded your current quota, please check your plan and billing details. "
            f"Monthly budget: Limit {dollars(check.limit)}, Used {dollars(decision.used)}, "
            f"Requested up to {dollars(decision.requested)} (the prompt at {model}'s input "
            "price, max_tokens at its output price).",
            headers=headers,
        )
    if check.kind == "quota":
        headers["x-should-retry"] = "false"
        left = check.limit - decision.used
        fits = (  # a reservation over what is left: the quota is not used up
            f" {left} tokens are left this month; a request holds its prompt plus max_tokens "
            "(a default when not set) until it ends, so a smaller max_tokens may fit."
            if left > 0
            else ""
        )
        return errors.InsufficientQuota(
            "You exceeded your current quota, please check your plan and billing details. "
            f"Monthly token quota: Limit {check.limit}, Used {decision.used}, "
            f"Requested {decision.requested}.{fits}",
            headers=headers,
        )
    if check.kind == "concurrency":
        return errors.RateLimited(
            f"Rate limit reached for {model} on concurrent requests: Limit {check.limit}, "
            f"In flight {decision.used}.{wait}",
            headers=headers,
            type="requests",
        )
    per, letter = _WINDOW_TEXT.get(check.window, (f"per {check.window:g}s", "W"))
    unit = "requests" if check.kind == "requests" else "tokens"
    abbrev = f"{'R' if unit == 'requests' else 'T'}P{letter}"
    if unit == "tokens" and not math.isfinite(decision.retry_after):
        return errors.RateLimited(
            f"Request too large for {model} on {unit} {per} ({abbrev}): Limit {check.limit}, "
            f"Requested {decision.requested}. The input or output tokens must be reduced.",
            headers=headers,
            type=unit,
        )
    return errors.RateLimited(
        f"Rate limit reached for {model} on {unit} {per} ({abbrev}): Limit {check.limit}, "
        f"Used {decision.used}, Requested {decision.requested}.{wait}",
        headers=headers,
        type=unit,
    )


@dataclass(slots=True)
class Admission:
    """An admitted request: what to settle afterwards and the headers to send."""

    reservation: Reservation | None
    headers: dict[str, str]
    budget: Admission | None = None
    """The budgets' own admission (nano-dollars), when the key or its plan has one."""
    tokens: RateStatus | None = None
    """The tokens' header values at admission (the reservation taken)."""

    def settled_headers(self, actual_tokens: int) -> dict[str, str]:
        """The headers as they stand once the admission is settled at ``actual_tokens``, for
        an answer settled before it leaves (a whole one): the tokens the reservation held
        beyond the real usage are back, in ``remaining`` and ``reset``. At admission they
        were spent: a client that follows the headers (as ``chatgate.client`` does) waited
        for the reset after every request that set no ``max_tokens`` (4,096 reserved)."""
        status, reservation, headers = self.tokens, self.reservation, self.headers
        if status is None or reservation is None or reservation.tokens <= actual_tokens:
            return headers
        limit = status.limit
        back = min(limit, status.remaining + reservation.tokens - actual_tokens)
        deficit = limit - status.remaining  # > 0: the reservation took some
        # In place (the admission's own dict, built for this request): ~10k instructions a
        # whole answer with a token limit, by callgrind, a copy of the dict among them.
        headers["x-ratelimit-remaining-tokens"] = str(back)
        headers["x-ratelimit-reset-tokens"] = reset_text(
            status.reset_after * (limit - back) / deficit if deficit > 0 else 0.0
        )
        return headers


def _unavailable() -> errors.APIError:
    """The 503 of a limiter that cannot answer while the policy fails closed."""
    return errors.ServiceUnavailable(
        "Rate limiting is temporarily unavailable. Please try again shortly.",
        headers={"retry-after": "1"},
    )


class Limits:
    """The gateway's side of rate limiting: admit, then settle exactly once."""

    def __init__(self, limiter: Limiter, *, remote: bool = False) -> None:
        self.limiter = limiter
        self._remote = remote  # the limiter is across the network (Redis)
        self._settling: set[asyncio.Future[bool]] = set()
        self._changes: set[Change] = set()  # to seed in the background (see seed_changes)
        self._seeding: set[asyncio.Task[None]] = set()  # seeds of changes still running
        self._wake = asyncio.Event()
        self._seed_again = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """In-process limits, or Redis (one Lua call per request) with fail-open/closed."""
        ttl = settings.lease_ttl
        if not settings.redis_url:
            return cls(MemoryLimiter(lease_ttl=ttl))
        from chatgate.ratelimit.redis import RedisLimiter

        # Never retried (a retried acquire could charge twice); one pipelined connection.
        primary = RedisLimiter.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix + "rl:",
            connect_timeout=settings.redis_timeout,
            timeout=settings.redis_timeout,
            lease_ttl=ttl,
        )
        fallback = MemoryLimiter(lease_ttl=ttl)
        failover = FailoverLimiter(primary, fallback, fail_open=settings.ratelimit_fail_open)
        limits = cls(failover, remote=True)
        failover.outage_began = limits._wake.set  # run_seeding seeds the fallback at once
        return limits

    async def admit(self, checks: Sequence[Check], tokens: int, model: str) -> Admission:
        """Take every check or raise the 429 (or 503 when the limiter is down, fail-closed)."""
        if not checks:
            return Admission(None, {})
        try:
            decision = await self.limiter.acquire(checks, tokens)
        except LimiterUnavailable as exc:
            raise _unavailable() from exc
        if not decision.allowed:
            raise refusal(decision, model)
        return Admission(decision.reservation, headers_for(decision), tokens=decision.tokens)

    async def admit_with_budget(
        self,
        checks: Sequence[Check],
        tokens: int,
        budgets: Sequence[Check],
        nanos: int,
        model: str,
    ) -> Admission:
        """:meth:`admit`, with the monthly budgets (counted in nano-dollars, not tokens) taken
        in the same call, all or nothing (one Redis round trip); the budgets' admission rides
        on the result (``budget``) and settles on its own. A budget's refusal comes first."""
        if not checks:  # a budget alone
            return Admission(None, {}, await self.admit(budgets, nanos, model))
        try:
            decision, budget = await self.limiter.acquire_both(budgets, nanos, checks, tokens)
        except LimiterUnavailable as exc:
            raise _unavailable() from exc
        if budget is None:
            raise refusal(decision, model)
        return Admission(
            decision.reservation,
            headers_for(decision),
            Admission(budget.reservation, {}),
            decision.tokens,
        )

    async def settle_soon(self, admission: Admission | None, actual_tokens: int) -> None:
        """Charge the real usage and free the slot, without making the answer wait for a
        network round trip; never raises (the answer has gone out).

        In process it is done at once. With Redis the settlement is only queued (it never
        waits): it rides on this process's next admission, which applies it first, or a
        timer sends it shortly after (see :mod:`chatgate.ratelimit.redis`). A failure is
        logged; :meth:`close` waits for those still queued or in flight.
        """
        if admission is None or admission.reservation is None:
            return
        if not self._remote:
            try:
                await self.limiter.settle(admission.reservation, actual_tokens)
            except Exception:
                log.warning("could not settle a rate-limit reservation", exc_info=True)
            return
        try:
            future = self.limiter.settle_nowait(admission.reservation, actual_tokens)
        except Exception:
            log.warning("could not settle a rate-limit reservation", exc_info=True)
            return
        if future.done():
            self._settled(future)
            return
        self._settling.add(future)
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[bool]) -> None:
        self._settling.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.warning("could not settle a rate-limit reservation", exc_info=exc)

    async def run_renewal(self) -> None:
        """Renew the concurrency leases of requests still running, every third of the lease
        TTL, until cancelled: those admitted more than that long ago, so each is renewed at
        least a third of the TTL before it would expire (see :meth:`Limiter.renew_leases`)."""
        every = self.limiter.lease_ttl / 3
        while True:
            await asyncio.sleep(every)
            try:
                self.limiter.renew_leases(every)
            except Exception:  # the next pass tries again; the leases have a third left
                log.warning("could not renew rate-limit leases", exc_info=True)

    async def seed(
        self, engine: AsyncEngine, change: Change | None = None, *, again: bool = False
    ) -> bool:
        """Seed the limiter from the usage records, if its store has not been seeded since it
        last lost its buckets (a process's first start, a Redis restarted without persistence,
        the fallback when a Redis outage begins); whether it did.

        The limits live only in the limiter: without this, each restart gave every account its
        whole month's quota and its day's requests back. What it seeds: this month's tokens of
        the quotas, and the level of the requests-per-day buckets worked out from the last 24
        hours' hourly sums (:func:`level_from_counts`). Buckets are only ever raised to what
        the records say (see :meth:`Limiter.seed`), so seeding twice is harmless.

        With ``change`` (see :meth:`seed_changes`), only the scopes it touches, and always: a
        limit that begins to apply mid-month (a plan given a quota, an account moved to one)
        starts from the month's records, as it would in a process started after.

        ``again``: seed even when seeded (see :meth:`seed_again`).
        """
        now = time.time()
        start, _, month = month_span(now)
        if change is None and not again and await self.limiter.seeded(month):
            return False
        tokens = await quota_usage(engine, int(start), change)
        quotas = {account_scope(a): n for a, n in tokens.accounts.items()}
        quotas.update((key_scope(k), n) for k, n in tokens.keys.items())
        spent = await budget_usage(engine, int(start), change)  # nano-dollars
        quotas.update((BUDGET_PREFIX + account_scope(a), n) for a, n in spent.accounts.items())
        quotas.update((BUDGET_PREFIX + key_scope(k), n) for k, n in spent.keys.items())
        hourly = await hourly_requests(engine, int(now - DAY) // HOUR * HOUR, change)
        rates: list[tuple[Check, float]] = []
        for scope_of, per_id in ((account_scope, hourly.accounts), (key_scope, hourly.keys)):
            for ident, (limit, counts) in per_id.items():
                check = Check.rpd(scope_of(ident), limit)
                level = level_from_counts(counts, now, check.rate)
                if level > 0:
                    rates.append((check, level))
        await self.limiter.seed(Seed(month, quotas, rates, whole=change is None))
        if change is None and not (again and self._outage()):  # not each second of one
            log.info(
                "limits of %s seeded from the usage records (%d quotas, %d daily limits)",
                month,
                len(quotas),
                len(rates),
            )
        return True

    def seed_again(self) -> None:
        """Have :meth:`run_seeding` seed again at once, seeded or not: records the limiter has
        not counted reached the database (a stopped process's spool, replayed). In process,
        that process's counts died with it; a restart after a database outage seeded the
        limits before its spool was replayed, and an account went past its quota by what the
        outage had spooled (QA: 1,407 tokens of a 1,000 quota). Buckets only ever rise to the
        records, so what the limiter has counted already is not counted twice."""
        self._seed_again = True
        self._wake.set()

    async def seed_changes(self, engine: AsyncEngine, events: list[tuple[str, str]]) -> None:
        """Seed the scopes that accounts' and plans' changes touch (the invalidation feed
        awaits this on every process before it drops the cached principals, see
        :attr:`Authenticator.before_change`), so the first request under a new plan finds
        them seeded. A key's own limits are set when it is made: its changes begin none.

        Waits at most :data:`CHANGE_SEED_WAIT` seconds in all (a plan's change seeds every
        account on it): then the changes are applied and the seeds go on in the background
        (not cancelled mid-query). A seed that fails is left to :meth:`run_seeding`. Never
        raises.
        """
        changes = sorted({(kind, ref) for kind, ref in events if kind in ("account", "plan")})
        if not changes:
            return
        task = asyncio.create_task(self._seed_each(engine, changes), name="limit-change-seed")
        self._seeding.add(task)
        task.add_done_callback(self._seeding.discard)
        await asyncio.wait({task}, timeout=CHANGE_SEED_WAIT)

    async def _seed_each(self, engine: AsyncEngine, changes: list[Change]) -> None:
        for at, change in enumerate(changes):
            try:
                await self.seed(engine, change)
            except Exception:  # the database or Redis is down: run_seeding tries again
                self._changes.update(changes[at:])
                self._wake.set()
                return

    async def run_seeding(self, engine: AsyncEngine, every: float = SEED_INTERVAL) -> None:
        """:meth:`seed` every ``every`` seconds until cancelled (with Redis one ``EXISTS`` a
        pass while nothing was lost; in process a set lookup), and at once the changes whose
        seed failed in :meth:`seed_changes`."""
        failing = False
        while True:
            outage = self._outage()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(every, OUTAGE_SEED_INTERVAL) if outage else every):
                    await self._wake.wait()
            self._wake.clear()
            changes, self._changes = self._changes, set()
            again, self._seed_again = self._seed_again, False
            try:
                # In an outage, every pass: the other processes' usage reaches this one's
                # fallback only through the records (buckets only rise, see seed).
                await self.seed(engine, again=again or (outage and self._outage()))
                for change in sorted(changes):
                    await self.seed(engine, change)
                    changes.discard(change)
            except Exception:  # the database or Redis is down: the next pass tries again
                self._changes |= changes
                self._seed_again = self._seed_again or again
                if not failing:  # once an outage, not every pass of it
                    log.warning("could not seed the limits from the usage records", exc_info=True)
                failing = True
            else:
                failing = False

    def _outage(self) -> bool:
        """Whether the in-process fallback answers a Redis outage (failing open)."""
        limiter = self.limiter
        return isinstance(limiter, FailoverLimiter) and limiter.answering_from_fallback

    async def close(self) -> None:
        """Close the limiter, which sends the settlements :meth:`settle_soon` queued and waits
        for them (not a flush delay later), then see each one finished."""
        for task in self._seeding:  # a change's seed outlived its wait: the limiter closes
            task.cancel()
        await asyncio.gather(*self._seeding, return_exceptions=True)
        await self.limiter.aclose()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
