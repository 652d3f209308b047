"""Login and sign-up throttling: failures counted in a sliding window, per account and per IP.

In process, like the auth cache: with several server processes each keeps its own count, so
an attacker gets at most N times the budget; still a few guesses per minute, not thousands.
Unknown emails are counted like real ones, so throttling reveals nothing about who exists.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

ACCOUNT_FAILURES = 5
"""Failed logins for one email within ``WINDOW`` before that email is held back."""
IP_FAILURES = 20
"""Failed logins from one address within ``WINDOW`` before that address is held back."""
WINDOW = 15 * 60.0
SIGNUPS_PER_IP = 10
"""Sign-ups from one address per ``SIGNUP_WINDOW``."""
SIGNUP_WINDOW = 3600.0
MAX_TRACKED = 100_000
"""Most keys one window remembers; the least recently touched are forgotten first."""


class SlidingWindow:
    """At most ``limit`` events per ``window`` seconds for each key."""

    def __init__(
        self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        horizon = self._clock() - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        events = self._recent(key)
        if events is None or len(events) < self.limit:
            return 0.0
        return max(events[0] + self.window - self._clock(), 0.0)

    def hit(self, key: str) -> None:
        """Count one event for ``key``."""
        events = self._recent(key)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        self._events.move_to_end(key)
        events.append(self._clock())
        while len(self._events) > MAX_TRACKED:
            self._events.popitem(last=False)

    def reset(self, key: str) -> None:
        """Forget ``key`` (after a successful login)."""
        self._events.pop(key, None)


@dataclass(slots=True)
class LoginThrottle:
    """The dashboard's throttles, one object per process."""

    accounts: SlidingWindow
    addresses: SlidingWindow
    signups: SlidingWindow

    @classmethod
    def default(cls, clock: Callable[[], float] = time.monotonic) -> LoginThrottle:
        return cls(
            SlidingWindow(ACCOUNT_FAILURES, WINDOW, clock=clock),
            SlidingWindow(IP_FAILURES, WINDOW, clock=clock),
            SlidingWindow(SIGNUPS_PER_IP, SIGNUP_WINDOW, clock=clock),
        )

    def login_wait(self, email: str, address: str) -> float:
        """Seconds before a login for ``email`` from ``address`` is even checked; 0 = now."""
        return max(self.accounts.retry_after(email), self.addresses.retry_after(address))

    def login_failed(self, email: str, address: str) -> None:
        self.accounts.hit(email)
        self.addresses.hit(address)

    def login_succeeded(self, email: str) -> None:
        self.accounts.reset(email)
