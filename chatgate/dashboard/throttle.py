"""Login and sign-up throttling: failures counted in a sliding window, per account and per IP.

The windows are :mod:`chatgate.throttle`'s: in process by default, shared through Redis when
``CHATGATE_REDIS_URL`` is set, so that N server processes hold an attacker to one budget, not
N. Unknown emails are counted like real ones, so throttling reveals nothing about who exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from chatgate.settings import Settings
from chatgate.throttle import SlidingWindow, Window, window

__all__ = ["ACCOUNT_FAILURES", "IP_FAILURES", "SIGNUPS_PER_IP", "LoginThrottle", "SlidingWindow"]

ACCOUNT_FAILURES = 5
"""Failed logins for one email within ``WINDOW`` before that email is held back."""
IP_FAILURES = 20
"""Failed logins from one address within ``WINDOW`` before that address is held back."""
WINDOW = 15 * 60.0
SIGNUPS_PER_IP = 10
"""Sign-ups from one address per ``SIGNUP_WINDOW``."""
SIGNUP_WINDOW = 3600.0


@dataclass(slots=True)
class LoginThrottle:
    """The dashboard's throttles."""

    accounts: Window
    addresses: Window
    signups: Window

    @classmethod
    def default(cls, clock: Callable[[], float] = time.monotonic) -> LoginThrottle:
        """In process (one server process, and the tests' clock)."""
        return cls(
            SlidingWindow(ACCOUNT_FAILURES, WINDOW, clock=clock),
            SlidingWindow(IP_FAILURES, WINDOW, clock=clock),
            SlidingWindow(SIGNUPS_PER_IP, SIGNUP_WINDOW, clock=clock),
        )

    @classmethod
    def from_settings(cls, settings: Settings, client: Redis | None) -> LoginThrottle:
        """Shared through Redis when ``client`` is given (see :func:`chatgate.throttle.connect`)."""
        return cls(
            window(client, settings, "login-account", ACCOUNT_FAILURES, WINDOW),
            window(client, settings, "login-address", IP_FAILURES, WINDOW),
            window(client, settings, "signup-address", SIGNUPS_PER_IP, SIGNUP_WINDOW),
        )

    async def login_wait(self, email: str, address: str) -> float:
        """Seconds before a login for ``email`` from ``address`` is even checked; 0 = now."""
        return max(
            await self.accounts.retry_after(email), await self.addresses.retry_after(address)
        )

    async def login_failed(self, email: str, address: str) -> None:
        await self.accounts.hit(email)
        await self.addresses.hit(address)

    async def login_succeeded(self, email: str) -> None:
        await self.accounts.reset(email)
