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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
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
                await self._flush(force=False, drain=False)
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
#
# Plain SQL text built once per dialect from the table definitions, whatever the batch size;
# the rows travel as ONE parameter, a JSON array of arrays (orjson writes it in ~0.3 us a row;
# the database unpacks it in C). Compiling a many-row ``insert().values([...])`` through
# SQLAlchemy, as before, cost ~200 us of CPU per record (as much as serving the request);
# binding one parameter per value cost ~5-15 us.
#
# PostgreSQL takes the batch in ONE statement: the insert's RETURNING feeds the rollup upsert
# in the same statement, so the new rows' ids never come back to Python and the rollups are
# summed by the database. Done in Python (as SQLite still does: it has no data-modifying
# CTE), reading 500 ids back and summing them held the event loop ~1-1.4 ms at a time, three
# times a second at 1,500 requests/s: the one-connection p99 went from ~1.6 to ~3.3 ms.

RECORD_COLUMNS: tuple[str, ...] = tuple(c.name for c in usage_records.c)
ROLLUP_KEY: tuple[str, ...] = tuple(c.name for c in usage_rollups.primary_key.columns)
ROLLUP_SUMS: tuple[str, ...] = tuple(c.name for c in usage_rollups.c if not c.primary_key)
ROLLUP_COLUMNS = ROLLUP_KEY + ROLLUP_SUMS
_STATUS = RECORD_COLUMNS.index("status")
_SQL: dict[tuple[str, str], str] = {}


def _check_dialect(conn: AsyncConnection) -> str:
    name = conn.dialect.name
    if name not in ("postgresql", "sqlite"):
        raise RuntimeError(f"usage recording supports SQLite and PostgreSQL, not {name}")
    return name


def _rows_from_json(dialect: str, table: sa.Table, columns: Sequence[str]) -> str:
    """``SELECT`` of ``columns`` (typed) from the JSON array of arrays bound as the parameter."""
    if dialect == "postgresql":
        pg = postgresql.dialect()  # type: ignore[no-untyped-call]
        values = ", ".join(
            f"(x->>{i})::{table.c[name].type.compile(dialect=pg)}" for i, name in enumerate(columns)
        )
        return f"SELECT {values} FROM json_array_elements($1::json) AS x"  # noqa: S608 - our columns
    values = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
    # "WHERE true": without a WHERE, SQLite would read the ON CONFLICT as part of a join.
    return f"SELECT {values} FROM json_each(?) WHERE true"  # noqa: S608 - our column indexes


def _insert_sql(dialect: str) -> str:
    """Insert raw rows, skipping request ids already stored; returns the ids added."""
    sql = _SQL.get(("records", dialect))
    if sql is None:
        source = _rows_from_json(dialect, usage_records, RECORD_COLUMNS)
        sql = _SQL["records", dialect] = (
            f"INSERT INTO {usage_records.name} ({', '.join(RECORD_COLUMNS)}) {source} "
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
        )
    return sql


def _upsert_sql(dialect: str) -> str:
    """Add rollup increments (one row per primary key, see :func:`_rollups`)."""
    sql = _SQL.get(("rollups", dialect))
    if sql is None:
        source = _rows_from_json(dialect, usage_rollups, ROLLUP_COLUMNS)
        table = usage_rollups.name
        updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_SUMS)
        sql = _SQL["rollups", dialect] = (
            f"INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}) {source} "
            f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {updates}"
        )
    return sql


def _clip(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    if "\x00" in text:  # PostgreSQL text cannot hold NUL: the batch would fail for good
        text = text.replace("\x00", "")
    return text if len(text) <= limit else text[:limit]


def _row(rec: UsageRecord) -> tuple[Any, ...]:
    """One ``usage_records`` row, in :data:`RECORD_COLUMNS` order.

    Text is clipped to the column sizes so that no value can make a batch fail for good.
    """
    return (
        _clip(rec.request_id, ID_LEN),
        int(rec.created_at),
        _clip(rec.account_id, ID_LEN),
        _clip(rec.key_id, ID_LEN),
        _clip(rec.model, MODEL_LEN),
        _clip(rec.backend, BACKEND_LEN),
        _clip(rec.endpoint, ENDPOINT_LEN),
        int(rec.prompt_tokens),
        int(rec.completion_tokens),
        to_nanos(rec.cost),
        float(rec.latency_ms),
        None if rec.ttft_ms is None else float(rec.ttft_ms),
        int(rec.status),
        _clip(rec.error_code, ERROR_CODE_LEN),
        _clip(rec.conversation_id, ID_LEN),
        bool(rec.streamed),
    )


def _rollups(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rollup increments (in :data:`ROLLUP_COLUMNS` order) of raw rows (:func:`_row` order).

    Summed in memory first: one row per bucket x account x key x model x endpoint, however
    many requests a batch holds. Sorted by primary key, so concurrent writers lock rollup
    rows in the same order (no deadlock between two processes upserting overlapping rows
    on PostgreSQL).
    """
    sums: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        ts = row[1]
        status = row[_STATUS]
        for width in WIDTHS:
            key = (width, ts - ts % width, row[2] or "", row[3] or "", row[4], row[6])
            acc = sums.get(key)
            if acc is None:
                acc = sums[key] = [0, 0, 0, 0, 0, 0]
            acc[0] += 1
            acc[1] += row[7]
            acc[2] += row[8]
            acc[3] += row[9]
            acc[4] += status >= 400
            acc[5] += status == 429
    return [k + tuple(v) for k, v in sorted(sums.items())]


def rollup_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rollup increments for raw rows given as column dicts (see :func:`_rollups`)."""
    tuples = (tuple(row[c] for c in RECORD_COLUMNS) for row in rows)
    return [dict(zip(ROLLUP_COLUMNS, r, strict=True)) for r in _rollups(tuples)]


async def write_batch(conn: AsyncConnection, records: Sequence[UsageRecord]) -> int:
    """Insert ``records`` and add the new ones to the rollups, in the caller's transaction.

    Request ids already stored are skipped, and only the rows really added reach the rollups
    (PostgreSQL: one statement; SQLite: an insert returning the ids it added, then the upsert
    of their sums). Returns how many records were new.
    """
    dialect = _check_dialect(conn)
    rows: dict[str, tuple[Any, ...]] = {}
    for i, rec in enumerate(records):  # the same id twice in one batch counts once
        row = _row(rec)
        rows.setdefault(row[0], row)
        if i % ROWS_PER_TURN == ROWS_PER_TURN - 1:
            await asyncio.sleep(0)  # let requests through between slices of a big batch
    if not rows:
        return 0
    if dialect == "postgresql":
        result = await conn.exec_driver_sql(_batch_sql_pg(), (_json(rows.values()),))
        return int(result.scalar_one())
    result = await conn.exec_driver_sql(_insert_sql(dialect), (_json(rows.values()),))
    new_ids = set(result.scalars())
    increments = _rollups(rows[i] for i in rows if i in new_ids)
    if increments:
        await conn.exec_driver_sql(_upsert_sql(dialect), (_json(increments),))
    return len(new_ids)


ROWS_PER_TURN = 128
"""Rows a flush turns into SQL parameters between two yields to the event loop (~0.25 ms)."""


def _batch_sql_pg() -> str:
    """PostgreSQL: insert the raw rows (skipping known request ids) and upsert the rollups of
    those really added, in one statement; it returns how many were added.

    The rollup rows are sorted by primary key (text in code point order, as :func:`_rollups`
    sorts them), so concurrent writers lock them in the same order: no deadlock between two
    processes upserting overlapping rows.
    """
    sql = _SQL.get(("batch", "postgresql"))
    if sql is not None:
        return sql
    source = _rows_from_json("postgresql", usage_records, RECORD_COLUMNS)
    table = usage_rollups.name
    widths = ", ".join(f"({w})" for w in WIDTHS)
    key = ", ".join(ROLLUP_KEY)
    order = ", ".join(
        f'g.{c} COLLATE "C"' if isinstance(usage_rollups.c[c].type, sa.String) else f"g.{c}"
        for c in ROLLUP_KEY
    )
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_SUMS)
    sums = {
        "requests": "count(*)",
        "prompt_tokens": "sum(i.prompt_tokens)",
        "completion_tokens": "sum(i.completion_tokens)",
        "cost_nanousd": "sum(i.cost_nanousd)::bigint",
        "errors": "count(*) FILTER (WHERE i.status >= 400)",
        "rate_limited": "count(*) FILTER (WHERE i.status = 429)",
    }
    assert tuple(sums) == ROLLUP_SUMS, "the rollup columns changed: update the sums here"
    grouped = (
        "SELECT w.width, i.created_at - i.created_at % w.width AS bucket_start, "  # noqa: S608
        "coalesce(i.account_id, '') AS account_id, coalesce(i.key_id, '') AS key_id, "
        f"i.model, i.endpoint, {', '.join(f'{v} AS {k}' for k, v in sums.items())} "
        f"FROM new_rows AS i CROSS JOIN (VALUES {widths}) AS w (width) "
        "GROUP BY 1, 2, 3, 4, 5, 6"
    )
    sql = _SQL["batch", "postgresql"] = (
        f"WITH new_rows AS (INSERT INTO {usage_records.name} ({', '.join(RECORD_COLUMNS)}) "  # noqa: S608
        f"{source} ON CONFLICT (request_id) DO NOTHING "
        "RETURNING created_at, account_id, key_id, model, endpoint, prompt_tokens, "
        "completion_tokens, cost_nanousd, status), "
        f"rolled AS (INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}) "
        f"SELECT g.* FROM ({grouped}) AS g ORDER BY {order} "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}) "
        "SELECT count(*) FROM new_rows"
    )
    return sql


def _json(rows: Iterable[tuple[Any, ...]]) -> str:
    return orjson.dumps(list(rows)).decode()


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
