"""Redis pub/sub wake-ups for the invalidation feed: a change reaches every server at once.

The feed (the ``invalidations`` table, see :mod:`chatgate.auth`) stays the one source of
truth: written in the same transaction as the change, ordered, lossless, and working without
Redis. Redis only shortens the wait for it. Once a change has committed, :class:`Notifier`
PUBLISHes a content-free message on ``{redis_prefix}invalidations``; every server runs a
:class:`Listener` SUBSCRIBEd to it, which on any message makes the authenticator poll the feed
now instead of at its next tick. A message is a wake-up, never the news itself, so pub/sub's
weak spots cannot corrupt a cache: a lost message leaves that change to the regular poll
(``invalidation_poll``, the backstop), a duplicate or early one costs one indexed query.

Why after the commit: a server woken before it would poll, find nothing, and sleep a whole
interval. The stores therefore write changes inside :func:`chatgate.accounts.changing`, which
commits first and publishes second; the CLI, the management API and the dashboard all go
through those stores, so all of them publish.

Redis down never breaks a request or a change. The publisher gives up within
``redis_timeout`` and logs once per outage; the listener logs once, reconnects with capped,
jittered backoff and, once subscribed again, polls at once to pick up what it was not told.
Neither is on the request path: the listener is a background task, and publishing happens
only when something changes (operator and user actions, never ``/v1`` traffic).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from chatgate.redisclient import fail_fast_client
from chatgate.settings import Settings

if TYPE_CHECKING:  # redis is imported where it is used: the CLI imports this module on every call
    from redis.asyncio.client import PubSub

__all__ = ["CHANNEL", "Listener", "Notifier", "feed_channel"]

log = logging.getLogger(__name__)

CHANNEL = "invalidations"  # under ``settings.redis_prefix``
MESSAGE = b"1"  # the content is ignored: a message only says "the feed has news"
KEEPALIVE = 30.0  # seconds of silence before the listener PINGs to prove its connection
BACKOFF_MIN = 0.25  # seconds before the first reconnection attempt, doubling per failure
BACKOFF_MAX = 5.0  # ... up to this: a restarted Redis is used again within ~5 s


def feed_channel(settings: Settings) -> str:
    """The channel name, under the Redis prefix so deployments sharing a Redis stay apart."""
    return settings.redis_prefix + CHANNEL


def _stop_requested() -> bool:
    """Whether this task has been cancelled and goes on all the same: redis-py connects and
    writes through ``asyncio.wait_for``, which on Python 3.11 swallows a cancel that comes as
    the write completes. A listener that went on would listen forever, and a stop wait for it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(exc: BaseException) -> str:
    """A log-safe description (redis-py's messages name host and port, never a password)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Notifier:
    """Tells every server that the invalidation feed has news; used after a commit."""

    def __init__(self, url: str | None, channel: str = "", *, timeout: float = 1.0) -> None:
        self._url = url  # None: no Redis, only ``here``
        self._channel = channel
        self._timeout = timeout
        self._failing = False
        # The server's own: told of each change this process committed, before any wake-up
        # (see :meth:`chatgate.auth.Authenticator.changed_here`).
        self.here: Callable[[str, str], object] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifier | None:
        """The notifier ``settings`` describe; ``None`` without Redis (the poll alone serves)."""
        if not settings.redis_url:
            return None
        return cls(settings.redis_url, feed_channel(settings), timeout=settings.redis_timeout)

    async def publish(self, changes: Sequence[tuple[str, str]] = ()) -> None:
        """Tell this process of ``changes`` (``here``), then PUBLISH one wake-up. Never raises:
        without Redis, servers see the change at their next poll, and the change itself has
        committed already.

        One short-lived connection per call: changes are rare next to requests, and a
        connection that lives only inside this call leaves nothing to close, so the CLI (one
        ``asyncio.run`` per command) and the server share this code with no lifecycle.
        """
        if self.here is not None:
            for kind, ref in changes:
                self.here(kind, ref)
        if self._url is None:
            return
        try:
            # redis-py bounds each connect and read; this bounds the whole exchange.
            async with asyncio.timeout(2 * self._timeout):
                client = fail_fast_client(self._url, self._timeout)
                try:
                    await client.publish(self._channel, MESSAGE)
                finally:
                    await client.aclose()
        except Exception as exc:  # any failure: raising would report a committed change as failed
            if not self._failing:
                self._failing = True
                log.warning(
                    "invalidation channel: cannot publish (%s); servers apply changes at their "
                    "next feed poll until Redis is back",
                    _describe(exc),
                )
            return
        if self._failing:
            self._failing = False
            log.info("invalidation channel: publishing again")


class Listener:
    """Keeps a subscription to the feed channel and calls ``wake`` for every message."""

    def __init__(
        self, url: str, channel: str, *, timeout: float, keepalive: float = KEEPALIVE
    ) -> None:
        self._url = url
        self._channel = channel
        self._timeout = timeout
        self._keepalive = keepalive
        self._down = False
        self.subscribed = False  # True while a confirmed subscription is live

    @classmethod
    def from_settings(cls, settings: Settings) -> Listener | None:
        """The listener ``settings`` describe; ``None`` without Redis."""
        if not settings.redis_url:
            return None
        return cls(settings.redis_url, feed_channel(settings), timeout=settings.redis_timeout)

    async def run(self, wake: Callable[[], None]) -> None:
        """Listen forever (cancel to stop). ``wake`` is called on every message and after
        every (re)subscription; it must be cheap and must not raise (it sets an event)."""
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._listen(wake)
            except Exception as exc:  # Redis down, restarted, unreachable: wait and retry
                if self.subscribed:
                    backoff = BACKOFF_MIN  # it worked until now: try again soon
                self.subscribed = False
                if not self._down:
                    self._down = True
                    log.warning(
                        "invalidation channel: not subscribed (%s); servers apply changes at "
                        "their next feed poll until Redis is back",
                        _describe(exc),
                    )
            if _stop_requested():
                raise asyncio.CancelledError
            # Jitter keeps a fleet of servers from reconnecting in lockstep after an outage.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _listen(self, wake: Callable[[], None]) -> None:
        """One connection's life: subscribe, catch up, then wake on each message until the
        connection fails (which raises)."""
        from redis.exceptions import TimeoutError as RedisTimeoutError

        client = fail_fast_client(self._url, self._timeout)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            # Wait for the confirmation before catching up, so that no change falls between
            # the two: one published after it reaches us, one committed before it is found by
            # the poll ``wake`` triggers below.
            confirmed = await pubsub.get_message(timeout=self._timeout)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise RedisTimeoutError("SUBSCRIBE was not confirmed")
            self.subscribed = True
            if self._down:
                self._down = False
                log.info("invalidation channel: subscribed again")
            wake()  # changes made while we were not subscribed were announced to nobody
            await self._receive(pubsub, wake)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            await client.aclose()

    async def _receive(self, pubsub: PubSub, wake: Callable[[], None]) -> None:
        """Wake on every message. A dead peer that sends no FIN would leave us deaf forever,
        so after ``keepalive`` seconds of silence a PING must be answered within the timeout."""
        from redis.exceptions import ConnectionError as RedisConnectionError

        pinged = False
        while True:
            if _stop_requested():  # a cancel lost in subscribe() or ping()
                raise asyncio.CancelledError
            message = await pubsub.get_message(timeout=self._timeout if pinged else self._keepalive)
            if message is None:
                if pinged:
                    raise RedisConnectionError("no answer to PING")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False  # anything heard proves the connection
            if message["type"] == "message":
                wake()
