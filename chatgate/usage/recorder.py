"""The usage recorder: an in-memory queue, flushed in batches, with a local spool for outages.

Flow::

    request path ──record()──▶ deque ──every flush_interval, or batch_size reached──▶ flusher
                                                          │
        ┌────────────── database up ──────────────────────┴──── database down ─────────────┐
        ▼                                                                                   ▼
    one transaction per batch:                                         spool file (JSON lines,
      INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING request_id    fsync'd, append-only)
      upsert the rollups of the rows actually inserted                        │
        ▲                                                                     │
        └──────────────── replayed first on the next flush that reaches the DB ┘

Guarantees and their limits:

- :meth:`UsageRecorder.record` never blocks, awaits or raises: the request path never waits on
  (or fails because of) the database.
- Each record is counted at most once: the raw insert is idempotent on ``request_id`` and the
  rollups are incremented, in the same transaction, only for the rows that insert really added.
  So replaying a spool after a partial success, or a batch whose commit was acknowledged too
  late, cannot double count. (The one gap: a record replayed *after* its raw row was pruned
  would be counted again; replays happen within seconds to hours, retention is days.)
- A spooled record is durable (written and fsync'd before the batch counts as handled). The
  spool is replayed in committed chunks, at most ``replay_budget`` records per flush (so new
  records keep flowing after a long outage), and deleted only once every line of it is in the
  database. A torn last line (a crash mid-append) is skipped with a warning.
- A graceful stop (:meth:`UsageRecorder.close`, called on SIGTERM) flushes the whole queue, to
  the database or else to the spool.
- **A hard kill (SIGKILL, power loss) loses what is only in memory**: the records of at most
  the last ``flush_interval`` seconds, plus a batch whose transaction had not committed yet
  (while the database is slow, up to ``db_timeout`` worth of requests). Shorten
  ``flush_interval`` to lose less at the cost of more, smaller transactions. Spool files are
  never lost: the next start (or another worker) replays them.
- If the queue ever holds ``max_queue`` records (database *and* disk failing, or a stuck
  flusher), new records are dropped and counted in :attr:`UsageRecorder.dropped` rather than
  letting memory grow without bound.

Several processes may share one spool directory (``serve --workers N``): each writes its own
file and holds an exclusive ``flock`` on it while alive. A file whose lock can be taken belongs
to a dead process; any recorder replays it and deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate.usage.record import UsageRecord
from chatgate.usage.tables import (
    BACKEND_LEN,
    ENDPOINT_LEN,
    ERROR_CODE_LEN,
    ID_LEN,
    MODEL_LEN,
    WIDTHS,
    to_nanos,
    usage_records,
    usage_rollups,
)

log = logging.getLogger(__name__)

# asyncpg and SQLite (3.32+) both allow 32,767 bind parameters per statement; stay below.
MAX_PARAMS = 30_000
SPOOL_GLOB = "usage-*.spool"
ORPHAN_SCAN_INTERVAL = 60.0


class UsageRecorder:
    """Collects :class:`UsageRecord` s and writes them in batches (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        flush_interval: float = 1.0,
        batch_size: int = 500,
        max_queue: int = 100_000,
        db_timeout: float = 10.0,
        max_backoff: float = 30.0,
        retention_seconds: float | None = None,
        prune_interval: float = 3600.0,
        replay_budget: int = 20_000,
    ) -> None:
        self._engine = engine
        self._spool = _Spool(Path(spool_dir))
        self._interval = flush_interval
        self._batch_size = max(1, batch_size)
        self._max_queue = max_queue
        self._db_timeout = db_timeout
        self._max_backoff = max_backoff
        self._retention = retention_seconds
        self._prune_interval = prune_interval
        # Spooled records replayed per flush: a long outage's spool drains over several
        # flushes, so new records keep flowing meanwhile and the queue does not back up.
        self._replay_budget = max(1, replay_budget)
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._backoff = 0.0
        self._retry_at = 0.0  # monotonic time before which the flusher goes straight to spool
        self._db_down = False
        self._next_prune = 0.0
        self.dropped = 0  # records refused because the queue was full
        self.written = 0  # records this recorder inserted (replays included)

    # -- what the request path and the metrics see ---------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Records waiting in memory."""
        return len(self._queue)

    @property
    def spool_size(self) -> int:
        """Records waiting in spool files (this process's, and orphans seen at the last scan)."""
        return self._spool.pending + self._spool.orphan_pending

    def record(self, rec: UsageRecord) -> None:
        """Queue ``rec``. Never blocks, awaits or raises (see :attr:`dropped` when full).

        Call it from the event loop's thread (the request handlers do).
        """
        if self._closed:
            self._record_late(rec)
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error(
                    "usage queue full (%d): %d records dropped", self._max_queue, self.dropped
                )
            return
        self._queue.append(rec)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def _record_late(self, rec: UsageRecord) -> None:
        # A request that finished after close() (shutting down): no flusher is left, so write
        # it to the spool right here; blocking is acceptable at that point, losing it is not.
        try:
            self._spool.append([rec])
        except OSError as exc:
            self.dropped += 1
            log.error("usage record after close could not be spooled: %s", exc)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (needs a running event loop). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-recorder")

    async def close(self) -> None:
        """Stop the flusher and write out everything queued (to the database or the spool).

        If the database just failed, the queue goes straight to the spool rather than waiting
        up to ``db_timeout`` once more: a stop should be quick; the next start replays it.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush(force=not self._db_down)
        self._closed = True
        self._spool.release()

    async def flush(self) -> None:
        """Write out the queue now, replaying the spool first; ignores the outage backoff."""
        await self._flush(force=True)

    async def prune(self, older_than_seconds: float) -> int:
        """Delete raw records older than ``older_than_seconds``; rollups are kept. Returns rows."""
        cutoff = int(time.time() - older_than_seconds)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                usage_records.delete().where(usage_records.c.created_at < cutoff)
            )
        return int(result.rowcount)

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._closing:
                break  # close() does the final flush itself
            try:
                await self._flush(force=False)
                await self._maybe_prune()
            except Exception:  # the flusher must outlive any surprise; the data stays queued
                log.exception("usage flush failed")

    async def _maybe_prune(self) -> None:
        if self._retention is None or self._db_down or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self._prune_interval
        try:
            removed = await self.prune(self._retention)
        except Exception as exc:
            log.warning("usage prune failed: %s", _describe(exc))
            return
        if removed:
            log.info("usage: pruned %d raw records", removed)

    # -- flushing --------------------------------------------------------------------------------

    async def _flush(self, *, force: bool) -> None:
        async with self._lock:
            db_up = force or time.monotonic() >= self._retry_at
            if db_up and self._spool.has_work():
                db_up = await self._replay()
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))
                ]
                try:
                    if db_up:
                        try:
                            await self._write(batch)
                            self._db_ok()
                            continue
                        except Exception as exc:
                            self._db_failed(exc)
                            db_up = False
                    await asyncio.to_thread(self._spool.append, batch)
                except OSError as exc:  # the spool itself failed (disk full?): keep it in memory
                    self._queue.extendleft(reversed(batch))
                    log.error(
                        "usage spool write failed, %d records kept in memory: %s", len(batch), exc
                    )
                    return
                except BaseException:
                    # Cancelled mid-write: put the batch back so close() still writes it (if the
                    # insert had committed, writing it again is a no-op thanks to request_id).
                    self._queue.extendleft(reversed(batch))
                    raise

    async def _write(self, records: Sequence[UsageRecord]) -> None:
        async with asyncio.timeout(self._db_timeout):
            async with self._engine.begin() as conn:
                added = await write_batch(conn, records)
        self.written += added

    async def _replay(self) -> bool:
        """Write spooled records to the database, up to ``replay_budget`` this flush (the rest
        follows on the next ones); ``False`` when the database failed (nothing is lost)."""
        spool, budget = self._spool, self._replay_budget
        try:
            while spool.pending and budget > 0:
                chunk = await asyncio.to_thread(spool.read_own, min(budget, self._batch_size))
                if chunk.records:
                    await self._write(chunk.records)
                spool.offset = chunk.end  # only once committed: a failure re-reads the chunk
                spool.pending = max(0, spool.pending - len(chunk.records))
                budget -= max(1, len(chunk.records))
                if chunk.eof:
                    await asyncio.to_thread(spool.discard_own)
                    log.info("usage: spool replayed")
            for path in spool.orphans_due():
                if budget <= 0:
                    break
                claimed = await asyncio.to_thread(spool.claim, path)
                if claimed is None:
                    continue
                try:
                    while budget > 0:
                        limit = min(budget, self._batch_size)
                        offset = spool.orphans[path]
                        chunk = await asyncio.to_thread(_read_chunk, path, offset, limit)
                        if chunk.records:
                            await self._write(chunk.records)
                        spool.orphans[path] = chunk.end
                        left = spool.orphan_lines.get(path, 0) - len(chunk.records)
                        spool.orphan_lines[path] = max(0, left)
                        budget -= max(1, len(chunk.records))
                        if chunk.eof:
                            await asyncio.to_thread(claimed.discard)
                            spool.forget(path)
                            log.info("usage: replayed the spool of a stopped process")
                            break
                finally:
                    claimed.release()
        except Exception as exc:
            self._db_failed(exc)
            return False
        self._db_ok()
        return True

    def _db_ok(self) -> None:
        if self._db_down:
            log.warning("usage: database reachable again")
        self._db_down = False
        self._backoff = 0.0
        self._retry_at = 0.0

    def _db_failed(self, exc: BaseException) -> None:
        if not self._db_down:
            log.warning(
                "usage: database unavailable, spooling to %s: %s", self._spool.dir, _describe(exc)
            )
        self._db_down = True
        self._backoff = min(max(self._backoff * 2, self._interval), self._max_backoff)
        self._retry_at = time.monotonic() + self._backoff


# -- the SQL of one batch ------------------------------------------------------------------------


def _dialect_insert(conn: AsyncConnection) -> Callable[[sa.Table], Any]:
    """``insert`` with ``on_conflict_*`` for the connection's database."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert
    if conn.dialect.name == "sqlite":
        return sqlite.insert
    raise RuntimeError(f"usage recording supports SQLite and PostgreSQL, not {conn.dialect.name}")


def _clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit]


def _row(rec: UsageRecord) -> dict[str, Any]:
    # Text is clipped to the column sizes so that no value can make a batch fail for good.
    return {
        "request_id": _clip(rec.request_id, ID_LEN),
        "created_at": int(rec.created_at),
        "account_id": _clip(rec.account_id, ID_LEN),
        "key_id": _clip(rec.key_id, ID_LEN),
        "model": _clip(rec.model, MODEL_LEN),
        "backend": _clip(rec.backend, BACKEND_LEN),
        "endpoint": _clip(rec.endpoint, ENDPOINT_LEN),
        "prompt_tokens": int(rec.prompt_tokens),
        "completion_tokens": int(rec.completion_tokens),
        "cost_nanousd": to_nanos(rec.cost),
        "latency_ms": float(rec.latency_ms),
        "ttft_ms": None if rec.ttft_ms is None else float(rec.ttft_ms),
        "status": int(rec.status),
        "error_code": _clip(rec.error_code, ERROR_CODE_LEN),
        "conversation_id": _clip(rec.conversation_id, ID_LEN),
        "streamed": bool(rec.streamed),
    }


def _chunks(rows: Sequence[dict[str, Any]], columns: int) -> Iterable[Sequence[dict[str, Any]]]:
    per = max(1, MAX_PARAMS // columns)
    for start in range(0, len(rows), per):
        yield rows[start : start + per]


def rollup_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rollup increments for raw ``rows``, one per bucket x account x key x model x endpoint.

    Sorted by primary key, so concurrent writers lock rollup rows in the same order (no
    deadlock between two processes upserting overlapping rows on PostgreSQL).
    """
    sums: dict[tuple[int, int, str, str, str, str], list[int]] = {}
    for row in rows:
        ts = row["created_at"]
        for width in WIDTHS:
            key = (
                width,
                ts - ts % width,
                row["account_id"] or "",
                row["key_id"] or "",
                row["model"],
                row["endpoint"],
            )
            acc = sums.get(key)
            if acc is None:
                acc = sums[key] = [0, 0, 0, 0, 0, 0]
            acc[0] += 1
            acc[1] += row["prompt_tokens"]
            acc[2] += row["completion_tokens"]
            acc[3] += row["cost_nanousd"]
            acc[4] += row["status"] >= 400
            acc[5] += row["status"] == 429
    return [
        {
            "width": k[0],
            "bucket_start": k[1],
            "account_id": k[2],
            "key_id": k[3],
            "model": k[4],
            "endpoint": k[5],
            "requests": v[0],
            "prompt_tokens": v[1],
            "completion_tokens": v[2],
            "cost_nanousd": v[3],
            "errors": v[4],
            "rate_limited": v[5],
        }
        for k, v in sorted(sums.items())
    ]


async def write_batch(conn: AsyncConnection, records: Sequence[UsageRecord]) -> int:
    """Insert ``records`` and add the new ones to the rollups, in the caller's transaction.

    One multi-row INSERT (per ~1,800 records) that skips request ids already stored and
    returns the ones it added; then one multi-row upsert of the rollups for exactly those.
    Returns how many records were new.
    """
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:  # the same id twice in one batch counts once, like across batches
        row = _row(rec)
        rows.setdefault(row["request_id"], row)
    if not rows:
        return 0
    insert = _dialect_insert(conn)
    new_ids: set[str] = set()
    for chunk in _chunks(list(rows.values()), len(usage_records.c)):
        stmt = (
            insert(usage_records)
            .values(list(chunk))
            .on_conflict_do_nothing(index_elements=[usage_records.c.request_id])
            .returning(usage_records.c.request_id)
        )
        new_ids.update((await conn.execute(stmt)).scalars())
    increments = rollup_rows(rows[i] for i in rows if i in new_ids)
    for chunk in _chunks(increments, len(usage_rollups.c)):
        stmt = insert(usage_rollups).values(list(chunk))
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[c for c in usage_rollups.primary_key.columns],
            set_={
                name: usage_rollups.c[name] + excluded[name]
                for name in (
                    "requests",
                    "prompt_tokens",
                    "completion_tokens",
                    "cost_nanousd",
                    "errors",
                    "rate_limited",
                )
            },
        )
        await conn.execute(stmt)
    return len(new_ids)


# -- the spool -----------------------------------------------------------------------------------


class _Spool:
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
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive": nobody else replays it
            _fsync_dir(self.dir)  # so the new file's name survives a crash too
            self._fd = fd
        return self._fd

    def read_own(self, limit: int) -> _Chunk:
        try:
            return _read_chunk(self.path, self.offset, limit)
        except FileNotFoundError:  # removed by hand: nothing to replay, and not a DB failure
            return _Chunk([], self.offset, True)

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

    def claim(self, path: Path) -> _Claimed | None:
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
        return _Claimed(path, fd)

    def forget(self, path: Path) -> None:
        self.orphans.pop(path, None)
        self.orphan_lines.pop(path, None)


@dataclass(frozen=True, slots=True)
class _Chunk:
    records: list[UsageRecord]
    end: int  # the byte offset after the last line read
    eof: bool


class _Claimed:
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


def _read_chunk(path: Path, offset: int, limit: int) -> _Chunk:
    """Up to ``limit`` records from ``offset``. A torn last line (a crash mid-append) or an
    unreadable one is skipped with a warning."""
    records: list[UsageRecord] = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        while len(records) < limit:
            line = fh.readline()
            if not line:
                return _Chunk(records, fh.tell(), True)
            if not line.endswith(b"\n"):
                log.warning("usage spool %s: torn last line skipped", path.name)
                return _Chunk(records, fh.tell(), True)
            if not line.strip():
                continue
            try:
                records.append(UsageRecord.from_dict(orjson.loads(line)))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("usage spool %s: unreadable line skipped: %s", path.name, exc)
        end = fh.tell()
        return _Chunk(records, end, not fh.read(1))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    """One line about a database error, for logs (its first line: no SQL parameters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


__all__ = ["UsageRecorder", "rollup_rows", "write_batch"]
