"""Instructions per request, counted by callgrind: an A/B that the machine's noise cannot move.

    .venv/bin/python bench/instr.py                                # bare, usage, limits, all
    .venv/bin/python bench/instr.py --config all --tree new=. --tree old=/tmp/old-worktree
    .venv/bin/python bench/instr.py --config bare --floor --sse      # 20-chunk streams

This machine is a shared VM: two runs of the same gateway differ by 10-30% in requests/s, so a
change worth a few percent cannot be seen in wall-clock figures (bench/ab.py needs many rounds,
and even then). ``valgrind --tool=callgrind`` counts the instructions the gateway executes
instead, which repeat whatever else the machine does (within 0.3% in one invocation, ~1.5%
between invocations, where the event loop batches requests a little differently). It
counts user space only: the system calls' kernel time and cache misses are not in it, so it
ranks changes to chatgate's own Python (what this is for), not changes to I/O.

Per target (a configuration of one source tree, as in bench/ab.py): the gateway is started
normally to create its key, then again under callgrind with collection off; after a warm-up,
collection is switched on for ``--requests`` requests (wrk, 8 connections, so requests queue
as at saturation), and the total is divided by the requests answered. A run takes a few
minutes per target: Python under valgrind is ~50x slower.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from ab import add_target_args, bench_peers, target_specs  # noqa: E402
from run import KINDS, key_for, start_gateway, wrk  # noqa: E402

from tests.helpers import BIN, free_port, wait_http  # noqa: E402


def instructions(out_file: Path) -> int:
    """The total instruction count (``Ir``) of a callgrind dump."""
    text = out_file.read_text()
    found = re.findall(r"^totals: (\d+)", text, re.M)
    if not found:
        raise RuntimeError(f"no totals in {out_file}")
    return int(found[-1])


def _control(pid: int, instrumentation: str) -> None:
    """Switch callgrind's collection on or off (it exits 0 even when it found no process)."""
    out = subprocess.run(
        ["callgrind_control", "-i", instrumentation, str(pid)], capture_output=True, text=True
    ).stdout
    if "OK" not in out:
        raise RuntimeError(f"callgrind_control -i {instrumentation} {pid}: {out.strip()}")


def count(
    program: list[str],
    env: dict[str, str],
    workdir: Path,
    key: str,
    requests: int,
    keep: Path | None = None,
    kind: str = "json",
) -> tuple[int, int]:
    """(instructions, requests answered) of the server ``program`` (it takes ``--port P``)
    over at least ``requests`` requests of ``kind`` (``json`` or ``sse``, as in
    bench/run.py), under callgrind; its callgrind file copied to ``keep``, if given (for
    ``callgrind_annotate``)."""
    body = KINDS[kind]
    port = free_port()
    out_file = workdir / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    cmd += [f"--callgrind-out-file={out_file}", *program, "--port", str(port)]
    with open(workdir / "valgrind.log", "ab") as log:
        proc = subprocess.Popen(
            peers.pinned(peers.GATEWAY_CORE, cmd), env=env, cwd=workdir, stdout=log, stderr=log
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", proc, timeout=600)  # any answer will do
        for _ in range(3):  # warm-up: imports, caches, pools
            wrk(url + "/v1/chat/completions", key, body, 8, 10)
        _control(proc.pid, "on")
        answered = 0
        began = time.monotonic()
        while answered < requests and time.monotonic() - began < 900:
            answered += wrk(url + "/v1/chat/completions", key, body, 8, 10)["requests"]
        _control(proc.pid, "off")
    finally:
        proc.terminate()
        proc.wait(300)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out_file, keep / f"callgrind.{workdir.name}.out")
    return instructions(out_file), answered


def floor_count(
    work: Path, upstream_base: str, requests: int, keep: Path | None = None, kind: str = "json"
) -> tuple[int, int]:
    """The aiohttp floor (bench/floor.py, the yardstick) counted the same way."""
    bench_bin = peers.ensure_venv(".venv-bench", peers.FLOOR_PACKAGES)
    key = "sk-floor-" + secrets.token_hex(16)
    env = {**os.environ, "FLOOR_UPSTREAM": upstream_base, "FLOOR_KEY": key}
    workdir = work / "floor"
    workdir.mkdir()
    program = [str(bench_bin / "python"), str(ROOT / "bench" / "floor.py")]
    env["PYTHONPATH"] = str(ROOT / "bench")
    return count(program, env, workdir, key, requests, keep, kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_target_args(parser)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--floor", action="store_true", help="also the aiohttp floor, first")
    parser.add_argument("--keep", type=Path, help="copy each target's callgrind file here")
    parser.add_argument("--sse", action="store_true", help="20-chunk streams instead of JSON")
    args = parser.parse_args()
    kind = "sse" if args.sse else "json"
    if shutil.which("valgrind") is None:
        raise SystemExit("bench: valgrind is missing (apt-get install valgrind)")
    results: list[tuple[str, int, int]] = []
    with bench_peers("chatgate-instr-", target_specs(args)) as bench:
        if args.floor:
            base_url = bench.upstream.base_url
            total, answered = floor_count(bench.work, base_url, args.requests, args.keep, kind)
            results.append(("floor-aiohttp", total, answered))
            print(f"floor-aiohttp: {total / answered:,.0f} instructions/request", flush=True)
        for name, env, limited in bench.specs:
            workdir = bench.work / name.replace(":", "-")
            gw = start_gateway(workdir, bench.upstream, bench.pg_url, env)
            try:
                key = key_for(gw, limited)
            finally:
                gw.stop()
            program = [str(BIN / "chatgate"), "serve"]
            total, answered = count(
                program, gw.env, gw.workdir, key, args.requests, args.keep, kind
            )
            results.append((name, total, answered))
            print(f"{name}: {total / answered:,.0f} instructions/request ({answered})", flush=True)
    base = results[0][1] / results[0][2]
    print(f"\n{'target':<20}{'instr/req':>12}{'x first':>9}")
    for name, total, answered in results:
        per = total / answered
        print(f"{name:<20}{per:>12,.0f}{per / base:>9.3f}")


if __name__ == "__main__":
    main()
