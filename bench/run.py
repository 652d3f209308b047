"""The benchmark suite (issue 11): chatgate against the direct upstream, the bare-Python floor
and LiteLLM's proxy, in one run, with every ratio computed inside that run.

    make bench                              # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py [--seconds 5] [--no-litellm] [--no-memory]

Placement (2 cores): the process under test alone on core 0; the fake upstream, the load
generators, and the benchmark's own PostgreSQL and Redis on core 1 (taskset). CPU per request
is the tested process tree's own user+system time divided by the requests it answered.

Rows, for JSON and 20-chunk SSE:
  direct        load generator -> fake upstream (bench/fake_upstream.py)
  floor         granian RSGI + aiohttp client: auth, a token bucket, usage extraction
                (bench/floor.py, the yardstick; DESIGN.md "Server stack")
  floor-aiohttp the same floor served by aiohttp.web, chatgate's server stack: it tells apart
                what the server costs from what chatgate's own code costs
  bare          chatgate with auth only: a key on a plan without limits, usage recording off
  limits-mem    chatgate, all features: in-process limits (rpm, tpm, rpd, concurrency,
                monthly quota), usage recording (PostgreSQL), metrics, token counting
  limits-redis  the same with the limits in Redis (one Lua call per request: the admission,
                carrying the settlements of the requests finished before it)
  litellm       LiteLLM's proxy 1.105.7, one worker, master-key auth, its defaults
Loads: wrk at 32 connections (saturation) and at 1 (added latency), and an open-loop generator
at a fixed offered rate (bench/loadgen.py; 1,000 requests/s JSON, 300 streams/s SSE), each in
rounds that alternate the order of the rows, each figure the median of the rounds. Then: Redis
commands per request (INFO commandstats of the benchmark's own Redis), one worker vs two
(``serve --workers 2``), memory with 10,000 keys and 1,000 open streams (bench/memory.py),
and a py-spy profile of limits-mem under load. One table is printed; the figures go to
bench/results/bench-<date>.json and the profile to bench/results/profile-limits-mem-json.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import peers  # noqa: E402
from peers import GATEWAY_CORE, OTHER_CORE, Proc, pinned  # noqa: E402

from tests.helpers import Gateway, Upstream, free_port, make_gateway, wait_http  # noqa: E402

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
KINDS = {"json": BODY, "sse": STREAM_BODY}
RESULTS = ROOT / "bench" / "results"
MEMORY_BOUND_MB = 320  # the stated bound (docs/benchmarks.md): measured ~280 MB
RESULTS.mkdir(parents=True, exist_ok=True)
STALL_MODEL = """
[[models]]
name = "gpt-stall"
base_url = "{base}"
upstream_model = "stall-stream"
"""


# -- load generators ----------------------------------------------------------------------------


def wrk(url: str, key: str, body: dict[str, Any], connections: int, seconds: int) -> dict[str, Any]:
    """Closed loop: wrk on the other core, ``connections`` kept busy for ``seconds``."""
    env = {**os.environ, "BENCH_KEY": key, "BENCH_BODY": json.dumps(body)}
    cmd = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    cmd += ["-s", str(ROOT / "bench" / "wrk_post.lua"), url]
    out = subprocess.run(
        pinned(OTHER_CORE, cmd), env=env, capture_output=True, text=True, check=True
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    lat = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"\s+(50|99)%\s+([\d.]+\w+)", out)}
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return {
        "requests": requests,
        "errors": errors,
        "rps": requests / seconds,
        "p50_ms": lat.get("50", 0.0),
        "p99_ms": lat.get("99", 0.0),
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def open_loop(
    url: str, key: str, body: dict[str, Any], rate: float, seconds: float
) -> dict[str, Any]:
    """Open loop at ``rate`` requests/s (bench/loadgen.py on the other core)."""
    cmd = [sys.executable, str(ROOT / "bench" / "loadgen.py"), url, "--key", key]
    cmd += ["--body", json.dumps(body), "--rate", str(rate), "--seconds", str(seconds)]
    out = subprocess.run(
        pinned(OTHER_CORE, cmd), capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    result: dict[str, Any] = json.loads(out)
    result["requests"] = result["ok"]
    result["rps"] = result["achieved_rps"]
    result["errors"] = result["errors"] + result["dropped"]
    return result


# -- the processes under test ---------------------------------------------------------------------


def start_fake_upstream(work: Path) -> Upstream:
    """bench/fake_upstream.py on the other core; its log (clients going away) to a file."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port)]
    with open(work / "upstream.log", "ab") as log:  # --no-record: see fake_upstream.py
        proc = subprocess.Popen(
            pinned(OTHER_CORE, [*cmd, "--chunks", "20", "--no-record"]), stdout=log, stderr=log
        )
    wait_http(f"http://127.0.0.1:{port}/_requests", proc)
    return Upstream(port, proc)


def start_gateway(
    workdir: Path,
    upstream: Any,
    pg: str,
    env: dict[str, str],
    *args: str,
    core: str | None = GATEWAY_CORE,
) -> Gateway:
    gw = make_gateway(
        workdir,
        database_url=pg,
        upstream=upstream,
        extra_env={"CHATGATE_LOG_LEVEL": "WARNING", "CHATGATE_SECRET": "b" * 40, **env},
        extra_toml=STALL_MODEL.format(base=upstream.base_url),
    )
    gw.start(*args)
    assert gw.proc is not None
    if core is not None:
        for pid in peers.tree_pids(gw.proc.pid):
            subprocess.run(["taskset", "-pc", core, str(pid)], check=True, capture_output=True)
    return gw


def key_for(gw: Gateway, limited: bool | Mapping[str, int]) -> str:
    """A key on a plan of its own: with limits far above what a run reaches (every check
    runs, none refuses), ``memory.PLAN_LIMITS`` when ``limited`` is True, or those given."""
    name = "bench" + secrets.token_hex(3)
    if limited:
        limits = memory.PLAN_LIMITS if limited is True else limited
        flags = [f"--{k.replace('_', '-')}" for k in limits]
        values = [str(v) for v in limits.values()]
        gw.cli(
            "plans", "create", name, *[x for pair in zip(flags, values, strict=True) for x in pair]
        )
    else:
        gw.cli("plans", "create", name)
    gw.cli("accounts", "create", f"{name}@bench.local", "--plan", name)
    return str(gw.cli_json("keys", "create", "--account", f"{name}@bench.local")["key"])


class Target:
    """Something to send load to: a URL, a key, and the process tree to charge the CPU to."""

    def __init__(self, name: str, url: str, key: str, pid: int | None) -> None:
        self.name, self.url, self.key, self.pid = name, url, key, pid

    def measure(self, load: str, body: dict[str, Any], run: Any) -> dict[str, Any]:
        before = peers.tree_cpu_seconds(self.pid) if self.pid else 0.0
        result = run(self.url, self.key, body)
        cpu = (peers.tree_cpu_seconds(self.pid) - before) if self.pid else 0.0
        result["cpu_ms_per_req"] = cpu * 1000 / max(result["requests"], 1) if self.pid else 0.0
        return {"config": self.name, "load": load, **result}


# -- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=3, help="per round (wrk) or run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per row (median)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed offered rate, JSON")
    parser.add_argument("--sse-rate", type=float, default=300.0, help="fixed offered rate, SSE")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--only", default="", help="comma-separated chatgate configs to run (default: all)"
    )
    add_halt_poll_arg(parser)
    args = parser.parse_args()
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is missing (apt-get install wrk; `make bench` does it)")
    bench_bin = peers.ensure_venv(".venv-bench", peers.FLOOR_PACKAGES)
    litellm_bin = (
        None if args.no_litellm else peers.ensure_venv(".venv-litellm", peers.LITELLM_PACKAGES)
    )

    started: list[Proc] = []
    gateways: list[Gateway] = []
    polling = contextlib.ExitStack()
    poll_ns = polling.enter_context(peers.halt_polling(args.halt_poll_ns))
    upstream = start_fake_upstream(work)
    pg_server = peers.start_pg()
    redis, redis_url = peers.start_redis(work)
    started.append(redis)
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {"guest_halt_poll_ns": poll_ns}
    try:
        pg = pg_server.url
        targets = [Target("direct", upstream.base_url + "/chat/completions", "", None)]
        floor_key = "sk-floor-" + secrets.token_hex(16)
        floor = peers.start_floor(bench_bin, upstream.base_url, floor_key)
        started.append(floor)
        targets.append(Target("floor", floor.url + "/v1/chat/completions", floor_key, floor.pid))
        floor_aiohttp = peers.start_floor_aiohttp(bench_bin, upstream.base_url, floor_key)
        started.append(floor_aiohttp)
        targets.append(
            Target(
                "floor-aiohttp",
                floor_aiohttp.url + "/v1/chat/completions",
                floor_key,
                floor_aiohttp.pid,
            )
        )
        configs = {
            "bare": ({"CHATGATE_USAGE_ENABLED": "0"}, False),
            "limits-mem": ({}, True),
            "limits-redis": ({"CHATGATE_REDIS_URL": redis_url}, True),
        }
        if args.only:
            configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
        by_name: dict[str, Gateway] = {}
        for name, (env, limited) in configs.items():
            gw = start_gateway(work / name, upstream, pg, env)
            gateways.append(gw)
            by_name[name] = gw
            assert gw.proc is not None
            targets.append(
                Target(name, gw.url + "/v1/chat/completions", key_for(gw, limited), gw.proc.pid)
            )
        if litellm_bin is not None:
            master = "sk-litellm-" + secrets.token_hex(8)
            litellm = peers.start_litellm(litellm_bin, upstream.base_url, work / "litellm", master)
            started.append(litellm)
            targets.append(
                Target("litellm", litellm.url + "/v1/chat/completions", master, litellm.pid)
            )
        for t in targets:
            peers.post_ok(t.url, t.key, BODY)

        secs = args.seconds
        for kind, body in KINDS.items():
            for conns in (args.connections, 1):
                load = f"{conns} conn"
                counting = kind == "json" and conns == args.connections
                for t in targets:
                    wrk(t.url, t.key, body, conns, 1)  # warm-up
                if counting:
                    peers.redis_reset_stats(redis_url)
                    db_cpu = pg_cpu_seconds(pg_server)
                samples = in_rounds(targets, args.rounds, load, body, _closed(conns, secs))
                for t in targets:
                    rows.append({"kind": kind, **median(samples[t.name])})
                    _progress(rows[-1], began)
                if counting:
                    stats = peers.redis_commandstats(redis_url)
                    answered = sum(x["requests"] for x in samples.get("limits-redis", []))
                    extras["redis_commands"] = stats
                    extras["redis_evalsha_per_request"] = stats.get("evalsha", 0) / max(answered, 1)
                    # The database's side of usage recording, for sizing (docs/deploy.md): all
                    # of the benchmark's PostgreSQL (backends, WAL writer, checkpointer) over
                    # the requests the two gateways that record usage answered meanwhile.
                    recorded = sum(
                        x["requests"]
                        for name in ("limits-mem", "limits-redis")
                        for x in samples.get(name, [])
                    )
                    if recorded:
                        db_us = (pg_cpu_seconds(pg_server) - db_cpu) * 1e6 / recorded
                        extras["db_cpu_us_per_recorded_request"] = db_us
            rate = args.rate if kind == "json" else args.sse_rate
            samples = in_rounds(targets, args.rounds, f"{rate:g}/s", body, _open(rate, secs))
            for t in targets:
                rows.append({"kind": kind, **median(samples[t.name])})
                _progress(rows[-1], began)

        # The hot path's profile: limits-mem under wrk, sampled by py-spy (after the figures).
        _extra(extras, "profile", lambda: profile(bench_bin, targets, by_name["limits-mem"], secs))

        for name, gw in by_name.items():
            gw.stop()
            # Anything a gateway logged at WARNING or above during the run (it logs nothing
            # else here): a fail-open, a Redis timeout, an error would explain an odd row.
            warned = [
                line for line in gw.logs().splitlines() if " WARNING " in line or " ERROR " in line
            ]
            if warned:
                extras.setdefault("gateway_warnings", {})[name] = warned[:20]
                print(
                    f"bench: {name} logged {len(warned)} warnings, first: {warned[0]}", flush=True
                )
        gateways.clear()
        if litellm_bin is not None:
            started.pop().stop()  # LiteLLM: the cores are needed free from here on
        floor.stop()
        floor_aiohttp.stop()

        conns = args.connections
        _extra(extras, "workers", lambda: workers(work, upstream, pg, redis_url, secs, conns))
        if not args.no_memory:
            _extra(
                extras, "memory", lambda: memory_run(work, upstream, pg, args.keys, args.streams)
            )
    finally:
        for gw in gateways:
            gw.stop()
        for proc in reversed(started):
            proc.stop()
        upstream.proc.terminate()
        upstream.proc.wait(20)
        pg_server.close()
        shutil.rmtree(work, ignore_errors=True)
        polling.close()
    extras["seconds_total"] = round(time.monotonic() - began, 1)
    report(rows, extras, args)


def pg_cpu_seconds(server: Any) -> float:
    """User + system CPU seconds of the benchmark's PostgreSQL, all its processes."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    return peers.tree_cpu_seconds(postmaster)


def _extra(extras: dict[str, Any], name: str, run: Any) -> None:
    """One of the runs after the table: a failure is reported with the rest, not lost."""
    try:
        extras[name] = run()
    except Exception as exc:  # the rows measured so far still make the report
        print(f"bench: {name} failed: {exc!r}", flush=True)
        extras[f"{name}_error"] = repr(exc)


def in_rounds(
    targets: list[Target], rounds: int, load: str, body: dict[str, Any], run: Any
) -> dict[str, list[dict[str, Any]]]:
    """Each target measured ``rounds`` times, the order alternating between rounds: the
    machine is shared, and a burst of someone else's work should not decide a ratio (each
    figure is then the median of its rounds, see :func:`median`)."""
    samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in targets if r % 2 == 0 else targets[::-1]:
            samples[t.name].append(t.measure(load, body, run))
    return samples


def median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: the median of each figure, errors and requests summed."""
    row = dict(samples[0])
    for field, value in samples[0].items():
        if isinstance(value, int | float) and field not in ("errors", "requests"):
            row[field] = statistics.median(s[field] for s in samples)
    row["errors"] = sum(s["errors"] for s in samples)
    row["requests"] = sum(s["requests"] for s in samples)
    row["rounds"] = len(samples)
    if any("error_kinds" in s for s in samples):  # the open-loop rows: what failed, summed
        kinds: dict[str, int] = {}
        for sample in samples:
            for kind, n in sample.get("error_kinds", {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        row["error_kinds"] = kinds
    return row


def _closed(conns: int, secs: int) -> Any:
    return lambda url, key, body: wrk(url, key, body, conns, secs)


def _open(rate: float, secs: int) -> Any:
    return lambda url, key, body: open_loop(url, key, body, rate, secs)


def _progress(row: dict[str, Any], began: float) -> None:
    print(
        f"  [{time.monotonic() - began:5.0f}s] {row['kind']:<4} {row['load']:<8}"
        f" {row['config']:<13}"
        f" {row['rps']:8.0f} rps  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  cpu {row['cpu_ms_per_req']:.3f} ms/req  errors {row['errors']}",
        flush=True,
    )


def profile(bench_bin: Path, targets: list[Target], gw: Gateway, seconds: int) -> str:
    """py-spy on limits-mem under wrk JSON load; a summary plus the collapsed stacks."""
    target = next(t for t in targets if t.name == "limits-mem")
    assert gw.proc is not None
    raw = RESULTS / "profile-limits-mem-json.collapsed.tmp"
    spy = subprocess.Popen(
        pinned(
            OTHER_CORE,
            [
                *[str(bench_bin / "py-spy"), "record", "--pid", str(gw.proc.pid)],
                *["--format", "raw", "-o", str(raw), "-d", str(seconds), "-r", "250"],
                "--nonblocking",
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = wrk(target.url, target.key, BODY, 32, seconds)
    spy.wait(seconds + 30)
    out = RESULTS / "profile-limits-mem-json.txt"
    out.write_text(summarize_profile(raw.read_text(), result["requests"]) if raw.exists() else "")
    raw.unlink(missing_ok=True)
    return str(out.relative_to(ROOT))


def summarize_profile(collapsed: str, requests: int) -> str:
    """Self time by function, and time by the innermost chatgate frame, from py-spy's raw output."""
    self_time: Counter[str] = Counter()
    by_chatgate: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [
            re.sub(r" \(.*?(site-packages/|lib/python3\.\d+/|/main/)", " (", f)
            for f in stack.split(";")
        ]
        self_time[frames[-1]] += n
        ours = [f for f in frames if "(chatgate/" in f]
        by_chatgate[re.sub(r":\d+\)", ")", ours[-1]) if ours else "(outside chatgate frames)"] += n
    lines = [
        "py-spy profile of chatgate limits-mem (all features on) under wrk, JSON, 32 connections.",
        f"{total} samples at 250 Hz over {requests} requests; percentages of all samples.",
        "Stacks of coroutines resumed by the event loop start at the coroutine, so the second",
        "list (innermost chatgate frame of each sample) is the one to read for 'where'.",
        "",
        "-- self time (top 40) --",
    ]
    lines += [f"{100 * n / max(total, 1):5.1f}%  {f}" for f, n in self_time.most_common(40)]
    lines += ["", "-- by innermost chatgate frame (top 30) --"]
    lines += [f"{100 * n / max(total, 1):5.1f}%  {f}" for f, n in by_chatgate.most_common(30)]
    return "\n".join(lines) + "\n"


def workers(
    work: Path, upstream: Any, pg: str, redis_url: str, secs: int, conns: int
) -> dict[str, Any]:
    """``serve --workers 2`` vs one worker, Redis limits, on the whole machine (see the note)."""
    out: dict[str, Any] = {}
    env = {
        "CHATGATE_REDIS_URL": redis_url,
        "CHATGATE_REDIS_PREFIX": "w" + secrets.token_hex(3) + ":",
    }
    for n in (1, 2):
        gw = start_gateway(work / f"workers{n}", upstream, pg, env, "--workers", str(n), core=None)
        try:
            assert gw.proc is not None
            target = Target(
                f"workers-{n}", gw.url + "/v1/chat/completions", key_for(gw, True), gw.proc.pid
            )
            wrk(target.url, target.key, BODY, conns, 1)
            # wrk pinned to the other core as everywhere; the gateway's workers float on both.
            out[str(n)] = target.measure(
                f"{conns} conn", BODY, lambda u, k, b: wrk(u, k, b, conns, secs)
            )
        finally:
            gw.stop()
    out["ratio"] = out["2"]["rps"] / max(out["1"]["rps"], 1e-9)
    # The scaling this box can show: with the load generator and the upstream on the same two
    # cores, throughput cannot double; CPU per request staying flat says that a second process
    # adds no shared cost (Redis, the database), so workers scale with the cores they get.
    out["cpu_ratio"] = out["2"]["cpu_ms_per_req"] / max(out["1"]["cpu_ms_per_req"], 1e-9)
    return out


def memory_run(work: Path, upstream: Any, pg: str, keys: int, streams: int) -> dict[str, Any]:
    """RSS after start, after one request with each of ``keys`` keys, with ``streams`` open."""
    gw = start_gateway(work / "memory", upstream, pg, {})
    try:
        assert gw.proc is not None
        pid = gw.proc.pid
        url = gw.url + "/v1/chat/completions"
        key = key_for(gw, True)
        peers.post_ok(url, key, BODY)
        idle = peers.rss_mb(pid)
        keyfile = work / "keys.txt"
        t0 = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "memory.py"),
                "make-keys",
                str(keys),
                str(keyfile),
            ],
            env=gw.env,
            cwd=gw.workdir,
            check=True,
            timeout=600,
        )
        made = time.monotonic() - t0
        all_keys = keyfile.read_text().split()
        ok = asyncio.run(memory.one_each(url, all_keys, BODY))
        with_keys = peers.rss_mb(pid)
        stall = {
            "model": "gpt-stall",
            "messages": BODY["messages"],
            "stream": True,
            "fake": {"after": 2, "delay": 60},
        }
        opened, with_streams = asyncio.run(
            memory.hold_streams(url, key, stall, streams, lambda: peers.rss_mb(pid))
        )
        return {
            "rss_idle_mb": round(idle, 1),
            "keys": len(all_keys),
            "keys_answered": ok,
            "keys_created_s": round(made, 1),
            "rss_with_keys_mb": round(with_keys, 1),
            "streams_open": opened,
            "rss_with_keys_and_streams_mb": round(with_streams, 1),
        }
    finally:
        gw.stop()


# -- the table ------------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]], extras: dict[str, Any], args: argparse.Namespace) -> None:
    by = {(r["kind"], r["load"], r["config"]): r for r in rows}
    table = [
        "| kind | load | config | rps | p50 ms | p99 ms | cpu ms/req | cpu/bare | rps/floor "
        "| rps/litellm | +p50 ms | +p99 ms | errors |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        bare, floor, litellm, direct = (
            by.get((r["kind"], r["load"], name)) for name in ("bare", "floor", "litellm", "direct")
        )
        cpu_bare = _ratio(r["cpu_ms_per_req"], bare and bare["cpu_ms_per_req"])
        rps_floor = _ratio(r["rps"], floor and floor["rps"])
        rps_litellm = _ratio(r["rps"], litellm and litellm["rps"])
        add50 = r["p50_ms"] - direct["p50_ms"] if direct and r["config"] != "direct" else None
        add99 = r["p99_ms"] - direct["p99_ms"] if direct and r["config"] != "direct" else None
        r.update(cpu_vs_bare=cpu_bare, rps_vs_floor=rps_floor, rps_vs_litellm=rps_litellm)
        r.update(added_p50_ms=add50, added_p99_ms=add99)
        table.append(
            f"| {r['kind']} | {r['load']} | {r['config']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {_f(r['cpu_ms_per_req'] or None, 3)} | {_f(cpu_bare)} "
            f"| {_f(rps_floor)} | {_f(rps_litellm, 1)} | {_f(add50)} | {_f(add99)} "
            f"| {r['errors']} |"
        )
    targets = check_targets(by, extras, args)
    print("\n" + "\n".join(table))
    print(f"\nguest halt polling: {extras['guest_halt_poll_ns']} ns (see bench/peers.py HALT_POLL)")
    print("\nTargets (issue 11; all features on = limits-mem):")
    for t in targets:
        verdict = "n/a" if t["met"] is None else "ok" if t["met"] else "MISS"
        print(f"  [{verdict}] {t['target']}: {t['value']}")
    db_us = extras.get("db_cpu_us_per_recorded_request")
    if db_us is not None:
        print(
            f"\nPostgreSQL CPU per recorded request (JSON, {args.connections} connections, "
            f"usage recording of limits-mem and limits-redis): {db_us:.1f} us"
        )
    stamp = time.strftime("%Y-%m-%d")
    if args.halt_poll_ns is not None:  # not the machine as it is: kept apart from the headline
        stamp += f"-haltpoll{args.halt_poll_ns}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {**machine(), "guest_halt_poll_ns": extras["guest_halt_poll_ns"]},
                "args": vars(args),
                "rows": rows,
                "extras": extras,
                "targets": targets,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out.relative_to(ROOT)} (in {extras['seconds_total']:.0f} s)")


def check_targets(
    by: dict[Any, dict[str, Any]], extras: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(target: str, value: float | None, ok: bool | None, text: str) -> None:
        if value is None or ok is None:
            return
        met: bool | None = bool(ok)
        if "added" in target and value < 0:  # direct's own tail was disturbed: no verdict
            met, text = None, f"{text} (n/a: the direct row's tail was noisier)"
        out.append({"target": target, "value": text, "met": met})

    sat = f"{args.connections} conn"
    for kind in KINDS:
        mem = by.get((kind, sat, "limits-mem"))
        if mem is None:
            continue
        v = mem.get("rps_vs_litellm")
        add(f"{kind}: throughput >= 40x LiteLLM", v, v is not None and v >= 40, f"{_f(v, 1)}x")
        v = mem.get("rps_vs_floor")
        add(f"{kind}: throughput >= 0.6x the floor", v, v is not None and v >= 0.6, f"{_f(v)}x")
        v = mem.get("cpu_vs_bare")
        add(f"{kind}: CPU/request <= 1.3x bare", v, v is not None and v <= 1.3, f"{_f(v)}x")
        v = mem.get("added_p99_ms")
        add(f"{kind}: added p99 at {sat} <= 10 ms", v, v is not None and v <= 10, f"{_f(v)} ms")
        floors = by.get((kind, sat, "floor")), by.get((kind, sat, "floor-aiohttp"))
        bare = by.get((kind, sat, "bare"))
        if floors[0] and floors[1] and bare:  # no verdict: where the gap to the floor lies
            stack, own = floors[1]["rps"] / floors[0]["rps"], bare["rps"] / floors[1]["rps"]
            out.append(
                {
                    "target": f"{kind}: the floor on aiohttp.web vs on granian RSGI (the server)",
                    "value": f"{stack:.2f}x",
                    "met": None,
                }
            )
            out.append(
                {
                    "target": f"{kind}: chatgate bare vs the floor on aiohttp.web (its own code)",
                    "value": f"{own:.2f}x",
                    "met": None,
                }
            )
        redis = by.get((kind, sat, "limits-redis"))
        if redis and mem["cpu_ms_per_req"]:
            v = redis["cpu_ms_per_req"] / mem["cpu_ms_per_req"]
            add(f"{kind}: Redis CPU/request <= 1.3x in-process", v, v <= 1.3, f"{v:.2f}x")
    one = by.get(("json", "1 conn", "limits-mem"))
    if one:
        v = one.get("added_p50_ms")
        add("json: added p50, 1 connection <= 0.5 ms", v, v is not None and v <= 0.5, f"{_f(v)} ms")
        v = one.get("added_p99_ms")
        add("json: added p99, 1 connection <= 1 ms", v, v is not None and v <= 1.0, f"{_f(v)} ms")
    fixed = by.get(("json", f"{args.rate:g}/s", "limits-mem"))
    if fixed:
        v = fixed.get("added_p99_ms")
        add(
            f"json: added p99 at {args.rate:g}/s <= 1.5 ms",
            v,
            v is not None and v <= 1.5,
            f"{_f(v)} ms",
        )
    v = extras.get("redis_evalsha_per_request")
    add(
        "Redis: EVALSHA per request = 1",
        v,
        v is not None and v <= 1.05,
        f"{_f(v)}",
    )
    w = extras.get("workers", {}).get("ratio")
    add(
        "2 workers >= 1.8x one (load generator shares the 2 cores)",
        w,
        w is not None and w >= 1.8,
        f"{_f(w)}x",
    )
    c = extras.get("workers", {}).get("cpu_ratio")
    if c is not None:
        out.append(
            {
                "target": "2 workers: CPU/request vs one (what this box can show of scaling)",
                "value": f"{_f(c)}x",
                "met": None,
            }
        )
    m = extras.get("memory")
    if m:
        rss = m["rss_with_keys_and_streams_mb"]
        what = f"{m['keys']:,} keys + {m['streams_open']:,} streams"
        add(
            f"memory: {what} <= {MEMORY_BOUND_MB} MB RSS",
            rss,
            rss <= MEMORY_BOUND_MB,
            f"{rss} MB",
        )
    return out


def add_halt_poll_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--halt-poll-ns",
        type=int,
        help="set the machine's guest halt polling (ns) for the run and put it back after "
        "(root; default: the machine as it is, see peers.HALT_POLL)",
    )


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "litellm": peers.LITELLM,
        "floor": list(peers.FLOOR_PACKAGES),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
