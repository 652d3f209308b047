"""Gateway benchmark: direct upstream vs chatgate in several configurations, one run, ratios.

    .venv/bin/python bench/run.py [--seconds 5] [--connections 32]

Everything runs on loopback: the fake upstream (bench/fake_upstream.py) and wrk on one core,
the gateway under test alone on the other (taskset), so CPU per request is the gateway's own.
Rows: JSON and 20-chunk SSE, at 32 connections and on a single connection (added latency).
Configurations (same binary, same run):
  direct        wrk -> fake upstream
  bare          chatgate, key on a plan without limits, usage recording off
  limits-mem    chatgate, in-process limits (rpm/tpm/rpd/concurrency/quota), usage on
  limits-redis  chatgate, Redis limits (one Lua call per request), usage on
Figures are printed as a table and written to bench/results/gateway-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import (  # noqa: E402
    REDIS_URL,
    Gateway,
    create_pg_database,
    drop_pg_database,
    make_gateway,
    start_upstream,
    stop,
)

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
GATEWAY_CORE, OTHER_CORE = "0", "1"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wrk(
    url: str, key: str, body: dict[str, Any], connections: int, seconds: int
) -> dict[str, float]:
    env = {**os.environ, "BENCH_KEY": key, "BENCH_BODY": json.dumps(body)}
    threads = min(connections, 2)
    out = subprocess.run(
        [
            "taskset",
            "-c",
            OTHER_CORE,
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "wrk_post.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"\s+(50|99)%\s+([\d.]+\w+)", out)}
    return {
        "requests": requests,
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "rps": requests / seconds,
        "p50_ms": lat.get("50", 0.0),
        "p99_ms": lat.get("99", 0.0),
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def start_gateway(workdir: Path, upstream: Any, pg: str, extra: dict[str, str]) -> Gateway:
    gw = make_gateway(
        workdir,
        database_url=pg,
        upstream=upstream,
        extra_env={"CHATGATE_LOG_LEVEL": "WARNING", **extra},
    )
    gw.start()
    subprocess.run(
        ["taskset", "-pc", GATEWAY_CORE, str(gw.proc.pid)],
        check=True,  # type: ignore[union-attr]
        capture_output=True,
    )
    return gw


def key_for(gw: Gateway, limited: bool) -> str:
    name = "bench" + secrets.token_hex(3)
    if limited:  # limits far above what the run reaches, so every check runs and passes
        gw.cli(
            "plans",
            "create",
            name,
            "--rpm",
            "100000000",
            "--tpm",
            "2000000000",
            "--rpd",
            "1000000000",
            "--concurrency",
            "100000",
            "--monthly-tokens",
            "100000000000",
        )
    else:
        gw.cli("plans", "create", name)
    gw.cli("accounts", "create", f"{name}@bench.local", "--plan", name)
    return str(gw.cli_json("keys", "create", "--account", f"{name}@bench.local")["key"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    upstream = start_upstream(chunks=20)
    subprocess.run(
        ["taskset", "-pc", OTHER_CORE, str(upstream.proc.pid)], check=True, capture_output=True
    )
    pg = create_pg_database()
    work = Path(tempfile.mkdtemp(prefix="chatgate-bench-"))
    prefix = f"bench-{secrets.token_hex(3)}:"
    configs = {
        "bare": ({"CHATGATE_USAGE_ENABLED": "0"}, False),
        "limits-mem": ({}, True),
        "limits-redis": ({"CHATGATE_REDIS_URL": REDIS_URL, "CHATGATE_REDIS_PREFIX": prefix}, True),
    }
    rows: list[dict[str, Any]] = []
    try:
        targets: list[tuple[str, str, str, int | None]] = [
            ("direct", upstream.base_url + "/chat/completions", "", None)
        ]
        gateways = []
        for name, (env, limited) in configs.items():
            gw = start_gateway(work / name, upstream, pg, {"CHATGATE_SECRET": "b" * 40, **env})
            gateways.append(gw)
            targets.append(
                (name, gw.url + "/v1/chat/completions", key_for(gw, limited), gw.proc.pid)
            )  # type: ignore[union-attr]
        for kind, body in (("json", BODY), ("sse", STREAM_BODY)):
            for conns in (args.connections, 1):
                for name, url, key, pid in targets:
                    wrk(url, key, body, conns, 1)  # warm-up
                    before = cpu_seconds(pid) if pid else 0.0
                    result = wrk(url, key, body, conns, args.seconds)
                    cpu = (cpu_seconds(pid) - before) if pid else 0.0
                    result["cpu_ms_per_req"] = (
                        cpu * 1000 / max(result["requests"], 1) if pid else 0.0
                    )
                    rows.append({"config": name, "kind": kind, "connections": conns, **result})
        for gw in gateways:
            gw.stop()
    finally:
        stop(upstream.proc)
        drop_pg_database(pg)

    _report(rows)


def _report(rows: list[dict[str, Any]]) -> None:
    by = {(r["config"], r["kind"], r["connections"]): r for r in rows}
    print(
        f"{'config':<13} {'kind':<4} {'conns':>5} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cpu ms/req':>10} {'rps/bare':>8} {'cpu/bare':>8} {'errors':>6}"
    )
    for r in rows:
        bare = by.get(("bare", r["kind"], r["connections"]))
        rps_ratio = r["rps"] / bare["rps"] if bare and bare["rps"] else 0.0
        cpu_ratio = (
            r["cpu_ms_per_req"] / bare["cpu_ms_per_req"]
            if bare and bare["cpu_ms_per_req"] and r["cpu_ms_per_req"]
            else 0.0
        )
        print(
            f"{r['config']:<13} {r['kind']:<4} {r['connections']:>5} {r['rps']:>8.0f} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['cpu_ms_per_req']:>10.3f} "
            f"{rps_ratio:>8.2f} {cpu_ratio:>8.2f} {r['errors']:>6}"
        )
    out = ROOT / "bench" / "results" / f"gateway-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{os.cpu_count()} cores",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
