"""Python bytecodes per request, by library and by function: where a request's time goes.

    .venv/bin/python bench/opcodes.py                  # all features on
    .venv/bin/python bench/opcodes.py --config bare --requests 500 --top 60
    .venv/bin/python bench/opcodes.py --sse            # 20-chunk streams instead

bench/instr.py says how many instructions a request costs; this says which Python code runs
them. The gateway starts with ``bench/opcount`` on ``PYTHONPATH`` (a sitecustomize that counts
every bytecode per code object between two signals), warms up under wrk, then answers
``--requests`` chat completions (JSON, or 20-chunk streams) one at a time while counting.
Deterministic, unlike a sampling profiler; blind to C (a dict lookup or orjson is one bytecode
here), so read it beside the instruction counts. Counting starts once the warm-up's usage is
flushed; the invalidation poll and the flush of the counted requests run at this slow pace (~1 s
of them per few hundred requests): at full speed they weigh less than here.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from ab import CONFIGS, bench_peers  # noqa: E402
from run import KINDS, key_for, start_gateway, wrk  # noqa: E402

from tests.helpers import BIN, free_port, wait_http  # noqa: E402


def library(filename: str) -> str:
    """Which library a code object's file belongs to (chatgate, a package, or stdlib:NAME)."""
    if f"{os.sep}chatgate{os.sep}" in filename and "site-packages" not in filename:
        return "chatgate"
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep)[1].split(os.sep)[0]
    return "stdlib:" + Path(filename).stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="all", choices=sorted(CONFIGS))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--top", type=int, default=40, help="functions to list")
    parser.add_argument("--sse", action="store_true", help="20-chunk streams instead of JSON")
    args = parser.parse_args()
    body = KINDS["sse" if args.sse else "json"]
    with bench_peers("chatgate-opcodes-", [(args.config, *CONFIGS[args.config])]) as bench:
        out = bench.work / "counts.tsv"
        [(_, env, limited)] = bench.specs
        gw = start_gateway(bench.work / args.config, bench.upstream, bench.pg_url, env)
        try:
            key = key_for(gw, limited)
        finally:
            gw.stop()
        path = [str(ROOT / "bench" / "opcount"), gw.env.get("PYTHONPATH", "")]
        run_env = {**gw.env, "OPCOUNT_OUT": str(out), "PYTHONPATH": os.pathsep.join(path)}
        port = free_port()
        cmd = [str(BIN / "chatgate"), "serve", "--port", str(port)]
        proc = subprocess.Popen(cmd, env=run_env, cwd=gw.workdir)
        try:
            wait_http(f"http://127.0.0.1:{port}/", proc, timeout=120)
            wrk(f"http://127.0.0.1:{port}/v1/chat/completions", key, body, 8, 3)  # warm-up
            time.sleep(2.5)  # the warm-up's usage records flushed before counting starts
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            for _ in range(args.requests):
                conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
                answer = conn.getresponse()
                answer.read()
                if answer.status != 200:
                    raise SystemExit(f"bench: the gateway answered {answer.status}")
            time.sleep(1.5)  # the usage flush of these requests
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)
        finally:
            proc.terminate()
            proc.wait(30)
        rows = [line.rstrip("\n").split("\t") for line in out.open()]
    n = args.requests
    by_library: collections.Counter[str] = collections.Counter()
    for count, _, where in rows:
        by_library[library(where.split(":")[0])] += int(count)
    print(f"{args.config}: {sum(by_library.values()) / n:,.0f} bytecodes per request\n")
    for name, count in by_library.most_common(15):
        print(f"{count / n:10.1f}  {name}")
    print(f"\n{'per request':>11} {'calls':>6}  function")
    for count, calls, where in rows[: args.top]:
        shown = where.split("site-packages" + os.sep)[-1].replace(str(ROOT) + os.sep, "")
        print(f"{int(count) / n:11.1f} {int(calls) / n:6.2f}  {shown}")


if __name__ == "__main__":
    main()
