"""Memory of one gateway process serving 10,000 distinct keys and 1,000 concurrent streams.

Run by ``bench/run.py``; ``python bench/memory.py make-keys N FILE`` (with the gateway's
environment) is its helper that creates the keys through chatgate's own stores.

Steps: resident memory (RSS) after start; then one request with each of N keys, every key
with limits of its own (so the auth cache holds N principals and the limiter N x 5 buckets);
then 1,000 streams held open at once (the fake upstream's ``stall-stream`` model sends two
events, then goes quiet) while RSS is read again. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

PLAN_LIMITS = {
    "rpm": 100_000_000,
    "tpm": 2_000_000_000,
    "rpd": 1_000_000_000,
    "concurrency": 100_000,
    "monthly_tokens": 100_000_000_000,
}


async def make_keys(count: int, out: Path) -> None:
    """``count`` keys with per-key limits on one account, written one per line to ``out``."""
    from chatgate.accounts import AccountStore, PlanStore
    from chatgate.db.engine import create_engine
    from chatgate.keys.store import KeyStore
    from chatgate.settings import Settings

    settings = Settings.from_env(db_pool_size=8)  # 8 keys are created at a time
    engine = create_engine(settings)
    try:
        plan = f"membench{int(time.time())}"
        await PlanStore(engine).create(plan, **PLAN_LIMITS)
        account = await AccountStore(engine).create(f"{plan}@bench.local", plan=plan)
        store = KeyStore(engine, settings.resolved_secret())
        keys: list[str] = []
        own = {k: v // 2 for k, v in PLAN_LIMITS.items()}  # key-level limits: own buckets
        for start in range(0, count, 8):
            batch = await asyncio.gather(
                *(
                    store.create(account.id, name=f"k{i}", limits=own)
                    for i in range(start, min(count, start + 8))
                )
            )
            keys.extend(k.key for k in batch)
        out.write_text("\n".join(keys) + "\n")
    finally:
        await engine.dispose()


async def one_each(url: str, keys: list[str], body: dict[str, Any], parallel: int = 64) -> int:
    """One request per key, ``parallel`` at a time; how many answered 200."""
    ok = 0
    queue = list(keys)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok
            while queue:
                key = queue.pop()
                headers = {"Authorization": f"Bearer {key}"}
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    ok += resp.status == 200

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return ok


async def hold_streams(
    url: str, key: str, body: dict[str, Any], count: int, read_rss: Any
) -> tuple[int, float]:
    """Open ``count`` streams, wait for each one's first event, read RSS, close them all."""
    started = 0
    ready = asyncio.Event()
    release = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one() -> None:
            nonlocal started
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    return
                await resp.content.readline()  # the first event: the stream is open
                started += 1
                if started == count:
                    ready.set()
                await release.wait()

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        with contextlib.suppress(TimeoutError):  # report what opened
            await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(0.5)
        rss = read_rss()
        release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return started, rss


def main() -> None:
    if sys.argv[1:2] == ["make-keys"]:
        asyncio.run(make_keys(int(sys.argv[2]), Path(sys.argv[3])))
        return
    raise SystemExit("usage: memory.py make-keys N FILE (run by bench/run.py)")


if __name__ == "__main__":
    main()


__all__ = ["PLAN_LIMITS", "hold_streams", "make_keys", "one_each"]
