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
- A record PostgreSQL refuses for a value in it (a "data exception": a number beyond its
  column, which nothing chatgate records should hold) is dropped alone, logged whole and counted
  in :attr:`UsageRecorder.rejected`; the rest of its batch is stored. Spooled, it would fail
  every later flush and keep everything after it out of the database.

Raw records older than the retention are pruned hourly in a task of their own, beside the
flusher (an hour's records of a busy deployment are millions of rows, and the flusher used to
wait for their ``DELETE``), ``PRUNE_SLICE`` of their time a transaction (so a backlog of days
is not one transaction, and a stop does not wait for one), each slice one range ``DELETE`` on
the ``created_at`` index (``bench/prune.py``: one million rows over 5.5 hours, in a table
keeping three million newer ones, 0.59-0.93 s against 0.41-0.86 s as one ``DELETE``; a stop
during a prune waited 0.02-0.37 s). Chunks of 5,000 row ids instead took 2-7x as long as one
``DELETE``: each walked again over the index entries of the rows the chunks before it deleted.
On PostgreSQL one process prunes at a time (an advisory lock); the others leave it to that one.

Several processes may share one spool directory (``serve --workers N``): each writes its own
file and holds an exclusive ``flock`` on it while alive. A file whose lock can be taken belongs
to a dead process; any recorder replays it and deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.db.engine import try_xact_lock
from chatgate.usage.batch import write_batch
from chatgate.usage.record import UsageRecord
from chatgate.usage.spool import Spool, read_chunk
from chatgate.usage.tables import usage_records

log = logging.getLogger(__name__)


PRUNE_SLICE = 600
"""Seconds of raw records deleted per transaction when pruning."""
PRUNE_LOCK = 0x63676174_65707275  # PostgreSQL advisory lock key of the prune ("cgatepru")


class UsageRecorder:
    """Collects :class:`UsageRecord` s and writes them in batches (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        flush_interval: float = 1.0,
        batch_size: int = 2000,
        max_queue: int = 100_000,
        db_timeout: float = 10.0,
        max_backoff: float = 30.0,
        retention_seconds: float | None = None,
        prune_interval: float = 3600.0,
        replay_budget: int = 20_000,
    ) -> None:
        self._engine = engine
        self._spool = Spool(Path(spool_dir))
        self._interval = flush_interval
        self._batch_size = max(1, batch_size)
        self._max_queue = max_queue
        # SQLite: no deadline of ours. Cancelling aiosqlite mid-statement does not stop its
        # thread, which waits out the lock, takes it and (an insert ... RETURNING left unread)
        # never gives it back; SQLite's busy timeout (30 s) ends the statement instead.
        self._db_timeout: float | None = None if engine.dialect.name == "sqlite" else db_timeout
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
        self._pruning: asyncio.Task[None] | None = None
        self.dropped = 0  # records refused because the queue was full
        self.written = 0  # records this recorder inserted (replays included)
        # Called when a stopped process's spool is in the database: records this process's
        # limits never counted (the application seeds them again).
        self.on_replayed_orphan: Callable[[], object] | None = None
        self.rejected = 0  # records the database refused for a value in them: logged, not stored

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
        if self._pruning is not None:  # a slice not committed yet rolls back: the next start
            self._pruning.cancel()  # prunes it (a stop should be quick)
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
            self._pruning = None
        await self._flush(force=not self._db_down)
        self._closed = True
        self._spool.release()

    async def flush(self) -> None:
        """Write out the queue now, replaying the spool first; ignores the outage backoff."""
        await self._flush(force=True)

    async def prune(self, older_than_seconds: float, *, slice_seconds: int = PRUNE_SLICE) -> int:
        """Delete raw records older than ``older_than_seconds``, those of at most
        ``slice_seconds`` a transaction, until none is left or the recorder closes; rollups are
        kept. Returns rows (0 when another process holds the prune lock)."""
        t = usage_records
        cutoff = int(time.time() - older_than_seconds)
        first = sa.select(sa.func.min(t.c.created_at)).where(t.c.created_at < cutoff)
        removed = 0
        async with self._engine.connect() as conn:
            low = (await conn.execute(first)).scalar_one_or_none()
        while low is not None and not self._closing:
            high = min(cutoff, low + slice_seconds)
            async with self._engine.begin() as conn:
                if not await try_xact_lock(conn, PRUNE_LOCK):
                    return removed
                between = (t.c.created_at >= low) & (t.c.created_at < high)
                removed += int((await conn.execute(t.delete().where(between))).rowcount)
                # The next record's time, looked up past this slice (not over its deleted rows).
                after = first.where(t.c.created_at >= high)
                low = (await conn.execute(after)).scalar_one_or_none()
        return removed

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._closing:
                break  # close() does the final flush itself
            try:
                await self._flush(force=False, drain=False)
                self._maybe_prune()
            except Exception:  # the flusher must outlive any surprise; the data stays queued
                log.exception("usage flush failed")

    def _maybe_prune(self) -> None:
        """Start a prune beside the flusher, once per ``prune_interval`` (never two at once)."""
        if self._retention is None or self._db_down or time.monotonic() < self._next_prune:
            return
        if self._pruning is not None and not self._pruning.done():
            return
        self._next_prune = time.monotonic() + self._prune_interval
        self._pruning = asyncio.get_running_loop().create_task(
            self._prune_logged(self._retention), name="usage-prune"
        )

    async def _prune_logged(self, retention: float) -> None:
        try:
            removed = await self.prune(retention)
        except Exception as exc:
            log.warning("usage prune failed: %s", _describe(exc))
            return
        if removed:
            log.info("usage: pruned %d raw records", removed)

    # -- flushing --------------------------------------------------------------------------------

    async def _flush(self, *, force: bool, drain: bool = True) -> None:
        """Write the queue out. ``drain``: also what arrives meanwhile (a stop, ``flush()``);
        else only what was queued when the flush began (the background flusher: chasing the
        tail would write a batch of one or two records per transaction under steady load)."""
        async with self._lock:
            db_up = force or time.monotonic() >= self._retry_at
            if db_up and self._spool.has_work():
                db_up = await self._replay()
            todo = len(self._queue)
            while self._queue and (drain or todo > 0):
                count = min(self._batch_size, len(self._queue))
                if not drain:
                    count = min(count, todo)
                todo -= count
                batch = [self._queue.popleft() for _ in range(count)]
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
        """Write ``records`` in one transaction.

        A batch the database refuses for a value in it (see :func:`_refused_value`) is not an
        outage, and spooled it would fail again every time, holding up everything after it:
        it is written in halves instead, until each refused record is alone; those are logged
        and counted in :attr:`rejected`, and the others are stored.
        """
        try:
            async with asyncio.timeout(self._db_timeout):
                async with self._engine.begin() as conn:
                    added = await write_batch(conn, records)
        except Exception as exc:
            if not _refused_value(exc):
                raise
            if len(records) > 1:
                half = len(records) // 2
                await self._write(records[:half])
                await self._write(records[half:])
                return
            self.rejected += 1
            log.error(
                "usage: a record the database refuses was dropped (%s): %s",
                _describe(exc),
                records[0].to_dict(),
            )
            return
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
                        chunk = await asyncio.to_thread(read_chunk, path, offset, limit)
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
                            if self.on_replayed_orphan is not None:
                                self.on_replayed_orphan()
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


def _refused_value(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL refusing a value of the batch (SQLSTATE class 22, "data
    exception": a number out of its column's range, say), found down the chain of causes
    SQLAlchemy wraps it in; not a database that is unreachable, slow or failing."""
    cause: BaseException | None = exc
    for _ in range(8):  # SQLAlchemy's error, the adapter's, asyncpg's: a few links at most
        if cause is None:
            return False
        if isinstance(cause, asyncpg.exceptions.DataError):
            return True
        cause = cause.__cause__
    return False


def _describe(exc: BaseException) -> str:
    """One line about a database error, for logs (its first line: no SQL parameters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


__all__ = ["UsageRecorder"]
