"""Same-run A/B of chatgate configurations and source trees: the tool behind a "this change
saves N us a request" claim.

    .venv/bin/python bench/ab.py                                  # the four configurations
    .venv/bin/python bench/ab.py --config all --tree new=. --tree old=/tmp/old-worktree

Each target (a configuration of one source tree) is one gateway process on the gateway core,
with the fake upstream, wrk and the benchmark's own PostgreSQL on the other core, as in
bench/run.py. A tree is put first on the gateway's ``PYTHONPATH`` (a ``git worktree add`` of
another commit, say), so two versions of the code run side by side against the same peers.
Rounds alternate the order of the targets; each figure is the median of the rounds, and the
ratios are to the first target. The machine is noisy: trust a difference only when it holds
in both the requests/s and the CPU per request, and rerun once before believing it.

Configurations (JSON, wrk at 32 connections):
  bare     a key on a plan without limits, usage recording off (bench/run.py's bare)
  usage    the same key, usage recording on (PostgreSQL) and metrics
  limits   in-process limits on every check, usage recording off
  all      limits and usage recording (bench/run.py's limits-mem)
  redis    limits in Redis (a redis-server of the tool's own), usage recording off
  all-redis  limits in Redis and usage recording (bench/run.py's limits-redis)
  budget-redis  redis, and a monthly budget on the plan (taken in the same call)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import peers  # noqa: E402
from run import (  # noqa: E402
    BODY,
    STREAM_BODY,
    Target,
    add_halt_poll_arg,
    in_rounds,
    key_for,
    open_loop,
    pg_cpu_seconds,
    start_fake_upstream,
    start_gateway,
    wrk,
)

BENCH_REDIS = "bench-redis"
"""Stands for the URL of the Redis that :func:`with_redis` starts, in a configuration."""

CONFIGS: dict[str, tuple[dict[str, str], bool | dict[str, int]]] = {
    "bare": ({"CHATGATE_USAGE_ENABLED": "0"}, False),
    "usage": ({}, False),
    "limits": ({"CHATGATE_USAGE_ENABLED": "0"}, True),
    "all": ({}, True),
    "redis": ({"CHATGATE_USAGE_ENABLED": "0", "CHATGATE_REDIS_URL": BENCH_REDIS}, True),
    "all-redis": ({"CHATGATE_REDIS_URL": BENCH_REDIS}, True),
    "budget-redis": (
        {"CHATGATE_USAGE_ENABLED": "0", "CHATGATE_REDIS_URL": BENCH_REDIS},
        {**memory.PLAN_LIMITS, "monthly_budget_cents": 900_000_000},
    ),
}

Spec = tuple[str, dict[str, str], bool | dict[str, int]]


@dataclass
class Peers:
    """What a benchmark tool's gateways talk to (see :func:`bench_peers`)."""

    work: Path  # a temp folder, removed on exit
    upstream: Any  # the fake upstream (tests.helpers.Upstream)
    pg_url: str  # the benchmark's own PostgreSQL
    specs: list[Spec]  # the targets, the benchmark's Redis URL filled in
    pg_server: Any  # that PostgreSQL (tests.usage.pgserver.PgServer)


@contextlib.contextmanager
def bench_peers(prefix: str, specs: list[Spec]) -> Iterator[Peers]:
    """A temp folder, the fake upstream and PostgreSQL on the other core, and the benchmark's
    Redis when a configuration names it (:func:`with_redis`): what ab.py, instr.py and
    opcodes.py start around their gateways, all stopped and removed on the way out."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    stack = contextlib.ExitStack()
    try:
        upstream = start_fake_upstream(work)
        stack.callback(upstream.proc.wait, 20)
        stack.callback(upstream.proc.terminate)
        pg_server = peers.start_pg()
        stack.callback(pg_server.close)
        resolved = stack.enter_context(with_redis(work, specs))
        yield Peers(work, upstream, pg_server.url, resolved, pg_server)
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def with_redis(work: Path, specs: list[Spec]) -> Iterator[list[Spec]]:
    """``specs`` with a Redis of the benchmark's own (on the other core, as bench/run.py's)
    in place of :data:`BENCH_REDIS`: started only when a configuration names it."""
    if not any(env.get("CHATGATE_REDIS_URL") == BENCH_REDIS for _, env, _ in specs):
        yield specs
        return
    server, url = peers.start_redis(work)
    try:
        yield [
            (name, {**env, "CHATGATE_REDIS_URL": url}, limited)
            if env.get("CHATGATE_REDIS_URL") == BENCH_REDIS
            else (name, env, limited)
            for name, env, limited in specs
        ]
    finally:
        server.stop()


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--tree``: what :func:`target_specs` reads."""
    parser.add_argument("--config", default="bare,usage,limits,all", help="comma-separated")
    parser.add_argument(
        "--tree", action="append", default=[], help="NAME=PATH, first on PYTHONPATH (repeat)"
    )


def target_specs(args: argparse.Namespace) -> list[Spec]:
    """(name, gateway environment, limited key) per tree x configuration, in that order."""
    specs = []
    for tree in args.tree or [""]:
        tree_name, _, path = tree.partition("=")
        for config in args.config.split(","):
            env, limited = CONFIGS[config]
            if path:
                env = {**env, "PYTHONPATH": str(Path(path).resolve())}
            specs.append((f"{tree_name}:{config}" if tree_name else config, env, limited))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_target_args(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sse", action="store_true", help="20-chunk streams instead of JSON")
    parser.add_argument(
        "--rate", type=float, help="open loop at this many requests/s instead of wrk"
    )
    parser.add_argument(
        "--db",
        action="store_true",
        help="also the database's CPU a request (each run then waits for the last usage batch)",
    )
    add_halt_poll_arg(parser)
    args = parser.parse_args()
    body = STREAM_BODY if args.sse else BODY

    gateways = []
    with (
        peers.halt_polling(args.halt_poll_ns),
        bench_peers("chatgate-ab-", target_specs(args)) as bench,
    ):
        try:
            targets: list[Target] = []
            for name, env, limited in bench.specs:
                workdir = bench.work / name.replace(":", "-")
                gw = start_gateway(workdir, bench.upstream, bench.pg_url, env)
                gateways.append(gw)
                assert gw.proc is not None
                url = gw.url + "/v1/chat/completions"
                targets.append(Target(name, url, key_for(gw, limited), gw.proc.pid))
            for t in targets:
                peers.post_ok(t.url, t.key, BODY)
                wrk(t.url, t.key, body, args.connections, 1)  # warm-up
            conns, secs, rate = args.connections, args.seconds, args.rate
            run = (
                (lambda url, key, b: open_loop(url, key, b, rate, secs))
                if rate
                else (lambda url, key, b: wrk(url, key, b, conns, secs))
            )
            if args.db:
                run = with_db_cpu(run, bench.pg_server)
            load = f"{rate:g}/s" if rate else f"{conns} conn"
            samples = in_rounds(targets, args.rounds, load, body, run)
        finally:
            for gw in gateways:
                gw.stop()
    report(targets, samples)


FLUSH_SETTLE = 1.5
"""Seconds a run waits after its load for the gateway's last usage batch (flushed every
second) to be written, so the database's work lands in the run that caused it."""


def with_db_cpu(run: Any, pg_server: Any) -> Any:
    """``run``, also measuring the benchmark's PostgreSQL: its CPU (all its processes) from
    the start of the load until :data:`FLUSH_SETTLE` after, per request answered."""

    def measured(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        before = pg_cpu_seconds(pg_server)
        result: dict[str, Any] = run(url, key, body)
        time.sleep(FLUSH_SETTLE)
        used = pg_cpu_seconds(pg_server) - before
        result["db_us_per_req"] = used * 1e6 / max(result["requests"], 1)
        return result

    return measured


def report(targets: list[Target], samples: dict[str, list[dict[str, Any]]]) -> None:
    first = targets[0].name
    base_rps = statistics.median(s["rps"] for s in samples[first])
    base_cpu = statistics.median(s["cpu_ms_per_req"] for s in samples[first])
    print(
        f"{'target':<20}{'rps':>9}{'us/req':>9}{'rps x':>8}{'cpu x':>8}{'p50 ms':>8}{'p99 ms':>8}"
        "  rounds (rps)"
    )
    for t in targets:
        rows = samples[t.name]
        rps = statistics.median(s["rps"] for s in rows)
        cpu = statistics.median(s["cpu_ms_per_req"] for s in rows)
        p50 = statistics.median(s["p50_ms"] for s in rows)
        p99 = statistics.median(s["p99_ms"] for s in rows)
        each = " ".join(f"{s['rps']:.0f}" for s in rows)
        errors = sum(s["errors"] for s in rows)
        db = (
            f"  db {statistics.median(s['db_us_per_req'] for s in rows):.1f} us/req"
            if "db_us_per_req" in rows[0]
            else ""
        )
        print(
            f"{t.name:<20}{rps:>9.0f}{cpu * 1000:>9.1f}{rps / base_rps:>8.3f}"
            f"{cpu / base_cpu:>8.3f}{p50:>8.2f}{p99:>8.2f}  {each}{db}"
            + (f"  ERRORS {errors}" if errors else "")
        )


if __name__ == "__main__":
    main()
