"""Rate limits and quotas: rpm/tpm/rpd (GCRA), concurrency leases, monthly token quotas.

Before the upstream call::

    decision = await limiter.acquire(checks, cost_tokens=prompt_tokens + max_tokens)
    if not decision.allowed: answer 429 from decision.failed / retry_after / headers

After it (in a ``finally``, also when the stream is cut or the upstream fails)::

    await limiter.settle(decision.reservation, actual_tokens)

:func:`open_limiter` picks the implementation from a URL: none or ``memory://`` gives
:class:`MemoryLimiter`; ``redis://`` gives :class:`RedisLimiter` behind a
:class:`FailoverLimiter` with a :class:`MemoryLimiter` fallback.
"""

from __future__ import annotations

from .base import (
    DEFAULT_LEASE_TTL,
    Check,
    Decision,
    FailoverLimiter,
    Kind,
    Limiter,
    LimiterUnavailable,
    RateStatus,
    Reservation,
    Seed,
    level_from_counts,
    month_end,
    month_of,
)
from .memory import MemoryLimiter
from .redis import DEFAULT_PREFIX, RedisLimiter

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_PREFIX",
    "Check",
    "Decision",
    "FailoverLimiter",
    "Kind",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RateStatus",
    "RedisLimiter",
    "Reservation",
    "Seed",
    "level_from_counts",
    "month_end",
    "month_of",
    "open_limiter",
]


def open_limiter(
    url: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    fail_open: bool = True,
    timeout: float = 0.25,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> Limiter:
    """The limiter for ``url``: in-process for none/``memory://``, else Redis with failover."""
    if not url or url.startswith("memory://"):
        return MemoryLimiter(lease_ttl=lease_ttl)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"unsupported limiter URL scheme: {url.split(':', 1)[0]!r}")
    primary = RedisLimiter.from_url(
        url, prefix=prefix, connect_timeout=timeout, timeout=timeout, lease_ttl=lease_ttl
    )
    return FailoverLimiter(primary, MemoryLimiter(lease_ttl=lease_ttl), fail_open=fail_open)
