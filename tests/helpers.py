"""Real processes for the tests: the fake upstream, chatgate servers, fresh databases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Upstream:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def received(self) -> list[dict[str, Any]]:
        return requests.get(f"http://127.0.0.1:{self.port}/_requests", timeout=5).json()

    def clear(self) -> None:
        requests.delete(f"http://127.0.0.1:{self.port}/_requests", timeout=5)


def start_upstream(chunks: int = 20) -> Upstream:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "fake_upstream.py"),
            "--port",
            str(port),
            "--chunks",
            str(chunks),
        ],
    )
    wait_http(f"http://127.0.0.1:{port}/_requests", proc)
    return Upstream(port, proc)


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN.replace("postgresql", "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_admin(sql: str) -> None:
    """Run one statement on the shared PostgreSQL as its superuser (not in a test database)."""
    asyncio.run(_pg(sql))


def create_pg_database() -> str:
    """A fresh PostgreSQL database for this run; returns its URL."""
    name = "chatgate_test_" + secrets.token_hex(6)
    pg_admin(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_redis_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under ``prefix`` in the shared Redis: a test's own, when it is done."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
    finally:
        client.close()


def slow_model_toml(upstream: Upstream) -> str:
    """``gpt-slow``: the fake upstream answers after ``fake.delay`` seconds (a request in
    flight for as long as a test needs)."""
    return f"""
[[models]]
name = "gpt-slow"
base_url = "{upstream.base_url}"
upstream_model = "slow"
"""


def models_toml(upstream: Upstream, extra: str = "") -> str:
    return f"""
[[models]]
name = "gpt-test"
base_url = "{upstream.base_url}"
upstream_model = "fake-model"
api_key_env = "FAKE_UPSTREAM_KEY"

[[models]]
name = "gpt-other"
base_url = "{upstream.base_url}"
upstream_model = "other-model"

[[models]]
name = "gpt-no-usage"
base_url = "{upstream.base_url}"
upstream_model = "no-usage"

[[models]]
name = "gpt-bad-usage"
base_url = "{upstream.base_url}"
upstream_model = "bad-usage"

[[models]]
name = "gpt-dead"
base_url = "http://127.0.0.1:{free_port()}/v1"
upstream_model = "dead"
{extra}
"""


@dataclass
class Gateway:
    """A real ``chatgate serve`` process and the CLI pointed at the same storage."""

    workdir: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``chatgate *args`` on this gateway's storage; ``env`` is added to its environment,
        and ``timeout`` bounds it (a ``serve`` that starts instead of failing keeps running:
        the timeout fails the test); ``input`` is its stdin, a pipe (else it has none)."""
        result = subprocess.run(
            [str(BIN / "chatgate"), *args],
            env={**self.env, **(env or {})},
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"chatgate {' '.join(args)} failed: {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, *args: str) -> Gateway:
        self.port = free_port()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "chatgate"), "serve", "--port", str(self.port), *args],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_http(self.url + "/healthz", self.proc, timeout=120)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop(self.proc, sig)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


SHARED_DB_SECRET = "test-session-secret-" + secrets.token_urlsafe(24)
"""The server secret of gateways given a database (one per test session, as one per
deployment): a gateway of its own data directory's database makes its own."""


def make_gateway(
    workdir: Path,
    *,
    database_url: str = "",
    upstream: Upstream | None = None,
    local_model: bool = False,
    extra_env: dict[str, str] | None = None,
    extra_toml: str = "",
) -> Gateway:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OPENAI_"))}
    env.update(
        CHATGATE_DATA_DIR=str(workdir / "data"),
        CHATGATE_LOCAL_MODEL="1" if local_model else "0",
        CHATGATE_LOG_LEVEL="INFO",
        FAKE_UPSTREAM_KEY="sk-upstream-secret-" + secrets.token_hex(8),
    )
    if database_url:
        env["CHATGATE_DATABASE_URL"] = database_url
        # Every node of one database shares its server secret (a node with another refuses
        # to start): the test session's databases are shared by many gateways.
        env["CHATGATE_SECRET"] = SHARED_DB_SECRET
    if upstream is not None:
        (workdir / "chatgate.toml").write_text(models_toml(upstream, extra_toml))
        env["CHATGATE_CONFIG"] = str(workdir / "chatgate.toml")
    env.update(extra_env or {})
    return Gateway(workdir, env)


@contextlib.asynccontextmanager
async def served_app(
    workdir: Path,
    upstream: Upstream,
    *,
    env: dict[str, str] | None = None,
    extra_toml: str = "",
    shutdown_timeout: float = 60.0,
) -> AsyncIterator[tuple[TestServer, str]]:
    """The app in process (SQLite in ``workdir``) with the fake upstream's models, and a key
    of a new account on the default plan (the free one: it has token limits). Leaving it stops
    the server as SIGTERM does ``chatgate serve``: ``shutdown_timeout`` for requests in flight
    (twice), then they are cancelled."""
    from aiohttp.test_utils import TestServer

    from chatgate.accounts import AccountStore
    from chatgate.app import SERVER_OPTIONS, create_app
    from chatgate.db.engine import create_engine, migrate
    from chatgate.keys.store import KeyStore
    from chatgate.settings import Settings

    (workdir / "chatgate.toml").write_text(models_toml(upstream, extra_toml))
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(workdir / "data"),
            "CHATGATE_CONFIG": str(workdir / "chatgate.toml"),
            "CHATGATE_LOCAL_MODEL": "0",
            **(env or {}),
        }
    )
    engine = create_engine(settings)
    await migrate(engine)
    account = await AccountStore(engine).create(f"t{secrets.token_hex(4)}@example.com")
    issued = await KeyStore(engine, settings.resolved_secret()).create(account.id)
    server = TestServer(create_app(settings), host="127.0.0.1", **SERVER_OPTIONS)
    await server.start_server(shutdown_timeout=shutdown_timeout)
    try:
        yield server, issued.key
    finally:
        await server.close()
        await engine.dispose()


async def stored_usage(
    workdir: Path, *columns: str
) -> tuple[list[Any], dict[str, tuple[int, int]]]:
    """``columns`` of every usage record a :func:`served_app` in ``workdir`` stored (read after
    it stopped, which flushes them), and the rollups' request and error sums a model."""
    import sqlalchemy as sa

    from chatgate.db.engine import create_engine
    from chatgate.settings import Settings
    from chatgate.usage.tables import MINUTE, usage_records, usage_rollups

    engine = create_engine(Settings.from_env({"CHATGATE_DATA_DIR": str(workdir / "data")}))
    try:
        async with engine.connect() as conn:
            records = (await conn.execute(sa.select(*(usage_records.c[c] for c in columns)))).all()
            r = usage_rollups.c
            sums = sa.select(r.model, sa.func.sum(r.requests), sa.func.sum(r.errors))
            rollups = await conn.execute(sums.where(r.width == MINUTE).group_by(r.model))
            return records, {model: (n, errors) for model, n, errors in rollups}
    finally:
        await engine.dispose()
