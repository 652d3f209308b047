"""A circuit breaker per deployment, so a dead upstream stops costing every request.

    closed ──(N consecutive failures)──> open ──(cool-down elapsed)──> half_open
      ^                                   ^                               │
      └──────────(probe succeeds)─────────┼───────────────────────────────┤
                                          └────────(probe fails)──────────┘

* **closed**: every request may use the deployment; a success resets the failure count.
* **open**: no request uses it until ``cooldown`` seconds have passed since it opened.
* **half_open**: exactly one request (the probe) is let through; the others skip the
  deployment as if it were open. The probe's success closes the breaker, its failure opens it
  again for another cool-down. A probe that ends with neither (the client went away) frees the
  slot so the next request probes.

The clock is injectable (``clock=``), so tests drive the states without sleeping. Everything
runs on the event loop thread: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOLDOWN = 30.0


class BreakerState(StrEnum):
    """The three states; the value is what ``/api/admin/backends`` and metrics show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """A number for metrics: 0 closed, 1 half open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state at one moment, for status pages and metrics."""

    state: BreakerState
    consecutive_failures: int
    total_failures: int
    opened_ago: float | None  # seconds since it last opened, while not closed
    retry_in: float | None  # seconds until a probe may go, while open


class CircuitBreaker:
    """Counts consecutive failures of one deployment and decides whether it may be used."""

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown < 0:
            raise ValueError("cooldown cannot be negative")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._total_failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state (``open`` turns into ``half_open`` only when a probe is taken)."""
        return self._state

    def available(self) -> bool:
        """Would :meth:`allow` say yes now? (Asks without claiming the half-open probe.)"""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            return self._clock() - self._opened_at >= self.cooldown
        return not self._probing

    def allow(self) -> bool:
        """May a request use the deployment now? In half-open, True claims the one probe.

        A caller that got True must end with :meth:`record_success`, :meth:`record_failure`
        or :meth:`record_abandoned`.
        """
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            if self._clock() - self._opened_at < self.cooldown:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        """The deployment answered: close the breaker and forget past failures."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        """The deployment failed (connect error, 5xx, 408, timeout, broken stream)."""
        self._failures += 1
        self._total_failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._open()

    def record_abandoned(self) -> None:
        """The request ended with no verdict (cancelled): free the probe, change nothing else."""
        self._probing = False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False

    def snapshot(self) -> BreakerSnapshot:
        """The state, counters and time to the next probe."""
        retry_in = opened_ago = None
        state = self._state
        if self._opened_at is not None:
            opened_ago = self._clock() - self._opened_at
        if state is BreakerState.OPEN and opened_ago is not None:
            retry_in = max(0.0, self.cooldown - opened_ago)
            if retry_in == 0.0:
                state = BreakerState.HALF_OPEN  # the next request probes
        return BreakerSnapshot(
            state=state,
            consecutive_failures=self._failures,
            total_failures=self._total_failures,
            opened_ago=opened_ago,
            retry_in=retry_in,
        )


__all__ = [
    "DEFAULT_COOLDOWN",
    "DEFAULT_FAILURE_THRESHOLD",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
]
