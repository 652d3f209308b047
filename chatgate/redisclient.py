"""The redis-py client chatgate uses off the request path (pub/sub wake-ups, shared throttles).

It fails fast: no retries inside redis-py (each caller decides what a failure means: publish
later, count in process), and every connect and read bounded by ``timeout``. The limiter's hot
path has its own client (:mod:`chatgate.ratelimit.resp`). redis is imported on first use: the
CLI loads the modules that call this on every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis


def fail_fast_client(url: str, timeout: float) -> Redis:
    """A client for ``url``: no retries, connects and reads bounded by ``timeout`` seconds."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
