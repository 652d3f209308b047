"""What pruning old usage records costs: ``UsageRecorder.prune`` (a slice of time a transaction)
against one ``DELETE`` of everything older than the cutoff, and how long a stop waits for a
prune under way.

    .venv/bin/python bench/prune.py [--rows 1000000] [--keep 3] [--rounds 2]

The benchmark's own PostgreSQL (bench/peers.py). Each round stores ``rows`` old records (50 a
second: 5.5 hours for a million) in a table that keeps ``keep`` times as many newer ones, then
deletes the old ones each way in turn; figures are wall seconds of the whole prune.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

from chatgate.usage.recorder import UsageRecorder  # noqa: E402
from chatgate.usage.tables import usage_records  # noqa: E402

OLD, NEW = 1_700_000_000, 1_800_000_000  # the two groups' first second
CUTOFF = 1_750_000_000


async def store(engine: AsyncEngine, first: int, rows: int) -> None:
    """``rows`` records from second ``first`` on, 50 a second, time-ordered ids."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO usage_records SELECT 'req_' || lpad(to_hex($1::bigint * 1000 + g), 12,"
            " '0') || substr(md5(g::text), 1, 16), $1::bigint + g / 50, 'acct_bench',"
            " 'key_bench', 'gpt-test', 'openai_compat', 'chat.completions', 10, 5, 100, 1.5,"
            " NULL, 200, NULL, NULL, false FROM generate_series(1, $2::int) g",
            (first, rows),
        )
    async with engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.exec_driver_sql("ANALYZE usage_records")


async def one_delete(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        result = await conn.execute(
            usage_records.delete().where(usage_records.c.created_at < CUTOFF)
        )
    return int(result.rowcount)


async def measure(url: str, rows: int, keep: int, rounds: int, workdir: Path) -> None:
    engine = await peers.migrated_engine(url)
    await store(engine, NEW, keep * rows)
    recorder = UsageRecorder(engine, workdir / "spool")
    retention = time.time() - CUTOFF  # older than that: the old group
    print(f"{'way':<16}{'rows':>10}{'seconds':>9}   ({keep * rows:,} newer rows kept)")
    try:
        for _ in range(rounds):
            for name, prune in (
                ("one DELETE", lambda: one_delete(engine)),
                ("prune (slices)", lambda: recorder.prune(retention)),
            ):
                await store(engine, OLD, rows)
                start = time.perf_counter()
                removed = await prune()
                print(f"{name:<16}{removed:>10,}{time.perf_counter() - start:>9.2f}", flush=True)
        await recorder.close()
        # A stop during a prune: the slice under way rolls back, the stop does not wait.
        await store(engine, OLD, rows)
        stopping = UsageRecorder(engine, workdir / "spool2", retention_seconds=retention)
        stopping.start()
        await asyncio.sleep(1.2)  # the first flush (after flush_interval) starts the prune
        start = time.perf_counter()
        await stopping.close()
        print(f"a stop during a prune took {time.perf_counter() - start:.3f} s")
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = peers.start_pg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(measure(server.url, args.rows, args.keep, args.rounds, Path(tmp)))
    finally:
        server.close()


if __name__ == "__main__":
    main()
