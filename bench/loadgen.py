"""An open-loop load generator: a fixed offered rate, latency measured from the intended send time.

    python bench/loadgen.py URL --rate 1000 --seconds 5 [--key K] [--body JSON] [--stream]

wrk keeps N connections busy (closed loop: a slow server slows the load down and hides its
queueing); this sends request i at ``start + i / rate`` whatever happened before, on a pool of
keep-alive connections, and times each from that intended instant (no coordinated omission,
as wrk2 does; wrk2 is not packaged in Debian). Bounded: ``rate x seconds`` requests at most,
at most ``--max-inflight`` at once (beyond that a request counts as dropped), each abandoned
after ``--timeout`` seconds. Prints one JSON object: offered, sent, ok, errors, dropped,
achieved rate and latency percentiles in milliseconds. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = "Bearer " + args.key
    body = args.body.encode()
    total = int(args.rate * args.seconds)
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "dropped": 0}
    kinds: dict[str, int] = {}  # what the errors were: a status, or an exception's name
    inflight = 0
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.max_inflight, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(intended: float) -> None:
            nonlocal inflight
            inflight += 1
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    async for _ in resp.content.iter_any():
                        pass
                    ok = resp.status == 200
                    kind = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                kind = type(exc).__name__
            finally:
                inflight -= 1
            if ok:
                counts["ok"] += 1
                latencies.append((time.perf_counter() - intended) * 1000.0)
            else:
                counts["errors"] += 1
                kinds[kind] = kinds.get(kind, 0) + 1

        # Open a pool of connections first, as a steady client would have: the measured
        # requests then seldom pay for a connect.
        await asyncio.gather(*(one(time.perf_counter()) for _ in range(min(64, total))))
        latencies.clear()
        counts.update(ok=0, errors=0)
        kinds.clear()
        tasks = []
        start = time.perf_counter() + 0.05
        for i in range(total):
            intended = start + i / args.rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if inflight >= args.max_inflight:
                counts["dropped"] += 1
                continue
            tasks.append(asyncio.ensure_future(one(intended)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {
        "offered_rps": args.rate,
        "sent": len(tasks),
        **counts,
        "error_kinds": kinds,
        "achieved_rps": counts["ok"] / max(sent_for, 1e-9),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--key", default="")
    parser.add_argument("--body", default="{}")
    parser.add_argument("--max-inflight", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost")):
        raise SystemExit("loadgen: loopback targets only")
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
