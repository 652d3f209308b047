"""Sliding-window throttles for the rare, abuse-prone actions: logins, sign-ups, leak reports.

"At most ``limit`` events per ``window`` seconds for each key" (an email, a client address).
Two stores behind one interface:

- :class:`SlidingWindow`, in process: the default, and what one process needs.
- :class:`RedisWindow`, when ``CHATGATE_REDIS_URL`` is set: one sorted set per key, trimmed and
  counted by one Lua script (atomic, the Redis server's clock), so N processes on any number of
  hosts share one budget. Without it an attacker would get N times the guesses of a
  ``--workers N`` deployment. A Redis failure falls back to the process's own window (logged
  once per outage): a throttle that fails open to "per process" is still a throttle, and a
  login page must not break because Redis is down.

Keys are hashed before they reach Redis (no email or address in its key space). Not on the
``/v1`` path: these run on a failed login, a sign-up or a leak report only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatgate.redisclient import fail_fast_client
from chatgate.settings import Settings

__all__ = ["MAX_TRACKED", "RedisWindow", "SlidingWindow", "Window", "connect", "window"]

log = logging.getLogger(__name__)

MAX_TRACKED = 100_000
"""Most keys one in-process window remembers; the least recently touched are forgotten first."""

# KEYS[1] the key's sorted set; ARGV: window seconds, limit, mode, a unique member.
# mode "peek": the wait before one more event fits (0 = now); "hit": count an event;
# "take": both at once (count it only when it fits). Reply: the wait, as a string.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, limit, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if mode ~= 'hit' and redis.call('ZCARD', KEYS[1]) >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return string.format('%.6f', math.max(tonumber(first[2]) + window - now, 0))
end
if mode ~= 'peek' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(limit + 1))
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
end
return '0'
"""


class Window(Protocol):
    """At most ``limit`` events per ``window`` seconds for each key."""

    limit: int
    window: float

    async def retry_after(self, key: str) -> float:
        """Seconds until one more event for ``key`` fits; 0 when it does now."""
        ...

    async def hit(self, key: str) -> None:
        """Count one event for ``key``."""
        ...

    async def take(self, key: str) -> float:
        """Count one event if it fits and answer 0; else the wait (nothing counted)."""
        ...

    async def reset(self, key: str) -> None:
        """Forget ``key``'s events (after a successful login)."""
        ...


class SlidingWindow:
    """The in-process window: each key's recent event times, bounded in memory."""

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

    def wait(self, key: str) -> float:
        events = self._recent(key)
        if events is None or len(events) < self.limit:
            return 0.0
        return max(events[0] + self.window - self._clock(), 0.0)

    def count(self, key: str) -> None:
        events = self._recent(key)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        self._events.move_to_end(key)
        events.append(self._clock())
        while len(self._events) > MAX_TRACKED:
            self._events.popitem(last=False)

    async def retry_after(self, key: str) -> float:
        return self.wait(key)

    async def hit(self, key: str) -> None:
        self.count(key)

    async def take(self, key: str) -> float:
        wait = self.wait(key)
        if wait == 0:
            self.count(key)
        return wait

    async def reset(self, key: str) -> None:
        self._events.pop(key, None)


class RedisWindow:
    """The shared window (see the module docstring); ``local`` answers while Redis cannot."""

    def __init__(self, client: Redis, name: str, limit: int, window: float, *, prefix: str) -> None:
        self.limit = limit
        self.window = window
        self._client = client
        self._prefix = f"{prefix}throttle:{name}:"
        self._script: Any = client.register_script(_SCRIPT)
        self.local = SlidingWindow(limit, window)
        self._failing = False

    def _key(self, key: str) -> str:
        # surrogatepass: an address from X-Forwarded-For may hold bytes that are not UTF-8
        # (aiohttp reads them as lone surrogates); they are a key like any other.
        return self._prefix + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    async def _run(self, key: str, mode: str) -> float | None:
        """The script's answer, or None when Redis failed (the caller then asks ``local``)."""
        try:
            reply = await self._script(
                keys=[self._key(key)],
                args=[self.window, self.limit, mode, secrets.token_hex(8)],
            )
        except (RedisError, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.warning("throttle: Redis unavailable, counting in process: %s", type(exc))
            return None
        if self._failing:
            self._failing = False
            log.warning("throttle: Redis is back, counting there again")
        return float(reply)

    async def retry_after(self, key: str) -> float:
        wait = await self._run(key, "peek")
        return self.local.wait(key) if wait is None else wait

    async def hit(self, key: str) -> None:
        if await self._run(key, "hit") is None:
            self.local.count(key)

    async def take(self, key: str) -> float:
        wait = await self._run(key, "take")
        return await self.local.take(key) if wait is None else wait

    async def reset(self, key: str) -> None:
        await self.local.reset(key)
        with contextlib.suppress(RedisError, OSError):  # else they expire with their window
            await self._client.delete(self._key(key))


def connect(settings: Settings) -> Redis | None:
    """A Redis client for the throttles (fails fast, no retries), or None without Redis."""
    if not settings.redis_url:
        return None
    return fail_fast_client(settings.redis_url, settings.redis_timeout)


def window(
    client: Redis | None, settings: Settings, name: str, limit: int, seconds: float
) -> Window:
    """A window named ``name``: shared through ``client`` (Redis) if given, else in process."""
    if client is None:
        return SlidingWindow(limit, seconds)
    return RedisWindow(client, name, limit, seconds, prefix=settings.redis_prefix)
