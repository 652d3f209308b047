"""The usage writer: the usage recorder in a process of its own, off the gateway's event loop.

Flow::

    request path ──record()──▶ list ──every flush_interval, or batch_size reached──▶ pipe
        (gateway)                                                 one frame: the batch as
                                                                  tuples, pickled (~1 us a record)
                                                                          │
    ◀──── ack(seq): that batch is in the database or the spool ──── writer process
                                                                   (python -m chatgate.usage.writer)
                                                                   runs the UsageRecorder: COPY
                                                                   batches, spool, replay, prune

Why a process: a batch's ``COPY`` and transaction cost ~8 us a record of the gateway's own CPU
(``bench/usage_batch.py``), a flush of a busy second several milliseconds during which the
event loop answers nothing. That was the whole of the one-connection p99 over bare
(docs/benchmarks.md). Handing the batch over costs a tenth of it; the writer runs at a lower
priority (``nice`` +10), so a woken gateway preempts it.

Guarantees (the recorder's, see :mod:`chatgate.usage.recorder`, plus these):

- :meth:`UsageWriter.record` never blocks, awaits or raises.
- The gateway keeps every batch it sent until the writer acknowledges it, and the writer
  acknowledges only once its recorder has written it (to the database, or the fsync'd spool).
- **The writer dies** (killed, out of memory): the gateway starts another and sends it every
  unacknowledged batch again; the database's idempotency on ``request_id`` makes a batch
  written twice count once.
- **The gateway dies** (SIGKILL): the writer reads the end of its pipe, writes everything it
  received and exits. Lost: what the gateway had not sent yet, at most the last
  ``flush_interval`` of records, as when the recorder ran inside the gateway.
- **A graceful stop** sends the rest, closes the pipe and waits for the writer to finish; what
  the writer did not acknowledge (it died, or outlived ``stop_timeout``) the gateway spools
  itself, for the next start to replay.
- The writer ignores SIGINT and SIGTERM (a terminal's Ctrl-C, a supervisor's stop of the process
  group): it stops when its gateway does, after writing what it was sent.

``CHATGATE_USAGE_WRITER=inline`` keeps the recorder in the gateway's process instead (one
process fewer, the flush back on the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import pickle
import signal
import struct
import sys
import time
from dataclasses import fields
from typing import Any, NamedTuple

from chatgate.settings import Settings
from chatgate.usage.record import UsageRecord
from chatgate.usage.spool import SPOOL_GLOB, Spool

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")  # each frame: its length, then a pickle
_ROW = operator.attrgetter(*(f.name for f in fields(UsageRecord)))  # a record as a tuple
NICE = 10
"""How much lower the writer's priority is than its gateway's."""
RESTART_MAX_DELAY = 30.0
"""The longest wait before starting a writer again after it died (doubling from 0.5 s)."""

Row = tuple[Any, ...]


class WriterStats(NamedTuple):
    """The writer's recorder's figures, as of its last acknowledgement."""

    queue_depth: int = 0
    spool_size: int = 0
    dropped: int = 0
    written: int = 0
    rejected: int = 0


class _Batch(NamedTuple):
    rows: list[Row]
    force: bool  # a flush(): write now, even during the recorder's outage backoff


class UsageWriter:
    """The gateway's side: collects records, sends them to the writer process, tracks acks.

    Same surface as :class:`~chatgate.usage.recorder.UsageRecorder` (``record``, ``start``,
    ``flush``, ``close`` and the figures the metrics read). The process starts with the first
    batch, so a gateway that records nothing never starts one; or at once when a spool is
    waiting to be replayed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_queue: int = 100_000,
        stop_timeout: float = 60.0,
    ) -> None:
        self._settings = settings
        self._interval = settings.usage_flush_interval
        self._batch_size = max(1, settings.usage_batch_size)
        self._max_queue = max_queue
        self._stop_timeout = stop_timeout
        self._rows: list[Row] = []
        self._unacked: dict[int, _Batch] = {}  # seq -> batch, in the order sent
        self._in_flight = 0  # records in _unacked
        self._seq = 0
        self._acked = 0
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._acks: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._restart_at = 0.0
        self._restart_delay = 0.0
        self._late: Spool | None = None
        self._base = WriterStats()  # the figures of writers that are gone
        self._last = WriterStats()  # the running writer's latest figures
        self._dropped = 0
        self.starts = 0  # writer processes started (a restart after a death counts)

    # -- what the request path and the metrics see ---------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Records not yet written: here, in the pipe, or queued in the writer."""
        return len(self._rows) + self._in_flight

    @property
    def spool_size(self) -> int:
        return self._last.spool_size

    @property
    def dropped(self) -> int:
        return self._dropped + self._base.dropped + self._last.dropped

    @property
    def written(self) -> int:
        return self._base.written + self._last.written

    @property
    def rejected(self) -> int:
        return self._base.rejected + self._last.rejected

    @property
    def pid(self) -> int | None:
        """The writer process's id while one runs."""
        return self._proc.pid if self._proc is not None else None

    def record(self, rec: UsageRecord) -> None:
        """Queue ``rec`` for the writer. Never blocks, awaits or raises."""
        if self._closed:
            self._record_late(rec)
            return
        if len(self._rows) + self._in_flight >= self._max_queue:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 10_000 == 0:
                log.error(
                    "usage queue full (%d): %d records dropped", self._max_queue, self._dropped
                )
            return
        self._rows.append(_ROW(rec))
        if len(self._rows) >= self._batch_size:
            self._wake.set()

    def _record_late(self, rec: UsageRecord) -> None:
        # After close() (shutting down) no writer is left: spool it here, as the recorder does.
        try:
            self._spool().append([rec])
        except OSError as exc:
            self._dropped += 1
            log.error("usage record after close could not be spooled: %s", exc)

    def _spool(self) -> Spool:
        if self._late is None:
            self._late = Spool(self._settings.data_dir / "spool")
        return self._late

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender (needs a running event loop). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-writer")

    async def flush(self) -> None:
        """Send everything now and wait until the writer has written it (database or spool)."""
        seq = self._send(force=True)
        if seq <= self._acked:
            return
        waiter = self._waiters.get(seq)
        if waiter is None:
            waiter = self._waiters[seq] = asyncio.get_running_loop().create_future()
        await self._ensure_writer(now=True)
        await asyncio.shield(waiter)

    async def close(self) -> None:
        """Send the rest, let the writer write it and exit; spool here what it did not ack."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._send(force=True)
        if self._unacked:
            await self._ensure_writer(now=True)
        if self._proc is not None:
            await self._stop_writer()
        if self._unacked:
            rows = [row for batch in self._unacked.values() for row in batch.rows]
            log.error("usage writer did not confirm %d records: spooling them here", len(rows))
            try:
                await asyncio.to_thread(self._spool().append, [UsageRecord(*r) for r in rows])
            except OSError as exc:
                self._dropped += len(rows)
                log.error("usage spool write failed, %d records lost: %s", len(rows), exc)
            self._unacked.clear()
            self._in_flight = 0
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._closed = True
        if self._late is not None:
            self._late.release()

    async def _stop_writer(self) -> None:
        proc, acks = self._proc, self._acks
        assert proc is not None and proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the writer's end of input: it writes everything and exits
        try:
            async with asyncio.timeout(self._stop_timeout):
                if acks is not None:
                    await acks
                await proc.wait()
        except TimeoutError:
            log.error("usage writer did not stop within %.0f s: killed", self._stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._proc = None

    # -- sending -------------------------------------------------------------------------------

    async def _run(self) -> None:
        spool = self._settings.data_dir / "spool"
        if spool.is_dir() and any(spool.glob(SPOOL_GLOB)):  # left by an outage: replay it now
            await self._ensure_writer(now=True)
        while not self._closing:
            timeout = self._interval
            if self._proc is None and self._unacked:  # a writer died: start the next in time
                timeout = min(timeout, max(0.0, self._restart_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._closing:
                break  # close() sends the rest itself
            try:
                self._send(force=False)
                if self._unacked:
                    await self._ensure_writer()
            except Exception:  # the sender must outlive any surprise; the rows stay queued
                log.exception("usage writer: sending failed")

    def _send(self, *, force: bool) -> int:
        """Move the queued rows into a numbered batch and write it to the writer's pipe (if it
        runs; else :meth:`_ensure_writer` sends it with the others). Returns the batch's number,
        or the last one's when nothing was queued and no flush was asked for."""
        if not self._rows and not force:
            return self._seq
        if not self._rows and not self._unacked:
            return self._acked  # nothing to write or to wait for
        self._seq += 1
        batch = _Batch(self._rows, force)
        self._rows = []
        self._unacked[self._seq] = batch
        self._in_flight += len(batch.rows)
        if self._proc is not None and self._proc.returncode is None:
            self._write(self._seq, batch)
        return self._seq

    def _write(self, seq: int, batch: _Batch) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(_frame((seq, batch.rows, batch.force)))
        except (ConnectionError, RuntimeError) as exc:  # it died: the ack reader restarts it
            log.debug("usage writer pipe closed: %s", exc)

    async def _ensure_writer(self, *, now: bool = False) -> None:
        """Start a writer if none runs (not sooner than the restart backoff, unless ``now``) and
        send it every unacknowledged batch."""
        if self._proc is not None or (not now and time.monotonic() < self._restart_at):
            return
        async with self._starting:  # one at a time: a flush() may ask while the sender does
            if self._proc is None:
                await self._spawn()

    async def _spawn(self) -> None:
        argv = [sys.executable, "-m", "chatgate.usage.writer"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            self._died(f"could not start: {exc}")
            return
        self._proc = proc
        self.starts += 1
        assert proc.stdin is not None
        proc.stdin.write(_frame(self._settings))
        for seq, batch in self._unacked.items():
            self._write(seq, batch)
        self._acks = asyncio.get_running_loop().create_task(
            self._read_acks(proc), name="usage-writer-acks"
        )

    async def _read_acks(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while (msg := await _read_frame(proc.stdout)) is not None:
                seq, stats = msg
                self._acked_upto(seq)
                self._last = WriterStats(*stats)
                self._restart_delay = 0.0
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            log.error("usage writer: unreadable acknowledgement: %s", exc)
        code = await proc.wait()
        self._base = WriterStats(*(a + b for a, b in zip(self._base, self._last, strict=True)))
        self._base = self._base._replace(queue_depth=0, spool_size=0)
        self._last = WriterStats(spool_size=self._last.spool_size)
        if self._proc is proc:
            self._proc = None
        if code != 0 or (self._unacked and not self._closing):
            self._died(f"exited with status {code}")

    def _died(self, why: str) -> None:
        self._restart_delay = min(max(self._restart_delay * 2, 0.5), RESTART_MAX_DELAY)
        self._restart_at = time.monotonic() + self._restart_delay
        if self._closing:
            log.error("usage writer %s while stopping", why)
            return
        log.error(
            "usage writer %s; %d records unconfirmed, to be sent again to a new one",
            why,
            self._in_flight,
        )
        self._wake.set()  # the sender's next turn starts the new writer

    def _acked_upto(self, seq: int) -> None:
        for done in [s for s in self._unacked if s <= seq]:
            self._in_flight -= len(self._unacked.pop(done).rows)
        self._acked = max(self._acked, seq)
        for done in [s for s in self._waiters if s <= seq]:
            waiter = self._waiters.pop(done)
            if not waiter.done():
                waiter.set_result(None)


# -- the wire ----------------------------------------------------------------------------------


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object, or ``None`` at the end of the pipe."""
    try:
        head = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise EOFError("a frame cut short") from exc
        return None
    (size,) = _HEADER.unpack(head)
    # Safe to unpickle: the pipe joins a gateway and the writer it started; nothing else
    # holds either end.
    return pickle.loads(await reader.readexactly(size))  # noqa: S301


# -- the writer process ------------------------------------------------------------------------


async def _serve(stdin: int, acks: int) -> None:
    """Read batches from ``stdin``, record them, acknowledge each once written, on ``acks``."""
    from chatgate.db.engine import create_engine  # the writer's imports, not the gateway's
    from chatgate.usage.recorder import UsageRecorder

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stdin, "rb", buffering=0)
    )
    settings = await _read_frame(reader)
    if not isinstance(settings, Settings):
        raise SystemExit("chatgate usage writer: expected the settings first")
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s[writer]: %(message)s"
    )
    logging.getLogger("aiosqlite").setLevel(logging.INFO)  # never its DEBUG (see chatgate.cli)
    engine = create_engine(settings)
    recorder = UsageRecorder(
        engine,
        settings.data_dir / "spool",
        flush_interval=settings.usage_flush_interval,
        batch_size=settings.usage_batch_size,
        retention_seconds=settings.usage_retention_days * 86400,
    )
    recorder.start()  # its own timer replays spools and prunes, as it did in the gateway
    received = 0
    force = False
    wake = asyncio.Event()

    def ack(seq: int) -> None:
        stats = WriterStats(
            recorder.queue_depth,
            recorder.spool_size,
            recorder.dropped,
            recorder.written,
            recorder.rejected,
        )
        data = memoryview(_frame((seq, tuple(stats))))
        while data:  # small, and the gateway reads promptly: blocking is fine here
            data = data[os.write(acks, data) :]

    async def writing() -> None:
        nonlocal force
        while True:
            await wake.wait()
            wake.clear()
            seq, forced, force = received, force, False
            try:
                await recorder.flush(force=forced)
            except Exception:  # unacknowledged, the batches stay with the gateway
                log.exception("usage flush failed")
                continue
            ack(seq)

    task = loop.create_task(writing(), name="usage-writer-acks")
    try:
        while (msg := await _read_frame(reader)) is not None:
            seq, rows, forced = msg
            for row in rows:
                recorder.record(UsageRecord(*row))
            received = seq
            force = force or forced
            wake.set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await recorder.close()  # everything received: to the database, or else the spool
        ack(received)
        await engine.dispose()


def main() -> None:
    """``python -m chatgate.usage.writer``: started by :class:`UsageWriter`, not by hand."""
    # Acknowledgements go on a descriptor of their own: stdout becomes stderr, so that nothing
    # a library prints can corrupt them.
    acks = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops when its gateway closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    import uvloop

    uvloop.run(_serve(0, acks))


if __name__ == "__main__":
    main()


__all__ = ["UsageWriter", "WriterStats"]
