"""What one batch of usage records costs, on both sides of the wire: the writer's own CPU (the
gateway's, in a real deployment) and the PostgreSQL backend's, per batch, for the two ways
``chatgate/usage/batch.py`` writes a batch: ``COPY`` (the usual one) and the general statement
(taken when the ``COPY`` refuses a batch); and ``COPY`` once more with request ids that are
random instead of time-ordered (``chatgate.ids.ordered_id``), as they were before. Beside them,
for scale, what handing the same batch to another process would cost this one (``hand-off``:
each record as a tuple of its fields, the batch pickled; a writer process of its own would take
the rest off the event loop).

    .venv/bin/python bench/usage_batch.py [--batches 140] [--size 500] [--rounds 3]
    .venv/bin/python bench/usage_batch.py --hold [--size 2000] [--batches 20]

The benchmark's own PostgreSQL (bench/peers.py: on the other core); this process on the gateway
core. The backend's CPU is read from ``/proc/<pid>/stat`` of the connection's backend process,
so it counts the whole transaction (parse, execution, commit), not only the statement's time.
Rounds alternate the two ways; the machine is noisy, so compare within a round.

``--hold``: instead, the longest time a batch keeps the event loop from anything else (a task
beside it that only yields, timing its own turns), per batch of ``--size`` and of 500, median
and 90th percentile over ``--batches``: what a request arriving during a flush can wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from chatgate.ids import new_id  # noqa: E402
from chatgate.usage import batch  # noqa: E402
from chatgate.usage.record import UsageRecord  # noqa: E402
from tests.usage.factory import make_record  # noqa: E402


def records(n: int, start: float, ids: str) -> list[UsageRecord]:
    """A benchmark-like batch: one account, key and model (the tests' record), fresh ids
    (time-ordered, as the gateway makes them, or random)."""
    return [
        make_record(created_at=start + i * 0.0003, cost=0.00001)
        if ids == "ordered"
        else make_record(created_at=start + i * 0.0003, cost=0.00001, request_id=new_id("req"))
        for i in range(n)
    ]


async def general_only(conn: Any, rows: Any) -> None:
    """Stands in for ``batch._copy_pg`` refusing every batch: the general statement writes."""
    return None


async def measure(url: str, batches: int, size: int, rounds: int) -> None:
    engine = await peers.migrated_engine(url)
    copy = batch._copy_pg
    print(f"{'way':<17}{'writer ms':>11}{'backend ms':>12}{'wall ms':>9}   a batch of {size}")
    ways = (("copy", copy, "ordered"), ("copy random-ids", copy, "random"))
    ways += (("statement", general_only, "ordered"),)
    fields = operator.attrgetter(*UsageRecord.__slots__)
    try:
        for _ in range(rounds):
            work = [records(size, time.time() + i * 0.15, "ordered") for i in range(batches)]
            mine = time.process_time()
            for recs in work:
                pickle.dumps([fields(r) for r in recs], pickle.HIGHEST_PROTOCOL)
            mine = (time.process_time() - mine) * 1000 / batches
            print(f"{'hand-off':<17}{mine:>11.2f}{0:>12.2f}{mine:>9.2f}", flush=True)
            for name, way, ids in ways:
                batch._copy_pg = way  # type: ignore[assignment]
                start = time.time()
                work = [records(size, start + i * 0.15, ids) for i in range(batches + 20)]
                async with engine.begin() as conn:
                    pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
                for recs in work[:20]:  # warm: the pool's one connection, its caches
                    async with engine.begin() as conn:
                        await batch.write_batch(conn, recs)
                mine, theirs, wall = (
                    time.process_time(),
                    peers.tree_cpu_seconds(pid),
                    time.perf_counter(),
                )
                for recs in work[20:]:
                    async with engine.begin() as conn:
                        await batch.write_batch(conn, recs)
                per = 1000 / batches
                print(
                    f"{name:<17}{(time.process_time() - mine) * per:>11.2f}"
                    f"{(peers.tree_cpu_seconds(pid) - theirs) * per:>12.2f}"
                    f"{(time.perf_counter() - wall) * per:>9.2f}",
                    flush=True,
                )
    finally:
        batch._copy_pg = copy  # type: ignore[assignment]
        await engine.dispose()


async def hold(url: str, batches: int, size: int) -> None:
    engine = await peers.migrated_engine(url)
    longest = [0.0]
    done = False

    async def beside() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    task = asyncio.create_task(beside())
    start = time.time()
    try:
        for n in sorted({500, size}) * 2:
            holds = []
            for i in range(batches):
                recs = records(n, start + i * 0.15, "ordered")
                await asyncio.sleep(0)
                await asyncio.sleep(0)  # the records' making is not the batch's hold
                longest[0] = 0.0
                async with engine.begin() as conn:
                    await batch.write_batch(conn, recs)
                holds.append(longest[0] * 1000)
            holds.sort()
            print(
                f"batch of {n:>5}: longest hold of the event loop, median "
                f"{holds[len(holds) // 2]:.2f} ms, p90 {holds[len(holds) * 9 // 10]:.2f} ms",
                flush=True,
            )
            start += batches
    finally:
        done = True
        await task
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=140)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="the event loop's longest hold")
    args = parser.parse_args()
    subprocess.run(["taskset", "-pc", peers.GATEWAY_CORE, str(os.getpid())], capture_output=True)
    server = peers.start_pg()
    try:
        if args.hold:
            asyncio.run(hold(server.url, args.batches, args.size))
        else:
            asyncio.run(measure(server.url, args.batches, args.size, args.rounds))
    finally:
        server.close()


if __name__ == "__main__":
    main()
