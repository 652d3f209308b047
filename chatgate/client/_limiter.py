"""Client-side rate limiting: wait locally instead of collecting 429s.

A :class:`RateLimiter` holds two budgets, requests and tokens, each a token bucket whose
spent units come back one window after they were spent (a rolling window). That is
stricter than the server's leaky bucket on purpose: it never lets more than ``limit`` units
go out in *any* window, so it stays under a server that counts by leaky bucket (GCRA),
by fixed window or by sliding window alike. A unit comes back a little later than one window
(``slack``, 1% of it by default): requests do not take equally long to reach the server,
and without that margin the server could see the last one of a window and the first of the
next a few milliseconds less than a window apart.

Each budget is:

- **configured** by the caller (``rpm=``, ``tpm=``), or learned from the server's
  ``x-ratelimit-limit-requests|tokens`` headers (the lower of the two wins);
- **kept in step** with the server: ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*``
  (``"1s"``, ``"6m0s"``, ``"120ms"``) set a floor: no more than ``remaining`` units after the
  request that carried them, until ``reset`` has passed. That covers other processes using
  the same key. A 429's ``retry-after`` pauses the whole limiter. Waits the server asks for
  beyond ``max_wait`` are not waited for locally: the request goes, and the server answers.

Booking is first come, first served and never holds the lock while waiting:
:meth:`RateLimiter.reserve` books the earliest slot and returns a :class:`Permit` with the
delay; :meth:`~RateLimiter.acquire` (threads) and :meth:`~RateLimiter.aacquire` (asyncio
tasks) sleep it off. One limiter can be shared by every thread and task of a program.

A slot is booked on an estimate (a request that sets no ``max_tokens`` may use 4,096 tokens);
when a request settles for less, or a booked one is given back, the requests still waiting in
:meth:`~RateLimiter.acquire` or :meth:`~RateLimiter.aacquire` are booked again in the same
order, and wake at their new, earlier slots. A slot taken with :meth:`~RateLimiter.reserve`
alone stays where it was (its caller does the waiting), and the ones booked after it too.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_MAX_WAIT",
    "DEFAULT_SLACK",
    "DEFAULT_WINDOW",
    "BudgetState",
    "LimiterState",
    "Permit",
    "RateLimiter",
    "parse_reset",
]

DEFAULT_WINDOW = 60.0
"""Seconds in a rate window (OpenAI's limits are per minute)."""
DEFAULT_SLACK = 0.01
"""Spent units come back ``window * (1 + slack)`` after they went out (network jitter)."""
DEFAULT_MAX_WAIT = 60.0
"""Longest server-directed pause (reset or retry-after) the limiter waits out by itself."""

Clock = Callable[[], float]
Kind = Literal["requests", "tokens"]

_RESET = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?!s))?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?(?:(?P<ms>\d+(?:\.\d+)?)ms)?$"
)


def parse_reset(text: str | None) -> float | None:
    """Seconds in a reset header: ``"1s"``, ``"6m0s"``, ``"1h2m3s"``, ``"120ms"``, ``"0.5"``.

    ``None`` when absent or unreadable.
    """
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    match = _RESET.match(text)
    if match is None:
        return None
    parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    return (
        parts.get("h", 0.0) * 3600
        + parts.get("m", 0.0) * 60
        + parts.get("s", 0.0)
        + parts.get("ms", 0.0) / 1000
    )


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    text = headers.get(name)
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget as the limiter sees it now; ``None`` limit means not limited (yet)."""

    limit: int | None
    remaining: int | None
    reset_after: float  # seconds until every spent unit is back


@dataclass(frozen=True, slots=True)
class LimiterState:
    """A snapshot of both budgets and of a server-directed pause."""

    requests: BudgetState
    tokens: BudgetState
    paused_for: float  # seconds left of a 429's retry-after


class _Spend:
    """Units taken at ``at`` (clock time); they come back one window (and slack) later."""

    __slots__ = ("at", "cost", "seq")

    def __init__(self, seq: int, at: float, cost: int) -> None:
        self.seq = seq
        self.at = at
        self.cost = cost


class Permit:
    """One booked slot: send at ``at`` (``delay`` seconds after booking).

    Hand it back to :meth:`RateLimiter.settle` with the real token usage, to
    :meth:`RateLimiter.cancel` when the request was never sent, and to
    :meth:`RateLimiter.observe` with the answer's headers.
    """

    __slots__ = ("_request", "_token", "_wake", "at", "delay", "seq")

    def __init__(
        self, seq: int, at: float, delay: float, request: _Spend | None, token: _Spend | None
    ) -> None:
        self.seq = seq
        self.at = at  # booked again while it waits in acquire() or aacquire()
        self.delay = delay
        self._request = request
        self._token = token
        # Set while its request waits in acquire() or aacquire(): wakes the waiter after the
        # slot has moved. Called with the limiter's lock held.
        self._wake: Callable[[], object] | None = None

    @property
    def tokens(self) -> int:
        """Tokens currently charged for this request."""
        return self._token.cost if self._token is not None else 0

    def __repr__(self) -> str:
        return f"Permit(seq={self.seq}, delay={self.delay:.3f}, tokens={self.tokens})"


class _Budget:
    """One rolling-window budget. Not thread-safe: :class:`RateLimiter` holds the lock."""

    def __init__(self, limit: int | None, window: float, span: float) -> None:
        if limit is not None and limit < 1:
            raise ValueError("a limit must be a whole number >= 1, or None")
        self.configured = limit
        self.limit = limit
        self.window = window
        self.span = span  # the window plus its slack: how long a spent unit stays spent
        self.spends: deque[_Spend] = deque()  # in booking order, so sorted by ``at``
        # The server's floor: at most ``floor_remaining`` units after spend ``floor_seq``
        # until ``floor_until``.
        self.floor_seq = -1
        self.floor_remaining = 0
        self.floor_until = -math.inf

    def prune(self, now: float) -> None:
        """Forget spends that are back (their window has passed)."""
        edge = now - self.span
        while self.spends and self.spends[0].at <= edge:
            self.spends.popleft()

    def earliest(self, t0: float, cost: int) -> float:
        """The first time ``>= t0`` at which ``cost`` more units fit."""
        t = t0
        if self.limit is not None:
            cost = min(cost, self.limit)
            edge = t0 - self.span
            in_window = [s for s in self.spends if s.at > edge]
            excess = sum(s.cost for s in in_window) + cost - self.limit
            for spend in in_window:  # oldest first: wait until enough of them are back
                if excess <= 0:
                    break
                excess -= spend.cost
                t = max(t, spend.at + self.span)
        if t < self.floor_until:
            after = 0
            for spend in reversed(self.spends):
                if spend.seq <= self.floor_seq:
                    break
                after += spend.cost
            if after + cost > self.floor_remaining:
                t = self.floor_until
        return t

    def take(self, seq: int, at: float, cost: int) -> _Spend:
        spend = _Spend(seq, at, cost)
        self.spends.append(spend)
        return spend

    def learn(self, server_limit: int) -> None:
        """Adopt the server's limit when none was configured or it is lower."""
        if server_limit < 1:
            return
        if self.configured is None or server_limit < self.configured:
            self.limit = server_limit
        else:
            self.limit = self.configured

    def set_floor(self, seq: int, remaining: int, until: float, now: float) -> None:
        """Record the server's view, unless a newer one is in force."""
        if seq < self.floor_seq and now < self.floor_until:
            return
        self.floor_seq = seq
        self.floor_remaining = remaining
        self.floor_until = until

    def state(self, now: float) -> BudgetState:
        used = sum(s.cost for s in self.spends if now - self.span < s.at <= now)
        last = max((s.at for s in self.spends), default=-math.inf)
        reset = max(last + self.span - now, 0.0) if self.spends else 0.0
        remaining = None if self.limit is None else max(self.limit - used, 0)
        return BudgetState(self.limit, remaining, reset)


class RateLimiter:
    """Requests-per-window and tokens-per-window budgets shared by threads and tasks.

    ``rpm``/``tpm`` are the caller's limits (``None``: learn them from the server's
    headers when ``follow_server``). ``window`` is their period in seconds (60 for per-minute
    limits), ``slack`` the fraction of it added before a spent unit comes back. Server-directed
    pauses longer than ``max_wait`` seconds are left to the server to enforce. ``clock`` must
    be monotonic; tests pass a fake one.
    """

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        window: float = DEFAULT_WINDOW,
        slack: float = DEFAULT_SLACK,
        follow_server: bool = True,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Clock = time.monotonic,
    ) -> None:
        if not window > 0:
            raise ValueError("window must be > 0 seconds")
        if not slack >= 0:
            raise ValueError("slack must be >= 0")
        span = window * (1 + slack)
        self._requests = _Budget(rpm, window, span)
        self._tokens = _Budget(tpm, window, span)
        self.follow_server = follow_server
        self.max_wait = max_wait
        self._clock = clock
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)  # threads waiting for their slot
        self._waiting: dict[int, Permit] = {}  # by seq: the requests acquire()/aacquire() hold
        self._seq = 0
        self._last_at = -math.inf
        self._paused_until = -math.inf

    @property
    def counts_tokens(self) -> bool:
        """True when a token budget is in force (callers then estimate request costs)."""
        return self._tokens.limit is not None

    def reserve(self, tokens: int = 0) -> Permit:
        """Book the earliest slot for one request of ``tokens`` tokens; never blocks.

        The caller must wait ``permit.delay`` seconds before sending.
        """
        return self._book(tokens, None)

    def _book(self, tokens: int, wake: Callable[[], object] | None) -> Permit:
        """Book a slot; with ``wake`` (a waiter's), the slot may move while it waits."""
        tokens = max(int(tokens), 0)
        with self._lock:
            if self._tokens.limit is not None:
                # A request bigger than the whole budget books all of it (and waits for all of
                # it to be free); the server decides whether it is too large.
                tokens = min(tokens, self._tokens.limit)
            now = self._clock()
            self._requests.prune(now)
            self._tokens.prune(now)
            t = self._slot(now, tokens)
            self._seq += 1
            # A token spend is booked even at 0 so that settle() can charge real usage
            # once a token limit is known (configured or learned from the headers).
            request = self._requests.take(self._seq, t, 1)
            token = self._tokens.take(self._seq, t, tokens)
            permit = Permit(self._seq, t, max(t - now, 0.0), request, token)
            if permit.delay > 0 and wake is not None:
                permit._wake = wake
                self._waiting[permit.seq] = permit
            return permit

    def _slot(self, now: float, tokens: int) -> float:
        """The earliest time both budgets have room for one more request (lock held).

        It becomes the latest booked slot: requests go out in the order they were booked.
        """
        t = max(now, self._last_at, self._paused_until)
        # Each budget may push the slot later; repeat until both agree (at most a few
        # rounds: every round moves ``t`` to a time at which some spend is back).
        for _ in range(64):
            later = max(self._requests.earliest(t, 1), self._tokens.earliest(t, tokens))
            if later <= t:
                break
            t = later
        self._last_at = t
        return t

    def _rebook(self) -> None:
        """Book the waiting requests again, in order, after units came back early (lock held).

        Only the latest bookings can move, those held by a waiter or given back: a slot taken
        with reserve() alone stays, and so do the ones before it.
        """
        requests, tokens = self._requests.spends, self._tokens.spends
        moving: list[Permit] = []
        while requests and (requests[-1].seq in self._waiting or requests[-1].cost == 0):
            seq = requests.pop().seq
            tokens.pop()
            if seq in self._waiting:
                moving.append(self._waiting[seq])
        self._last_at = max((s.at for s in requests if s.cost > 0), default=-math.inf)
        now = self._clock()
        for permit in reversed(moving):
            request, token = permit._request, permit._token
            assert request is not None and token is not None
            permit.at = request.at = token.at = self._slot(now, token.cost)
            requests.append(request)
            tokens.append(token)
        for permit in moving:
            if permit._wake is not None:
                try:
                    permit._wake()
                except RuntimeError:  # its event loop was closed while it waited: nobody
                    self._waiting.pop(permit.seq, None)  # to wake, and no reason to fail here

    def _done_waiting(self, permit: Permit) -> None:
        with self._lock:
            self._waiting.pop(permit.seq, None)

    def acquire(self, tokens: int = 0) -> Permit:
        """Book a slot and sleep until it (for threads); interrupted means given back."""
        permit = self._book(tokens, self._moved.notify_all)  # called with the lock held
        if permit.delay > 0:
            try:
                with self._lock:
                    while (left := permit.at - self._clock()) > 0:
                        self._moved.wait(left)
            except BaseException:  # KeyboardInterrupt, or a signal handler's exception
                self.cancel(permit)
                raise
            finally:
                self._done_waiting(permit)
        return permit

    async def aacquire(self, tokens: int = 0) -> Permit:
        """Book a slot and sleep until it (for asyncio tasks); cancelled means given back."""
        loop = asyncio.get_running_loop()
        moved = asyncio.Event()
        permit = self._book(tokens, lambda: loop.call_soon_threadsafe(moved.set))
        if permit.delay > 0:
            try:
                while True:
                    moved.clear()  # before reading the slot: a move after the read wakes us
                    left = permit.at - self._clock()
                    if left <= 0:
                        break
                    try:
                        async with asyncio.timeout(left):
                            await moved.wait()
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                self.cancel(permit)
                raise
            finally:
                self._done_waiting(permit)
        return permit

    def cancel(self, permit: Permit) -> None:
        """Give back a slot whose request was never sent."""
        with self._lock:
            self._waiting.pop(permit.seq, None)
            for spend in (permit._request, permit._token):
                if spend is not None:
                    spend.cost = 0
            # The next request queues behind the ones still booked, not behind this one (a big
            # request's slot may be a minute away); the ones waiting behind it move up.
            self._rebook()

    def settle(self, permit: Permit, tokens: int) -> None:
        """Charge the request's real token usage instead of the estimate it booked."""
        with self._lock:
            token = permit._token
            if token is not None:
                tokens = max(int(tokens), 0)
                less = tokens < token.cost
                token.cost = tokens
                if less and self._waiting:
                    self._rebook()

    def observe(
        self,
        headers: Mapping[str, str],
        *,
        permit: Permit | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Bring the budgets in step with a server answer.

        ``headers`` are the answer's (``x-ratelimit-*``); ``permit`` is the slot its request
        was sent with (the server's counts include it and what was sent before it);
        ``retry_after`` is a rate-limit 429's pause, in seconds.
        """
        with self._lock:
            now = self._clock()
            seq = permit.seq if permit is not None else self._seq
            for budget, kind in ((self._requests, "requests"), (self._tokens, "tokens")):
                limit = _header_int(headers, f"x-ratelimit-limit-{kind}")
                remaining = _header_int(headers, f"x-ratelimit-remaining-{kind}")
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                # A bucket that takes longer than a window to refill is not a per-window
                # limit (a daily one, say): it sets a floor at most, not the window's limit.
                per_window = reset is None or reset <= budget.span
                if self.follow_server and limit is not None and per_window:
                    budget.learn(limit)
                if remaining is not None and reset is not None and reset <= self.max_wait:
                    budget.set_floor(seq, remaining, now + reset, now)
            if retry_after is not None and 0 < retry_after <= self.max_wait:
                self._paused_until = max(self._paused_until, now + retry_after)

    def state(self) -> LimiterState:
        """What each budget has left now, as this client sees it."""
        with self._lock:
            now = self._clock()
            return LimiterState(
                self._requests.state(now),
                self._tokens.state(now),
                max(self._paused_until - now, 0.0),
            )

    def __repr__(self) -> str:
        return (
            f"RateLimiter(rpm={self._requests.limit}, tpm={self._tokens.limit}, "
            f"window={self._requests.window:g})"
        )
