"""Prefixed random identifiers (``acct_…``, ``key_…``, ``req_…``), as OpenAI names its objects.

Request ids begin with the time (:func:`ordered_id`): each is the primary key of a usage record,
and keys that arrive in order are added at the right edge of the table's index instead of at
random places all over it (pages read, dirtied and logged whole after each checkpoint): the
database's CPU a recorded request fell from 10.5-10.8 to 8.3 us (``bench/ab.py --db``, same
run), and ``bench/usage_batch.py`` shows the batch alone.

The randomness is the operating system's (``os.urandom``, as :mod:`secrets` uses), read a block
at a time: every API request takes an id, and one system call per id showed in the profile of
the request path (1.6% of its samples). A forked child (``serve --workers N``) starts with an
empty block, so no two processes hand out the same bytes.
"""

from __future__ import annotations

import os
import threading
import time

_BLOCK = 4096  # bytes read at once: one system call per ~340 ids of 12 bytes
_lock = threading.Lock()
_buffer = b""
_used = 0


def random_hex(nbytes: int = 12) -> str:
    """``nbytes`` random bytes (from ``os.urandom``), as hex."""
    global _buffer, _used
    with _lock:
        start = _used
        if start + nbytes > len(_buffer):
            _buffer, start = os.urandom(max(_BLOCK, nbytes)), 0
        _used = start + nbytes
        return _buffer[start : start + nbytes].hex()


def _forget() -> None:
    global _buffer, _used, _lock
    _lock = threading.Lock()
    _buffer, _used = b"", 0


os.register_at_fork(after_in_child=_forget)


def new_id(prefix: str) -> str:
    """``prefix_`` + 24 hex characters."""
    return f"{prefix}_{random_hex(12)}"


def ordered_id(prefix: str) -> str:
    """``prefix_`` + the time in milliseconds (12 hex characters: until the year 10889) + 16
    random hex characters: ids of one millisecond differ by 64 random bits, and ids sort by
    the time they were made (to the clocks of the processes making them)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{random_hex(8)}"
