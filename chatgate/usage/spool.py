"""The usage spool: records that could not reach the database, on local disk until they can.

Each process appends to a file of its own (JSON lines, fsync'd) and holds an exclusive
``flock`` on it while alive. A file whose lock can be taken belongs to a dead process: any
recorder claims it, replays it in committed chunks and deletes it. Methods touch the disk
synchronously; the recorder runs them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from chatgate.usage.record import UsageRecord

log = logging.getLogger(__name__)

SPOOL_GLOB = "usage-*.spool"
ORPHAN_SCAN_INTERVAL = 60.0


class Spool:
    """This process's append-only spool file, plus the orphans of dead processes.

    Files are replayed in chunks from a byte offset that moves forward only after the chunk
    is committed, so a long spool is drained over several flushes (never read whole into
    memory) and a failure part-way resumes where it stopped. Methods that touch the disk are
    synchronous; the recorder runs them in a thread.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / f"usage-{os.getpid()}-{secrets.token_hex(4)}.spool"
        self._fd: int | None = None
        self.pending = 0  # records in our file not replayed yet
        self.offset = 0  # where our file's replay resumes
        self.orphans: dict[Path, int] = {}  # orphan file -> replay offset
        self.orphan_lines: dict[Path, int] = {}  # orphan file -> records not replayed yet
        self._next_scan = 0.0  # the first flush always looks for orphans

    @property
    def orphan_pending(self) -> int:
        return sum(self.orphan_lines.values())

    def has_work(self) -> bool:
        return self.pending > 0 or bool(self.orphans) or time.monotonic() >= self._next_scan

    def append(self, records: Sequence[UsageRecord]) -> None:
        """Append ``records`` as JSON lines and fsync; on failure the file is left as before."""
        data = b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records)
        fd = self._open()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # drop the torn tail so later lines stay whole
                os.ftruncate(fd, size)
            raise
        self.pending += len(records)

    def _open(self) -> int:
        if self._fd is None:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive": nobody else replays it
            _fsync_dir(self.dir)  # so the new file's name survives a crash too
            self._fd = fd
        return self._fd

    def read_own(self, limit: int) -> Chunk:
        try:
            return read_chunk(self.path, self.offset, limit)
        except FileNotFoundError:  # removed by hand: nothing to replay, and not a DB failure
            return Chunk([], self.offset, True)

    def discard_own(self) -> None:
        """Delete our file (every record in it is in the database); the next append starts anew."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self.pending = 0
        self.offset = 0

    def release(self) -> None:
        """Close our file, keeping it (its lock goes with it: another recorder may replay it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def orphans_due(self) -> list[Path]:
        """Orphans being replayed, plus, once per :data:`ORPHAN_SCAN_INTERVAL`, new ones."""
        if time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + ORPHAN_SCAN_INTERVAL
            if self.dir.is_dir():
                for path in self.dir.glob(SPOOL_GLOB):
                    if path != self.path and path not in self.orphans:
                        self.orphans[path] = 0
        return sorted(self.orphans)

    def claim(self, path: Path) -> Claimed | None:
        """Lock ``path`` if its owner is gone; ``None`` if it is alive (or the file went)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            self.forget(path)  # replayed by another recorder meanwhile
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                self.forget(path)  # alive: its owner replays it; a later scan looks again
                return None
            raise
        if path not in self.orphan_lines:  # counted once, for the spool-size gauge
            self.orphan_lines[path] = path.read_bytes().count(b"\n")
        return Claimed(path, fd)

    def forget(self, path: Path) -> None:
        self.orphans.pop(path, None)
        self.orphan_lines.pop(path, None)


@dataclass(frozen=True, slots=True)
class Chunk:
    records: list[UsageRecord]
    end: int  # the byte offset after the last line read
    eof: bool


class Claimed:
    """An orphan spool file locked by this process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_chunk(path: Path, offset: int, limit: int) -> Chunk:
    """Up to ``limit`` records from ``offset``. A torn last line (a crash mid-append) or an
    unreadable one is skipped with a warning."""
    records: list[UsageRecord] = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        while len(records) < limit:
            line = fh.readline()
            if not line:
                return Chunk(records, fh.tell(), True)
            if not line.endswith(b"\n"):
                log.warning("usage spool %s: torn last line skipped", path.name)
                return Chunk(records, fh.tell(), True)
            if not line.strip():
                continue
            try:
                records.append(UsageRecord.from_dict(orjson.loads(line)))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("usage spool %s: unreadable line skipped: %s", path.name, exc)
        end = fh.tell()
        return Chunk(records, end, not fh.read(1))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["ORPHAN_SCAN_INTERVAL", "SPOOL_GLOB", "Chunk", "Claimed", "Spool", "read_chunk"]
