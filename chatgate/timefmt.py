"""Durations as people write them (``30d``, ``24h``, ``90s``) and as OpenAI's headers show them."""

from __future__ import annotations

import re
import time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
MAX_DURATION = 36500 * 86400
"""100 years, the longest duration taken (an expiry, a report's span): more is a mistake, and
added to a time it overflowed the databases' 64-bit integers."""


def parse_duration(text: str) -> int:
    """Seconds in ``text`` (``"30d"``, ``"24h"``, ``"0"``); ``ValueError`` when unreadable or
    longer than :data:`MAX_DURATION`."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 30d)")
    digits = match.group(1)
    seconds = int(digits) * _UNITS[match.group(2) or "s"] if len(digits) <= 12 else None
    if seconds is None or seconds > MAX_DURATION:
        raise ValueError(f"a duration is at most 100 years (36500d): {text[:40]!r}")
    return seconds


_MS_TEXT = tuple(f"{ms}ms" for ms in range(1000))
"""``0ms`` to ``999ms``: most resets are under a second, and two are sent on each answer."""


def reset_text(seconds: float) -> str:
    """OpenAI's reset header text: ``1s``, ``6m0s``, ``1h2m3s``, ``120ms``."""
    if seconds < 1:
        return _MS_TEXT[int(seconds * 1000)] if seconds > 0 else "0ms"
    whole = int(seconds + 0.999)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def now() -> int:
    """Current UTC unix time in whole seconds."""
    return int(time.time())


def until_now() -> int:
    """The (exclusive) end of a report that ends now: this second's records are in it.

    ``now()`` itself would leave them out whenever it falls on a whole minute (rollups are
    read by whole minutes: those of the minute starting at the end are not in the report).
    """
    return now() + 1


def iso(ts: int | None) -> str:
    """``2026-11-25 09:00Z`` for tables; ``-`` for none."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%MZ", time.gmtime(ts))
