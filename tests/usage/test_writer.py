"""The usage writer process on real SQLite and PostgreSQL: records reach the database through it;
a writer killed with batches unconfirmed is replaced and sent them again; a gateway killed
leaves the writer to write what it was sent; a stop with a dead writer loses nothing; the writer
ignores the signals a terminal or supervisor sends to the whole process group."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.settings import Settings
from chatgate.usage.recorder import UsageRecorder
from chatgate.usage.tables import usage_records
from chatgate.usage.writer import UsageWriter
from tests.usage.factory import make_record, new_account, settings_for

ROOT = Path(__file__).resolve().parents[2]


async def stored(engine: AsyncEngine, account: str) -> int:
    query = sa.select(sa.func.count()).where(usage_records.c.account_id == account)
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


@pytest.fixture
def settings(database_url: str, tmp_path: Path, engine: AsyncEngine) -> Settings:
    # No timer sends in these tests: only a full batch, flush() and close() do.
    return replace(settings_for(database_url, tmp_path / "data"), usage_flush_interval=3600)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


async def gone(pid: int, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not alive(pid)


async def test_records_reach_the_database_through_a_process_of_their_own(
    engine: AsyncEngine, settings: Settings
) -> None:
    writer = UsageWriter(settings)
    writer.start()
    account = new_account()
    assert writer.pid is None  # nothing recorded, nothing started
    for _ in range(50):
        writer.record(make_record(account_id=account))
    assert writer.queue_depth == 50
    await writer.flush()
    pid = writer.pid
    assert pid is not None and pid != os.getpid()
    assert await stored(engine, account) == 50
    assert (writer.written, writer.queue_depth, writer.dropped) == (50, 0, 0)
    for _ in range(7):
        writer.record(make_record(account_id=account))
    await writer.close()
    assert await stored(engine, account) == 57  # close() sends the rest and waits for it
    assert writer.pid is None and await gone(pid)
    assert writer.starts == 1


async def test_a_killed_writer_is_replaced_and_sent_its_unconfirmed_batches_again(
    engine: AsyncEngine, settings: Settings
) -> None:
    writer = UsageWriter(settings)
    writer.start()
    account = new_account()
    writer.record(make_record(account_id=account))
    await writer.flush()
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # it reads nothing more: what follows stays unconfirmed
    for _ in range(30):
        writer.record(make_record(account_id=account))
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(0)  # the batch is written to the stopped writer's pipe
    assert writer.queue_depth == 30
    os.kill(first, signal.SIGKILL)
    await asyncio.wait_for(flushing, 60)  # answered by the writer started in its place
    assert writer.starts == 2 and writer.pid not in (None, first)
    assert await stored(engine, account) == 31
    assert writer.queue_depth == 0
    await writer.close()


async def test_a_killed_gateway_leaves_its_writer_to_write_what_it_was_sent(
    engine: AsyncEngine, settings: Settings
) -> None:
    account = new_account()
    script = (
        "import asyncio, pickle, sys\n"
        "from chatgate.usage.writer import UsageWriter\n"
        "from tests.usage.factory import make_record\n"
        "async def main():\n"
        "    w = UsageWriter(pickle.loads(bytes.fromhex(sys.argv[1])))\n"
        "    for _ in range(40):\n"
        "        w.record(make_record(account_id=sys.argv[2]))\n"
        "    asyncio.create_task(w.flush())\n"
        "    while w.pid is None:\n"
        "        await asyncio.sleep(0.01)\n"
        "    print(w.pid, flush=True)\n"  # the batch is in the pipe once the writer has a pid
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    gateway = subprocess.Popen(
        [sys.executable, "-c", script, pickle.dumps(settings).hex(), account],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert gateway.stdout is not None
        line = await asyncio.to_thread(gateway.stdout.readline)
        pid = int(line)
    finally:
        gateway.kill()  # SIGKILL: no close(), no goodbye
        gateway.wait()
    assert await gone(pid)
    assert await stored(engine, account) == 40


async def test_a_stop_with_a_dead_writer_loses_nothing(
    engine: AsyncEngine, settings: Settings
) -> None:
    writer = UsageWriter(settings)
    writer.start()
    account = new_account()
    writer.record(make_record(account_id=account))
    await writer.flush()
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    for _ in range(20):
        writer.record(make_record(account_id=account))
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(0)
    os.kill(pid, signal.SIGKILL)
    await writer.close()  # to a new writer, or to the spool when there was none to ask
    await asyncio.wait_for(flushing, 60)  # a flush waiting meanwhile returns
    replay = UsageRecorder(engine, settings.data_dir / "spool")
    await replay.flush()  # a later start replays a spool left behind
    await replay.close()
    assert await stored(engine, account) == 21


async def test_the_writer_ignores_a_signal_to_the_process_group(
    engine: AsyncEngine, settings: Settings
) -> None:
    writer = UsageWriter(settings)
    writer.start()
    account = new_account()
    writer.record(make_record(account_id=account))
    await writer.flush()
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    os.kill(pid, signal.SIGTERM)
    writer.record(make_record(account_id=account))
    await writer.flush()
    assert writer.pid == pid and writer.starts == 1
    await writer.close()
    assert await stored(engine, account) == 2


def test_the_writer_setting_takes_only_known_ways() -> None:
    assert Settings.from_env({"CHATGATE_USAGE_WRITER": "Inline"}).usage_writer == "inline"
    assert Settings.from_env({}).usage_writer == "process"
    with pytest.raises(ValueError, match="CHATGATE_USAGE_WRITER must be one of process, inline"):
        Settings.from_env({"CHATGATE_USAGE_WRITER": "thread"})
