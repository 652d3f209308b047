"""What the benchmark runs besides chatgate: its own databases, the floor and LiteLLM.

Everything listens on 127.0.0.1 only and is stopped by the caller (``Proc.stop``). The
peers live in virtual environments of their own under ``bench/``, created on first use and
kept (a marker file names the pinned packages; change a pin and the venv is rebuilt):

- ``bench/.venv-bench``: granian (the floor's server) and py-spy (the profile);
- ``bench/.venv-litellm``: LiteLLM's proxy at :data:`LITELLM`. Never 1.107.0 (a known-bad
  release): the pin is exact and checked after the install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port, wait_http  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402
from tests.usage.pgserver import PgServer  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

BENCH = ROOT / "bench"
FLOOR_PACKAGES = (
    "granian==2.8.7",
    "aiohttp==3.14.5",
    "orjson==3.13.0",
    "uvloop==0.23.0",
    "py-spy==0.4.3",
)
LITELLM = "1.105.7"
LITELLM_PACKAGES = (f"litellm[proxy]=={LITELLM}",)
GATEWAY_CORE, OTHER_CORE = "0", "1"


HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
"""How long an idle vCPU of a KVM guest polls before it halts (the ``haltpoll`` cpuidle
driver). This machine boots with ``haltpoll.guest_halt_poll_ns=0``: an idle core halts at
once, and waking it again (a request arriving, an answer coming back from the other core)
goes through the hypervisor. At one connection every request wakes a core several times."""


def halt_poll_ns() -> int | None:
    """The machine's halt polling in nanoseconds (``None``: not a KVM guest with haltpoll)."""
    try:
        return int(HALT_POLL.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def halt_polling(ns: int | None) -> Iterator[int | None]:
    """With ``ns`` set: the machine's halt polling set to it for the block, and put back
    after (a machine-wide setting: root only, opt-in, see ``--halt-poll-ns``). Yields the
    value in force."""
    before = halt_poll_ns()
    if ns is None or before is None:
        yield before
        return
    try:
        HALT_POLL.write_text(str(ns))
    except OSError as exc:
        raise SystemExit(f"bench: cannot set {HALT_POLL} ({exc}): run as root") from exc
    try:
        yield ns
    finally:
        HALT_POLL.write_text(str(before))


def pinned(core: str | None, cmd: list[str]) -> list[str]:
    """``cmd`` run on one core (``None``: anywhere)."""
    return cmd if core is None else ["taskset", "-c", core, *cmd]


def ensure_venv(name: str, packages: tuple[str, ...]) -> Path:
    """``bench/<name>`` with exactly ``packages`` installed (cached); its ``bin`` folder."""
    venv = BENCH / name
    marker = venv / ".bench-packages"
    wanted = "\n".join(packages)
    if marker.is_file() and marker.read_text() == wanted:
        return venv / "bin"
    print(f"bench: installing {', '.join(packages)} into bench/{name} ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *packages], check=True, stderr=subprocess.DEVNULL)
    marker.write_text(wanted)
    return venv / "bin"


@dataclass
class Proc:
    """A process the benchmark started (``pid`` for CPU and memory readings)."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_pg() -> PgServer:
    """A PostgreSQL of the benchmark's own, on the load generator's core (not the gateway's)."""
    server = PgServer()
    server._as = ["taskset", "-c", OTHER_CORE, *server._as]  # the command prefix PgServer runs with
    server.start()
    return server


async def migrated_engine(url: str) -> AsyncEngine:
    """An engine on the benchmark's PostgreSQL at ``url`` (a plain ``postgresql://`` URL, as
    :func:`start_pg` gives), its schema migrated as ``chatgate serve`` does. chatgate is
    imported here, not with this module: what imports this one may run another tree's."""
    from chatgate.db.engine import create_engine, migrate
    from chatgate.settings import Settings

    engine = create_engine(Settings(database_url=url))
    await migrate(engine)
    return engine


def start_redis(workdir: Path) -> tuple[Proc, str]:
    """A redis-server of the benchmark's own (clean ``INFO commandstats``), on the other core."""
    server = RedisServer(workdir=workdir, prefix=pinned(OTHER_CORE, [])).start()
    assert server.proc is not None
    return Proc("redis", server.proc, server.url), server.url


def redis_commandstats(url: str) -> dict[str, int]:
    """Calls per command since the last reset (``INFO commandstats``)."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, "info", "commandstats"], capture_output=True, text=True
    ).stdout
    stats: dict[str, int] = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls = dict(kv.split("=") for kv in rest.split(","))["calls"]
            stats[name.removeprefix("cmdstat_")] = int(calls)
    return stats


def redis_reset_stats(url: str) -> None:
    port = url.rsplit(":", 1)[1].split("/")[0]
    subprocess.run(["redis-cli", "-p", port, "config", "resetstat"], capture_output=True)


def start_floor(bin_dir: Path, upstream_base: str, key: str) -> Proc:
    """The bare-Python floor (bench/floor.py) on granian RSGI, on the gateway's core."""
    port = free_port()
    cmd = [
        str(bin_dir / "granian"),
        "--interface",
        "rsgi",
        "--loop",
        "uvloop",
        "--no-ws",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "floor:app",
    ]
    return _floor("floor", cmd, port, upstream_base, key)


def start_floor_aiohttp(bin_dir: Path, upstream_base: str, key: str) -> Proc:
    """The same floor on aiohttp.web (chatgate's server stack), on the gateway's core."""
    port = free_port()
    cmd = [str(bin_dir / "python"), str(BENCH / "floor.py"), "--port", str(port)]
    return _floor("floor-aiohttp", cmd, port, upstream_base, key)


def _floor(name: str, cmd: list[str], port: int, upstream_base: str, key: str) -> Proc:
    env = {
        **os.environ,
        "FLOOR_UPSTREAM": upstream_base,
        "FLOOR_KEY": key,
        "PYTHONPATH": str(BENCH),
    }
    proc = subprocess.Popen(pinned(GATEWAY_CORE, cmd), env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_post(url, proc)
    return Proc(name, proc, url)


def start_litellm(bin_dir: Path, upstream_base: str, workdir: Path, master_key: str) -> Proc:
    """LiteLLM's proxy (one worker, its defaults) pointed at the fake upstream."""
    version = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != LITELLM:  # never anything else, 1.107.0 least of all
        raise RuntimeError(f"bench/.venv-litellm holds litellm {version}, not {LITELLM}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gpt-test\n"
        "    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: {upstream_base}\n"
        "      api_key: sk-fake-upstream\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from the internet at start
        "LITELLM_TELEMETRY": "False",
    }
    cmd = [
        str(bin_dir / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    with open(workdir / "litellm.log", "ab") as log:
        proc = subprocess.Popen(
            pinned(GATEWAY_CORE, cmd), env=env, cwd=workdir, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", proc, timeout=120)
    return Proc("litellm", proc, url)


def _wait_post(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            requests.get(url + "/", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise TimeoutError(url)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every descendant (granian and ``serve --workers`` fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MB."""
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def post_ok(url: str, key: str, body: dict[str, object]) -> None:
    """One request that must succeed (a start-up check)."""
    resp = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    resp.raise_for_status()
