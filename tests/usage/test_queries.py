"""Reports from the rollups equal the raw records they summarise, for any window and grouping,
on SQLite and PostgreSQL; scoping by account; the raw export."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import timefmt
from chatgate.db.engine import create_engine, migrate
from chatgate.usage.queries import (
    cover,
    export_records,
    part_minutes,
    report,
    usage_rows,
    whole_minutes,
)
from chatgate.usage.record import UsageRecord
from chatgate.usage.recorder import UsageRecorder
from chatgate.usage.tables import DAY, HOUR, MINUTE, WIDTHS
from tests.usage.factory import make_record, new_account, settings_for

BASE = 1_767_225_600  # 2026-01-01T00:00Z


@given(
    start=st.integers(0, 10 * DAY),
    length=st.integers(0, 10 * DAY),
    max_width=st.sampled_from(WIDTHS),
)
def test_cover_tiles_the_range_exactly(start: int, length: int, max_width: int) -> None:
    end = start + length
    segments = cover(start, end, max_width)
    lo, hi = whole_minutes(start, end)
    position = lo
    for width, seg_lo, seg_hi in segments:  # in order, no gap, no overlap, aligned
        assert width <= max_width
        assert seg_lo == position and seg_lo < seg_hi
        assert seg_lo % width == 0 and seg_hi % width == 0
        position = seg_hi
    assert position == max(hi, lo)
    # The rest of the range, to the second, is the raw records' part-minutes.
    parts = part_minutes(start, end)
    covered = sum(h - lo_ for _, lo_, h in segments) + sum(b - a for a, b in parts)
    assert covered == max(0, end - start)
    assert all(b - a < MINUTE for a, b in parts) and len(parts) <= 2
    # Few rollup rows per group: at most 2x(23 hours + 59 minutes) around the whole days.
    if max_width == DAY:
        assert sum((h - lo_) // w for w, lo_, h in segments if w != DAY) <= 2 * (23 + 59)


def test_part_minutes_are_the_ends_outside_whole_minutes() -> None:
    """Rounded to whole minutes, ranges that met inside a minute both counted it (QA: two
    adjacent hours held one minute's 1,500 requests twice; then, rounding the ends down, two
    ranges meeting in the current minute). The part-minutes come from the raw records."""
    meet = BASE + 5 * HOUR + 30
    assert part_minutes(BASE, meet) == [(BASE + 5 * HOUR, meet)]
    assert part_minutes(meet, BASE + 6 * HOUR) == [(meet, BASE + 5 * HOUR + MINUTE)]
    assert part_minutes(BASE + 10, BASE + 50) == [(BASE + 10, BASE + 50)]
    assert part_minutes(BASE + 50, BASE + 70) == [(BASE + 50, BASE + 60), (BASE + 60, BASE + 70)]
    assert part_minutes(BASE, BASE + HOUR) == []


def raw_sums(records: list[UsageRecord], start: int, end: int) -> tuple[int, int, int, int]:
    inside = [r for r in records if start <= int(r.created_at) < end]
    return (
        len(inside),
        sum(r.prompt_tokens for r in inside),
        sum(r.completion_tokens for r in inside),
        sum(r.status >= 400 for r in inside),
    )


@pytest.fixture(scope="module")
async def shared_engine(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings_for(database_url, tmp_path_factory.mktemp("queries")))
    await migrate(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
def engine(shared_engine: AsyncEngine) -> AsyncEngine:
    return shared_engine


@pytest.fixture(scope="module")
async def dataset(
    shared_engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str, list[UsageRecord]]:
    """Two accounts' records over four days; returns (account a, account b, a's records).
    Read-only for the tests, so written once per database."""
    engine, tmp_path = shared_engine, tmp_path_factory.mktemp("queries-spool")
    rng = random.Random(11)
    a, b = new_account(), new_account()
    records = {
        acct: [
            make_record(
                account_id=acct,
                key_id=rng.choice([f"key_{acct[-4:]}1", f"key_{acct[-4:]}2"]),
                model=rng.choice(["gpt-test", "gpt-other"]),
                created_at=BASE + rng.uniform(0, 4 * DAY),
                prompt_tokens=rng.randint(1, 500),
                completion_tokens=rng.randint(0, 200),
                status=rng.choice([200, 200, 200, 429, 502]),
                cost=0.001,
            )
            for _ in range(400)
        ]
        for acct in (a, b)
    }
    recorder = UsageRecorder(engine, tmp_path / "spool", batch_size=250)
    for rec in records[a] + records[b]:
        recorder.record(rec)
    await recorder.close()
    return a, b, records[a]


async def test_any_window_equals_the_raw_sums(
    engine: AsyncEngine, dataset: tuple[str, str, list[UsageRecord]]
) -> None:
    a, _, records = dataset
    rng = random.Random(3)
    windows = [(BASE, BASE + 4 * DAY), (BASE + 7 * HOUR + 13, BASE + 2 * DAY + 5 * HOUR + 1)]
    windows += [
        tuple(sorted((BASE + rng.randint(0, 4 * DAY), BASE + rng.randint(0, 4 * DAY))))
        for _ in range(8)
    ]
    for start, end in windows:
        for width in WIDTHS:
            rows = await usage_rows(
                engine,
                start=start,
                end=end,
                group_by=["bucket"],
                bucket_width=width,
                account_id=a,
            )
            got = (
                sum(r.requests for r in rows),
                sum(r.prompt_tokens for r in rows),
                sum(r.completion_tokens for r in rows),
                sum(r.errors for r in rows),
            )
            assert got == raw_sums(records, start, end), (start, end, width)
            assert all(r.bucket_start is not None and r.bucket_start % width == 0 for r in rows)


async def test_hourly_buckets_by_model_and_key(
    engine: AsyncEngine, dataset: tuple[str, str, list[UsageRecord]]
) -> None:
    a, _, records = dataset
    start, end = BASE + 5 * HOUR, BASE + 30 * HOUR
    rows = await usage_rows(
        engine,
        start=start,
        end=end,
        group_by=["bucket", "model", "key"],
        bucket_width=HOUR,
        account_id=a,
    )
    want: dict[tuple[int, str, str], int] = defaultdict(int)
    for r in records:
        ts = int(r.created_at)
        if start <= ts < end:
            want[(ts - ts % HOUR, r.model, r.key_id or "")] += r.prompt_tokens
    got = {(r.bucket_start, r.model, r.key_id): r.prompt_tokens for r in rows}
    assert got == want


async def test_reports_are_scoped_to_the_account(
    engine: AsyncEngine, dataset: tuple[str, str, list[UsageRecord]]
) -> None:
    a, b, records = dataset
    start, end = BASE, BASE + 4 * DAY
    mine = await report(engine, start=start, end=end, by="key", account_id=a)
    assert {r.key_id for r in mine.rows} == {r.key_id for r in records}
    assert mine.totals.requests == len(records)
    assert mine.totals.rate_limited == sum(r.status == 429 for r in records)
    assert mine.totals.cost == pytest.approx(0.001 * len(records))
    by_day = await report(engine, start=start, end=end, by="day", account_id=a)
    assert [r.bucket_start for r in by_day.rows] == [BASE + i * DAY for i in range(4)]
    assert by_day.totals == mine.totals
    by_model = await report(engine, start=start, end=end, by="model", account_id=a)
    assert {r.model for r in by_model.rows} == {"gpt-test", "gpt-other"}
    assert by_model.totals == mine.totals
    # Another account's key as a filter matches nothing; all accounts sees both.
    other_key = next(
        r.key_id for r in (await report(engine, start=start, end=end, by="key", account_id=b)).rows
    )
    assert other_key is not None
    assert (
        await report(engine, start=start, end=end, by="day", account_id=a, key_id=other_key)
    ).rows == []
    everyone = await report(engine, start=start, end=end, by="day", account_id=None)
    assert everyone.totals.requests >= 2 * len(records)


async def test_export_pages_through_every_record(
    engine: AsyncEngine, dataset: tuple[str, str, list[UsageRecord]]
) -> None:
    a, _, records = dataset
    start, end = BASE + DAY, BASE + 3 * DAY
    exported = [
        row
        async for row in export_records(engine, start=start, end=end, account_id=a, page_size=37)
    ]
    want = sorted(
        (int(r.created_at), r.request_id) for r in records if start <= int(r.created_at) < end
    )
    assert [(r["created_at"], r["request_id"]) for r in exported] == want
    first = exported[0]
    assert first["account_id"] == a
    assert first["total_tokens"] == first["prompt_tokens"] + first["completion_tokens"]


async def test_a_report_ending_now_holds_this_seconds_records(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollups are read by whole minutes: a report whose end is the current whole second left
    out the minute starting then, whenever ``now`` fell on one (seen as 943 of 1,000 requests
    in the end-to-end test). ``until_now()`` ends past this second."""
    account = new_account()
    moment = BASE + 7 * DAY  # a whole minute
    recorder = UsageRecorder(engine, tmp_path / "spool")
    recorder.record(make_record(account_id=account, created_at=moment + 0.4))
    await recorder.close()
    monkeypatch.setattr(timefmt.time, "time", lambda: moment + 0.6)
    assert (
        await report(engine, start=moment - DAY, end=timefmt.now(), account_id=account)
    ).totals.requests == 0
    ending_now = await report(
        engine, start=moment - DAY, end=timefmt.until_now(), account_id=account
    )
    assert ending_now.totals.requests == 1
