"""The usage recorder on real SQLite and PostgreSQL: batching, idempotency, rollups equal to the
raw sums, the spool during an outage (a test-owned PostgreSQL stopped and started) and its
replay exactly once, and the final flush of ``close()``."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.db.engine import create_engine, migrate
from chatgate.usage.batch import ROWS_PER_TURN, write_batch
from chatgate.usage.record import UsageRecord
from chatgate.usage.recorder import UsageRecorder
from chatgate.usage.tables import (
    DAY,
    ERROR_CODE_LEN,
    HOUR,
    MINUTE,
    MODEL_LEN,
    to_nanos,
    usage_records,
    usage_rollups,
)
from tests.helpers import free_port
from tests.usage.factory import make_record, new_account, settings_for
from tests.usage.pgserver import PgServer


class Statements:
    """Counts the SQL statements an engine sends, by the table they insert into."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.sent: list[str] = []
        self._engine = engine.sync_engine

    def _listen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(statement)

    def __enter__(self) -> Statements:
        event.listen(self._engine, "before_cursor_execute", self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self._engine, "before_cursor_execute", self._listen)

    def inserts(self, table: str) -> int:
        """Statements that insert into ``table`` (PostgreSQL's one-statement batch counts for
        both tables)."""
        return sum(1 for s in self.sent if f"INSERT INTO {table} (".upper() in s.upper())


async def stored(engine: AsyncEngine, account: str) -> list[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(usage_records).where(usage_records.c.account_id == account)
        )
        return list(rows)


async def rollup_sums(
    engine: AsyncEngine, account: str, width: int
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    t = usage_rollups
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(
                t.c.bucket_start,
                t.c.key_id,
                t.c.model,
                t.c.endpoint,
                t.c.requests,
                t.c.prompt_tokens,
                t.c.completion_tokens,
                t.c.cost_nanousd,
                t.c.errors,
                t.c.rate_limited,
                t.c.latency_ms_sum,
                t.c.timed_requests,
                t.c.admitted,
            ).where(t.c.account_id == account, t.c.width == width)
        )
        return {
            (r[0], r[1], r[2], r[3]): (
                int(r[4]),
                int(r[5]),
                int(r[6]),
                int(r[7]),
                int(r[8]),
                int(r[9]),
                float(r[10]),
                int(r[11]),
                int(r[12]),
            )
            for r in rows
        }


def expected_sums(records: list[UsageRecord], width: int) -> dict[tuple[Any, ...], tuple[int, ...]]:
    sums: dict[tuple[Any, ...], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0, 0, 0, 0.0, 0, 0])
    for r in records:
        ts = int(r.created_at)
        acc = sums[(ts - ts % width, r.key_id or "", r.model, r.endpoint)]
        acc[0] += 1
        acc[1] += r.prompt_tokens
        acc[2] += r.completion_tokens
        acc[3] += to_nanos(r.cost)
        acc[4] += r.status >= 400
        acc[5] += r.status == 429
        acc[6] += r.latency_ms
        acc[7] += 1
        acc[8] += r.admitted
    return {k: (*(int(n) for n in v[:6]), v[6], int(v[7]), int(v[8])) for k, v in sums.items()}


def spooled_lines(spool_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in spool_dir.glob("usage-*.spool"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


async def test_batches_are_one_insert_each(engine: AsyncEngine, spool_dir: Path) -> None:
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600, batch_size=500)
    for _ in range(1_200):
        recorder.record(make_record(account_id=account))
    assert recorder.queue_depth == 1_200
    with Statements(engine) as statements:
        await recorder.flush()
    assert recorder.queue_depth == 0
    assert len(await stored(engine, account)) == 1_200
    # 500 + 500 + 200. SQLite: one multi-row INSERT and one rollup upsert per batch.
    # PostgreSQL: per batch a savepoint through SQLAlchemy, then on asyncpg's own connection
    # (no statement SQLAlchemy sees) the rows by COPY and the rollup upsert: no INSERT at all.
    if engine.dialect.name == "postgresql":
        assert statements.sent == ["SAVEPOINT usage_copy"] * 3, statements.sent
    else:
        assert statements.inserts("usage_records") == 3, statements.sent
        assert statements.inserts("usage_rollups") == 3
        assert len(statements.sent) == 6
    sums = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in sums.values()) == 1_200
    assert recorder.written == 1_200
    await recorder.close()


async def test_a_big_batch_is_one_transaction_in_short_copies(
    engine: AsyncEngine, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default batch (2,000 records) is one transaction, one savepoint and one rollup
    upsert; on PostgreSQL its rows go by ``COPY`` statements of :data:`ROWS_PER_TURN` rows,
    so the database works on it in short bursts (one ``COPY`` of a whole batch kept it busy
    for milliseconds, and processes on its cores waited)."""
    import asyncpg

    copies: list[int] = []
    real_copy = asyncpg.Connection.copy_records_to_table

    async def spy(self: Any, table_name: str, *, records: Any, **kwargs: Any) -> Any:
        copies.append(len(records))
        return await real_copy(self, table_name, records=records, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", spy)
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600)
    for i in range(1_300):
        recorder.record(make_record(account_id=account, prompt_tokens=i % 7))
    with Statements(engine) as statements:
        await recorder.flush()
    assert len(await stored(engine, account)) == 1_300
    sums = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in sums.values()) == 1_300
    assert sum(v[1] for v in sums.values()) == sum(i % 7 for i in range(1_300))
    if engine.dialect.name == "postgresql":
        assert statements.sent == ["SAVEPOINT usage_copy"], statements.sent
        assert copies == [ROWS_PER_TURN] * (1_300 // ROWS_PER_TURN) + [1_300 % ROWS_PER_TURN]
    else:
        assert statements.inserts("usage_records") == 1 == statements.inserts("usage_rollups")
        assert copies == []
    await recorder.close()


async def test_a_batch_lets_requests_through_while_it_is_prepared(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two turns of any other task, a batch turns at most :data:`ROWS_PER_TURN` records
    into rows, sums at most as many into rollups, and its ``COPY`` takes at most as many
    (counted by calls and rows, not by time)."""
    import asyncpg

    from chatgate.usage import batch

    made = {"rows": 0, "summed": 0, "copied": 0}
    real_row, real_added = batch._row, batch._ADDED_OF_ROW
    real_copy = asyncpg.Connection.copy_records_to_table

    def row(rec: UsageRecord) -> tuple[Any, ...]:
        made["rows"] += 1
        return real_row(rec)

    def added(row: tuple[Any, ...]) -> Any:
        made["summed"] += 1
        return real_added(row)

    async def copy(self: Any, table_name: str, *, records: Any, **kwargs: Any) -> Any:
        def counted() -> Any:
            for row in records:
                made["copied"] += 1
                yield row

        return await real_copy(self, table_name, records=counted(), **kwargs)

    monkeypatch.setattr(batch, "_row", row)
    monkeypatch.setattr(batch, "_ADDED_OF_ROW", added)
    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", copy)
    most = dict.fromkeys(made, 0)
    done = False

    async def other_task() -> None:
        seen = dict(made)
        while not done:
            await asyncio.sleep(0)
            for name, count in made.items():
                most[name] = max(most[name], count - seen[name])
            seen = dict(made)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    account = new_account()
    async with engine.begin() as conn:
        assert await write_batch(conn, [make_record(account_id=account) for _ in range(1_000)])
    done = True
    await other
    assert made["rows"] == 1_000 and 0 < most["rows"] <= ROWS_PER_TURN, most
    if engine.dialect.name == "postgresql":  # SQLite sums the rows its insert returns
        assert made["summed"] == 1_000 and 0 < most["summed"] <= ROWS_PER_TURN, most
        assert made["copied"] == 1_000 and 0 < most["copied"] <= ROWS_PER_TURN, most


async def test_a_copy_refused_after_many_rows_writes_nothing_twice(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """A batch whose ``COPY`` meets a request id already stored only in a later turn: the rows
    before it are rolled back with it, the general statement writes the batch, and every record
    is stored and counted once."""
    account = new_account()
    first = [
        make_record(account_id=account, latency_ms=i / 4, admitted=i % 3 > 0)
        for i in range(2 * ROWS_PER_TURN + 10)
    ]
    async with engine.begin() as conn:
        await write_batch(conn, first[-1:])  # stored before: the batch's last record
    async with engine.begin() as conn:
        added = await write_batch(conn, first)
    assert added == len(first) - 1
    assert len(await stored(engine, account)) == len(first)
    sums = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in sums.values()) == len(first)
    # the statement's own sums (PostgreSQL), as the COPY's: the latency of each once
    assert sum(v[6] for v in sums.values()) == sum(r.latency_ms for r in first)
    assert sum(v[7] for v in sums.values()) == len(first)
    assert sum(v[8] for v in sums.values()) == sum(r.admitted for r in first)


async def test_same_record_twice_is_stored_and_counted_once(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    account = new_account()
    rec = make_record(account_id=account, prompt_tokens=7, completion_tokens=3)
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600)
    recorder.record(rec)
    recorder.record(rec)  # twice in one batch
    await recorder.flush()
    recorder.record(rec)  # and again in a later one
    await recorder.flush()
    await recorder.close()
    assert len(await stored(engine, account)) == 1
    for width in (MINUTE, HOUR, DAY):
        assert list((await rollup_sums(engine, account, width)).values()) == [
            (1, 7, 3, 0, 0, 0, 12.5, 1, 1)
        ]


async def test_text_too_long_or_with_nul_is_stored_clipped(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """No value can make a batch fail for good: text is cut to its column (PostgreSQL would
    refuse it) and loses its NUL characters (PostgreSQL text cannot hold one), in the raw
    row and in the rollups alike; the other records of the batch land as they are."""
    account = new_account()
    model = "m\x00" + "x" * (MODEL_LEN + 50)
    odd = make_record(
        account_id=account,
        model=model,
        error_code="e" * (ERROR_CODE_LEN + 1),
        conversation_id="conv_\x00\\u0000",  # a NUL, and the text of an escaped one
        status=500,
    )
    plain = make_record(account_id=account)
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600)
    recorder.record(odd)
    recorder.record(plain)
    await recorder.flush()
    await recorder.close()
    assert recorder.written == 2
    rows = {row.request_id: row for row in await stored(engine, account)}
    clipped = model.replace("\x00", "")[:MODEL_LEN]
    assert rows[odd.request_id].model == clipped
    assert rows[odd.request_id].error_code == "e" * ERROR_CODE_LEN
    assert rows[odd.request_id].conversation_id == "conv_\\u0000"
    assert rows[plain.request_id].model == plain.model
    sums = await rollup_sums(engine, account, MINUTE)
    assert {key[-2] for key in sums} == {clipped, plain.model}, sums


async def test_a_record_the_database_refuses_does_not_hold_up_the_others(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """A value out of its column's range (2**40 tokens in an INTEGER), however it got into a
    record: on PostgreSQL that record alone is dropped, logged and counted, the 19 others of
    its batch are stored, nothing is spooled and the recorder goes on writing; spooled, the
    record would have failed every later flush and kept everything after it out. SQLite
    stores any integer: all 20 land."""
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600)
    records = [make_record(account_id=account, prompt_tokens=i) for i in range(20)]
    records[13] = make_record(account_id=account, prompt_tokens=2**40)
    for rec in records:
        recorder.record(rec)
    await recorder.flush()
    postgres = engine.dialect.name == "postgresql"
    assert recorder.spool_size == 0
    assert recorder.rejected == (1 if postgres else 0)
    assert recorder.written == (19 if postgres else 20)
    later = make_record(account_id=account, prompt_tokens=5)
    recorder.record(later)
    await recorder.flush()
    await recorder.close()
    stored_ids = {row.request_id for row in await stored(engine, account)}
    wanted = {r.request_id for r in [*records, later]}
    if postgres:
        wanted.discard(records[13].request_id)
    assert stored_ids == wanted
    day = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in day.values()) == len(wanted)


async def test_rollups_equal_raw_sums(engine: AsyncEngine, spool_dir: Path) -> None:
    account = new_account()
    rng = random.Random(5)
    base = 1_767_225_600 - 3 * DAY  # spans several days, hours and minutes
    records = [
        make_record(
            account_id=account,
            key_id=rng.choice(["key_a", "key_b", None]),
            model=rng.choice(["gpt-test", "gpt-other", ""]),
            endpoint=rng.choice(["chat.completions", "embeddings"]),
            created_at=base + rng.uniform(0, 3 * DAY),
            prompt_tokens=rng.randint(0, 900),
            completion_tokens=rng.randint(0, 300),
            cost=round(rng.uniform(0, 0.01), 6),
            status=rng.choice([200, 200, 200, 429, 502, 401]),
            latency_ms=rng.randint(1, 40_000) / 4,  # quarters add up exactly in any order
            admitted=rng.random() < 0.7,
        )
        for _ in range(700)
    ]
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600, batch_size=128)
    for rec in records:
        recorder.record(rec)
    await recorder.close()
    for width in (MINUTE, HOUR, DAY):
        got, want = await rollup_sums(engine, account, width), expected_sums(records, width)
        assert got.keys() == want.keys()
        assert got == want  # costs too: whole nano-dollars add up exactly


async def test_concurrent_writers_upsert_the_same_rollups(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """Four recorders (four processes' worth) flush at once into the same rollup rows, each
    batch in its own order: nothing deadlocks or goes to the spool, and the sums are exact
    (the rollup rows are written in primary-key order by every writer)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("one process writes a SQLite file")
    account = new_account()
    rng = random.Random(11)
    base = 1_767_225_600
    recorders = [
        UsageRecorder(engine, spool_dir / str(n), flush_interval=3600, batch_size=150)
        for n in range(4)
    ]
    records: list[UsageRecord] = []
    for _ in range(3):
        for recorder in recorders:
            batch = [
                make_record(
                    account_id=account,
                    key_id=rng.choice(["key_a", "key_b", "key_c"]),
                    model=rng.choice(["gpt-test", "gpt-other"]),
                    created_at=base + rng.uniform(0, 600),
                )
                for _ in range(300)
            ]
            rng.shuffle(batch)
            records += batch
            for rec in batch:
                recorder.record(rec)
        await asyncio.gather(*(recorder.flush() for recorder in recorders))
    for recorder in recorders:
        assert recorder.spool_size == 0 and recorder.dropped == 0
        await recorder.close()
    assert sum(r.written for r in recorders) == len(records)
    for width in (MINUTE, HOUR, DAY):
        assert await rollup_sums(engine, account, width) == expected_sums(records, width)


async def test_close_flushes_everything(engine: AsyncEngine, spool_dir: Path) -> None:
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=3600, batch_size=100)
    recorder.start()
    for _ in range(450):
        recorder.record(make_record(account_id=account))
    await recorder.close()  # no flush_interval has passed: close() must write them all
    assert len(await stored(engine, account)) == 450
    assert recorder.queue_depth == 0 and recorder.spool_size == 0


async def test_background_flush_by_time(engine: AsyncEngine, spool_dir: Path) -> None:
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=0.05)
    recorder.start()
    try:
        for _ in range(3):
            recorder.record(make_record(account_id=account))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(await stored(engine, account)) == 3:
                break
        assert len(await stored(engine, account)) == 3
    finally:
        await recorder.close()


async def test_full_queue_drops_and_counts(engine: AsyncEngine, spool_dir: Path) -> None:
    recorder = UsageRecorder(engine, spool_dir, max_queue=5)
    for _ in range(8):
        recorder.record(make_record(account_id=new_account()))
    assert recorder.queue_depth == 5
    assert recorder.dropped == 3
    await recorder.close()


async def test_prune_keeps_rollups(engine: AsyncEngine, spool_dir: Path) -> None:
    account = new_account()
    old = [make_record(account_id=account, created_at=time.time() - 40 * DAY) for _ in range(3)]
    new = [make_record(account_id=account) for _ in range(2)]
    recorder = UsageRecorder(engine, spool_dir)
    for rec in old + new:
        recorder.record(rec)
    await recorder.flush()
    assert await recorder.prune(30 * DAY) >= 3
    assert {r.request_id for r in await stored(engine, account)} == {r.request_id for r in new}
    assert sum(v[0] for v in (await rollup_sums(engine, account, DAY)).values()) == 5
    await recorder.close()


async def _old_rows(engine: AsyncEngine, older_than: float) -> int:
    async with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(
            usage_records.c.created_at < int(time.time() - older_than)
        )
        return int((await conn.execute(query)).scalar_one())


async def test_prune_deletes_a_slice_of_time_a_transaction(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """Old records in five hours two hours apart (and whatever old ones other tests left),
    pruned an hour a transaction: one DELETE per hour that holds records, skipping the empty
    ones between; the new records stay."""
    account = new_account()
    base = time.time() - 40 * DAY
    old = [
        make_record(account_id=account, created_at=base - hour * 7200 - i)
        for hour in range(5)
        for i in range(3)
    ]
    new = [make_record(account_id=account) for _ in range(4)]
    recorder = UsageRecorder(engine, spool_dir)
    for rec in old + new:
        recorder.record(rec)
    await recorder.flush()
    before = await _old_rows(engine, 30 * DAY)
    with Statements(engine) as sql:
        removed = await recorder.prune(30 * DAY, slice_seconds=3600)
    assert removed == before >= 15
    deletes = [s for s in sql.sent if s.lstrip().upper().startswith("DELETE")]
    assert 5 <= len(deletes) <= 5 + (before - 15)  # never one for an empty hour
    assert {r.request_id for r in await stored(engine, account)} == {r.request_id for r in new}
    await recorder.close()


async def test_processes_pruning_at_once_share_the_work(
    engine: AsyncEngine, database_url: str, spool_dir: Path, tmp_path: Path
) -> None:
    """Two recorders on two engines (two processes' pools) prune the same old records at once:
    neither fails, and between them (and a prune after, for what one that stopped short left)
    every old row goes, counted once."""
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir)
    base = time.time() - 40 * DAY
    for i in range(60):
        recorder.record(make_record(account_id=account, created_at=base - i * 600))
    await recorder.flush()
    before = await _old_rows(engine, 30 * DAY)
    other_engine = create_engine(settings_for(database_url, tmp_path / "other"))
    other = UsageRecorder(other_engine, tmp_path / "other-spool")
    try:
        mine, theirs = await asyncio.gather(
            recorder.prune(30 * DAY, slice_seconds=1200), other.prune(30 * DAY, slice_seconds=1200)
        )
        rest = await recorder.prune(30 * DAY)  # what a prune that stopped short left
        assert mine + theirs + rest == before >= 60
        assert await _old_rows(engine, 30 * DAY) == 0
    finally:
        await other.close()
        await other_engine.dispose()
        await recorder.close()


# -- outages ---------------------------------------------------------------------------------


@pytest.fixture
async def dead_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine for a PostgreSQL port nothing listens on."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    eng = create_engine(settings_for(url, tmp_path / "dead"))
    yield eng
    await eng.dispose()


async def test_unreachable_database_spools_then_another_recorder_replays(
    engine: AsyncEngine, dead_engine: AsyncEngine, spool_dir: Path
) -> None:
    account = new_account()
    records = [make_record(account_id=account) for _ in range(25)]
    down = UsageRecorder(dead_engine, spool_dir, flush_interval=3600, db_timeout=5)
    for rec in records:
        down.record(rec)  # never raises, never waits
    await down.flush()
    assert down.queue_depth == 0
    assert down.spool_size == 25 == spooled_lines(spool_dir)
    await down.close()  # the graceful stop of a process whose database is down
    assert spooled_lines(spool_dir) == 25

    # Another process (or this one restarted) finds the orphan spool and replays it.
    up = UsageRecorder(engine, spool_dir, flush_interval=3600)
    await up.flush()
    assert len(await stored(engine, account)) == 25
    assert spooled_lines(spool_dir) == 0
    await up.flush()  # nothing left to replay twice
    assert sum(v[0] for v in (await rollup_sums(engine, account, MINUTE)).values()) == 25
    await up.close()


async def test_replay_after_partial_success_counts_each_record_once(
    engine: AsyncEngine, dead_engine: AsyncEngine, spool_dir: Path
) -> None:
    account = new_account()
    records = [make_record(account_id=account, prompt_tokens=i) for i in range(10)]
    down = UsageRecorder(dead_engine, spool_dir, flush_interval=3600, db_timeout=5)
    for rec in records:
        down.record(rec)
    await down.close()
    async with engine.begin() as conn:  # half of the spool made it in before the outage hit
        assert await write_batch(conn, records[:5]) == 5
    up = UsageRecorder(engine, spool_dir)
    await up.flush()
    await up.close()
    assert len(await stored(engine, account)) == 10
    sums = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in sums.values()) == 10
    assert sum(v[1] for v in sums.values()) == sum(range(10))


async def test_torn_spool_line_is_skipped(
    engine: AsyncEngine, dead_engine: AsyncEngine, spool_dir: Path
) -> None:
    account = new_account()
    down = UsageRecorder(dead_engine, spool_dir, flush_interval=3600, db_timeout=5)
    for _ in range(3):
        down.record(make_record(account_id=account))
    await down.close()
    (path,) = spool_dir.glob("usage-*.spool")
    with open(path, "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"request_id": "req_torn", "created_')
    up = UsageRecorder(engine, spool_dir)
    await up.flush()
    await up.close()
    assert len(await stored(engine, account)) == 3
    assert not list(spool_dir.glob("usage-*.spool"))


async def test_a_line_spooled_before_admitted_was_recorded_replays(
    engine: AsyncEngine, dead_engine: AsyncEngine, spool_dir: Path
) -> None:
    """A spool written by a version that did not record ``admitted`` (an upgrade during a
    database outage) replays as the rollups of then read it: admitted unless a 429."""
    account = new_account()
    down = UsageRecorder(dead_engine, spool_dir, flush_interval=3600, db_timeout=5)
    for status in (200, 429, 400):
        down.record(make_record(account_id=account, status=status, admitted=False))
    await down.close()
    (path,) = spool_dir.glob("usage-*.spool")
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    old = [{k: v for k, v in ln.items() if k != "admitted"} for ln in lines]
    path.write_bytes(b"".join(orjson.dumps(ln) + b"\n" for ln in old))
    up = UsageRecorder(engine, spool_dir)
    await up.flush()
    await up.close()
    rows = await stored(engine, account)
    assert sorted((r.status, r.admitted) for r in rows) == [(200, True), (400, True), (429, False)]
    (sums,) = (await rollup_sums(engine, account, DAY)).values()
    assert sums[0] == 3 and sums[8] == 2


async def test_live_recorders_spool_is_not_taken(
    dead_engine: AsyncEngine, engine: AsyncEngine, spool_dir: Path
) -> None:
    """Two processes share a spool directory: a live one's file is left to its owner."""
    account = new_account()
    down = UsageRecorder(dead_engine, spool_dir, flush_interval=3600, db_timeout=5)
    down.record(make_record(account_id=account))
    await down.flush()  # spooled, and its file stays locked: this recorder is alive
    other = UsageRecorder(engine, spool_dir)
    await other.flush()
    assert await stored(engine, account) == []
    await down.close()
    await other.close()


async def test_postgres_stopped_and_started(own_pg: PgServer, tmp_path: Path) -> None:
    """A real outage: the server is stopped mid-run, records keep coming, and after it is
    back every record is in the database exactly once."""
    eng = create_engine(settings_for(own_pg.url, tmp_path / "data"))
    spool_dir = tmp_path / "spool"
    account = new_account()
    recorder = UsageRecorder(eng, spool_dir, flush_interval=0.05, db_timeout=5, max_backoff=0.2)
    try:
        await migrate(eng)
        recorder.start()
        before = [make_record(account_id=account) for _ in range(100)]
        for rec in before:
            recorder.record(rec)
        await recorder.flush()

        await asyncio.to_thread(own_pg.stop)
        during = [make_record(account_id=account) for _ in range(300)]
        for i, rec in enumerate(during):
            recorder.record(rec)
            if i % 50 == 0:
                await asyncio.sleep(0.06)  # let the flusher run into the outage
        await recorder.flush()
        assert recorder.spool_size == 300
        assert spooled_lines(spool_dir) == 300

        await asyncio.to_thread(own_pg.start)
        after = [make_record(account_id=account) for _ in range(50)]
        for rec in after:
            recorder.record(rec)
        for _ in range(200):  # the flusher notices on its own and replays the spool
            if recorder.spool_size == 0 and recorder.queue_depth == 0:
                break
            await asyncio.sleep(0.05)
        assert recorder.spool_size == 0 and recorder.queue_depth == 0
        await recorder.close()
        assert recorder.spool_size == 0 and spooled_lines(spool_dir) == 0
        rows = await stored(eng, account)
        ids = Counter(r.request_id for r in rows)
        assert len(ids) == 450 and set(ids.values()) == {1}
        assert ids.keys() == {r.request_id for r in before + during + after}
        sums = await rollup_sums(eng, account, HOUR)
        assert sum(v[0] for v in sums.values()) == 450
    finally:
        await eng.dispose()


async def test_concurrent_producers_with_the_flusher_running(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """1,000 records from 100 concurrent tasks while the flusher runs: all stored, once."""
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir, flush_interval=0.01, batch_size=64)
    recorder.start()
    rng = random.Random(1)
    made: list[UsageRecord] = []

    async def producer() -> None:
        for _ in range(10):
            rec = make_record(account_id=account, prompt_tokens=rng.randint(1, 99))
            made.append(rec)
            recorder.record(rec)
            await asyncio.sleep(rng.uniform(0, 0.01))

    await asyncio.gather(*(producer() for _ in range(100)))
    await recorder.close()
    assert len(await stored(engine, account)) == 1_000
    sums = await rollup_sums(engine, account, DAY)
    assert sum(v[0] for v in sums.values()) == 1_000
    assert sum(v[1] for v in sums.values()) == sum(r.prompt_tokens for r in made)


async def test_a_record_after_close_is_spooled_not_lost(
    engine: AsyncEngine, spool_dir: Path
) -> None:
    """A handler finishing during shutdown, after the recorder closed: its record survives."""
    account = new_account()
    recorder = UsageRecorder(engine, spool_dir)
    recorder.start()
    await recorder.close()
    recorder.record(make_record(account_id=account))
    assert recorder.spool_size == 1 == spooled_lines(spool_dir)
    await recorder.close()  # idempotent; lets go of the spool file as a process exit would
    restarted = UsageRecorder(engine, spool_dir)
    await restarted.flush()
    await restarted.close()
    assert len(await stored(engine, account)) == 1


async def test_a_long_spool_drains_over_several_flushes(
    engine: AsyncEngine, dead_engine: AsyncEngine, spool_dir: Path
) -> None:
    """Replay is bounded per flush (new records keep flowing) and resumes where it stopped."""
    account = new_account()
    down = UsageRecorder(dead_engine, spool_dir, db_timeout=5)
    for _ in range(20):
        down.record(make_record(account_id=account))
    await down.close()
    up = UsageRecorder(engine, spool_dir, batch_size=3, replay_budget=7)
    await up.flush()
    assert len(await stored(engine, account)) == 7
    assert up.spool_size == 13
    for _ in range(3):
        await up.flush()
    assert len(await stored(engine, account)) == 20
    assert up.spool_size == 0 and not list(spool_dir.glob("usage-*.spool"))
    await up.close()


async def test_sqlite_held_by_another_writer_past_db_timeout_is_written_once_free(
    tmp_path: Path,
) -> None:
    """QA: on SQLite, a batch waiting on another writer's lock longer than ``db_timeout`` was
    cancelled mid-statement, while aiosqlite's thread went on waiting: it took the lock once
    free and never gave it back (an insert ... RETURNING left unread). Usage was spooled and
    never written again, and the CLI could not revoke a key, until a restart. On SQLite the
    wait is bounded by SQLite's own busy timeout (30 s) instead, which ends the statement."""
    engine = create_engine(settings_for("", tmp_path / "data"))
    await migrate(engine)
    path = str(tmp_path / "data" / "chatgate.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    recorder = UsageRecorder(engine, tmp_path / "spool", flush_interval=3600, db_timeout=0.2)
    account = new_account()
    try:
        recorder.record(make_record(account_id=account))
        flushing = asyncio.create_task(recorder.flush())
        await asyncio.sleep(1.0)  # well past db_timeout, within the busy timeout
        holder.execute("ROLLBACK")
        await flushing
        other = sqlite3.connect(path, timeout=2, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # the database is free: "database is locked" before
            other.execute("ROLLBACK")
        finally:
            other.close()
        await recorder.flush()
        assert len(await stored(engine, account)) == 1
    finally:
        holder.close()
        await recorder.close()
        await engine.dispose()
