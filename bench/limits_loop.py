"""Instructions of one limited request's rate limiting, as the gateway does it, in a loop.

    .venv/bin/python bench/limits_loop.py                     # this tree
    .venv/bin/python bench/limits_loop.py --tree /tmp/other   # another (a git worktree)

Per iteration: the key's checks (the bench plan's five limits), the token reservation,
``Limits.admit`` (the in-process limiter's acquire and the ``x-ratelimit-*`` headers), and
``Limits.settle_soon`` with fewer tokens than reserved, as ``/v1/chat/completions`` does.
Counted by callgrind for two loop lengths, so start-up cancels out: the difference divided by
the extra iterations is what one request's limits cost in instructions. Repeatable to ~1%,
which a wall-clock loop on this shared machine is not (see bench/instr.py).

The limiter reads a clock that moves 0.5 ms a reading (1 ms a request), not the real one:
whether a bucket has drained empty (and is swept, and made again) must not depend on how
fast valgrind runs the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def loop(iterations: int) -> None:
    # The child: chatgate comes from the tree on PYTHONPATH, so nothing here may put ROOT
    # on sys.path first (bench/run.py, which bench/instr.py imports, does).
    from memory import PLAN_LIMITS

    from chatgate.auth import Principal
    from chatgate.limits import Limits, checks_for
    from chatgate.ratelimit import MemoryLimiter

    ticks = itertools.count()

    def clock() -> float:
        return 1_796_000_000.0 + next(ticks) * 0.0005

    import chatgate

    expected = Path(os.environ.get("LIMITS_LOOP_TREE", ROOT)) / "chatgate"
    assert Path(chatgate.__file__).parent == expected, (chatgate.__file__, expected)
    principal = Principal("key_bench", "acct_bench", False, None, dict(PLAN_LIMITS), {})
    limits = Limits(MemoryLimiter(clock=clock))
    for _ in range(iterations):  # as chatgate/api/openai.py's Call.admit (older trees: any)
        checks = principal.limit_checks or checks_for(principal)
        reserved = 40 if getattr(principal, "limit_tokens", True) else 0
        admission = await limits.admit(checks, reserved, "gpt-test")
        await limits.settle_soon(admission, 25)
    assert admission.headers["x-ratelimit-remaining-tokens"]


def count(tree: Path, iterations: int, work: Path, instructions: Callable[[Path], int]) -> int:
    out = work / f"callgrind.{iterations}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    cmd += [sys.executable, __file__, "--run", str(iterations)]
    # The child checks where chatgate came from: a wrong tree would measure the wrong code.
    env["LIMITS_LOOP_TREE"] = str(tree)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return instructions(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree to measure")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # the counted child
    args = parser.parse_args()
    if args.run is not None:
        asyncio.run(loop(args.run))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from instr import instructions

    with tempfile.TemporaryDirectory(prefix="chatgate-limits-loop-") as work:
        tree, scratch = args.tree.resolve(), Path(work)
        short = count(tree, 1000, scratch, instructions)
        long = count(tree, 1000 + args.iterations, scratch, instructions)
    print(f"{args.tree}: {(long - short) / args.iterations:,.0f} instructions per request")


if __name__ == "__main__":
    main()
