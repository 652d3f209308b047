"""Scale-out: processes sharing PostgreSQL and Redis see each other's changes within a second,
``serve --workers N`` shares one port and one set of limits, and usage lands in one rollup."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    REDIS_URL,
    Gateway,
    Upstream,
    drop_redis_prefix,
    make_gateway,
    slow_model_toml,
)
from tests.test_limits_e2e import BODY, account_with_plan, burst


@pytest.fixture(scope="module")
def shared_env() -> Iterator[dict[str, str]]:
    prefix = f"cgscale-{secrets.token_hex(4)}:"
    yield {
        "CHATGATE_REDIS_URL": REDIS_URL,
        "CHATGATE_REDIS_PREFIX": prefix,
    }
    drop_redis_prefix(prefix)


def test_revoke_and_plan_change_reach_every_node(
    pg_url: str, upstream: Upstream, shared_env: dict[str, str], tmp_path: Path
) -> None:
    nodes = [
        make_gateway(
            tmp_path / f"n{i}", database_url=pg_url, upstream=upstream, extra_env=shared_env
        ).start()
        for i in range(2)
    ]
    try:
        email = f"s{secrets.token_hex(4)}@example.com"
        nodes[0].cli("accounts", "create", email, "--plan", "enterprise")
        issued = nodes[0].cli_json("keys", "create", "--account", email)
        headers = {"Authorization": f"Bearer {issued['key']}"}

        def status(node: Gateway) -> int:
            return requests.post(
                node.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
            ).status_code

        assert [status(n) for n in nodes] == [200, 200]  # cached on both
        nodes[0].cli("accounts", "set-plan", email, "free")  # free: rpd 1000, rpm 20
        time.sleep(1.0)
        limited = requests.post(
            nodes[1].url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
        )
        assert limited.headers["x-ratelimit-limit-requests"] == "20"
        nodes[1].cli("keys", "revoke", issued["id"])
        time.sleep(1.0)
        assert [status(n) for n in nodes] == [401, 401]
        # Usage from both nodes lands in one set of rollups.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            report = json.loads(
                nodes[0]
                .cli("usage", "--account", email, "--since", "1d", "--format", "json")
                .stdout
            )
            if report["totals"]["requests"] >= 3:
                break
            time.sleep(0.5)
        assert report["totals"]["requests"] == 3  # a 401 has no account: not in its usage
    finally:
        for node in nodes:
            node.stop()


def test_workers_share_port_and_limits(
    pg_url: str, upstream: Upstream, shared_env: dict[str, str], tmp_path: Path
) -> None:
    gw = make_gateway(tmp_path / "w", database_url=pg_url, upstream=upstream, extra_env=shared_env)
    gw.start("--workers", "2")
    try:
        key = account_with_plan(gw, rpd=29)
        statuses = asyncio.run(burst([gw.url], key, 150))
        assert statuses.count(200) == 29 and statuses.count(429) == 121
    finally:
        assert gw.stop() == 0


def test_workers_without_redis_refuse(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path / "nr")
    result = gw.cli("serve", "--workers", "2", check=False)
    assert result.returncode == 2 and "CHATGATE_REDIS_URL" in result.stderr


def test_workers_that_cannot_serve_fail_the_command(
    shared_env: dict[str, str], tmp_path: Path
) -> None:
    """A port that is taken is a failed start, as with one process: a one-line error and exit
    status 2, not 0, which a supervisor would read as a clean stop. It is found before the
    workers start (it was a traceback from each, then "2 of 2 workers failed")."""
    gw = make_gateway(tmp_path / "busy", extra_env=shared_env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        alone = gw.cli("serve", "--port", port, check=False)
        result = gw.cli("serve", "--workers", "2", "--port", port, check=False)
    assert alone.returncode == 2 and "address already in use" in alone.stderr.lower()
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"chatgate: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in result.stderr and "worker" not in result.stderr


def test_workers_do_not_join_another_servers_workers_on_their_port(
    shared_env: dict[str, str], tmp_path: Path
) -> None:
    """QA: a second ``serve --workers 2`` on the port of a first one started beside it (its
    workers bind with SO_REUSEPORT, which the first's allow), made an admin account of its own
    and took half the first one's traffic. The port is now checked bound alone."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a worker binds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        gw = make_gateway(tmp_path / "second", extra_env=shared_env)
        result = gw.cli("serve", "--workers", "2", "--port", port, check=False, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"chatgate: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "CHATGATE_API_KEY=" not in result.stdout  # no admin account made


def _children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc: no extra package)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_for(what: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_dead_worker_is_replaced_and_workers_die_with_their_parent(
    pg_url: str, upstream: Upstream, shared_env: dict[str, str], tmp_path: Path
) -> None:
    """QA: a worker killed under ``--workers 2`` was not replaced, and ``kill -9`` of the
    parent left both workers serving, so a supervisor's restart ran beside them (the port is
    shared) with the old code and settings. Now the parent starts another worker, and the
    workers stop with the parent, however it dies."""
    gw = make_gateway(
        tmp_path / "orphans", database_url=pg_url, upstream=upstream, extra_env=shared_env
    )
    gw.start("--workers", "2")
    assert gw.proc is not None
    parent = gw.proc.pid
    try:
        # Each worker logs "Running on" once it serves (one killed before is a failed start).
        _wait_for(lambda: gw.logs().count("Running on") == 2)
        first = sorted(_children(parent))
        os.kill(first[0], signal.SIGKILL)
        _wait_for(lambda: gw.logs().count("Running on") == 3)
        assert f"worker {first[0]} stopped (signal 9); starting another" in gw.logs()
        workers = _children(parent)
        assert len(workers) == 2 and first[0] not in workers
        # A replacement killed as it starts (QA: the parent took it for a failed start and
        # stopped the whole server, the serving worker too) is replaced in its turn.
        os.kill(first[1], signal.SIGKILL)
        _wait_for(lambda: len(_children(parent) - workers) == 1)
        [starting] = _children(parent) - workers
        os.kill(starting, signal.SIGKILL)
        _wait_for(lambda: len(_children(parent) - workers - {starting}) == 1, 90)
        _wait_for(lambda: gw.logs().count("Running on") >= 4)
        assert f"worker {starting} " in gw.logs()
        workers = _children(parent)
        assert len(workers) == 2
        for _ in range(20):  # both workers answer (the port picks either)
            assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200
    finally:
        os.kill(parent, signal.SIGKILL)
        gw.proc.wait(30)
    _wait_for(lambda: not any(_alive(pid) for pid in workers))


def test_workers_stop_gracefully_when_their_process_group_is_signalled(
    pg_url: str, upstream: Upstream, shared_env: dict[str, str], tmp_path: Path
) -> None:
    """QA: a SIGTERM to the whole process group of ``serve --workers 2`` (systemd's default,
    Ctrl+C, ``timeout``) reaches each worker twice, its own and its parent's forwarding; the
    second cancelled the requests the first one's stop was finishing ("Unhandled exception
    ... GracefulExit", recorded as 499 while the client waited) and the command failed ("2 of
    2 workers failed", exit 2). Now the first signal stops a worker, later ones change
    nothing: the requests in flight are answered and the command ends with 0."""
    slow = slow_model_toml(upstream)
    gw = make_gateway(
        tmp_path / "group",
        database_url=pg_url,
        upstream=upstream,
        extra_env=shared_env,
        extra_toml=slow,
    )
    gw.start("--workers", "2")
    assert gw.proc is not None
    parent = gw.proc.pid
    try:
        _wait_for(lambda: gw.logs().count("Running on") == 2)
        key = account_with_plan(gw)
        marker = f"group-{secrets.token_hex(4)}"
        body = {
            "model": "gpt-slow",
            "messages": [{"role": "user", "content": marker}],
            "fake": {"delay": 2},
        }

        async def in_flight() -> list[int]:
            task = asyncio.ensure_future(burst([gw.url], key, 6, body))
            await asyncio.to_thread(
                _wait_for, lambda: sum(marker in str(b) for b in upstream.received()) == 6
            )
            for pid in _children(parent):  # as os.killpg would, with the parent's
                os.kill(pid, signal.SIGTERM)  # forwarding later, as the stop is under way
            await asyncio.sleep(0.5)
            os.kill(parent, signal.SIGTERM)
            return await task

        statuses = asyncio.run(in_flight())
        assert statuses == [200] * 6
        assert gw.proc.wait(60) == 0
    finally:
        if gw.proc.poll() is None:
            os.kill(parent, signal.SIGKILL)
            gw.proc.wait(30)
    assert "worker failed" not in gw.logs() and "GracefulExit" not in gw.logs()


def test_metrics_of_workers_are_scraped_as_one(
    pg_url: str, upstream: Upstream, shared_env: dict[str, str], tmp_path: Path
) -> None:
    """``/metrics`` under ``--workers 2`` answered the figures of whichever worker the port
    picked: each scrape a part, which Prometheus reads as counter resets. Now every scrape sums
    the workers (the others' figures are up to a second old, never older than a scrape before
    showed them: the counts never go back), a dead worker's counts included."""
    gw = make_gateway(tmp_path / "m", database_url=pg_url, upstream=upstream, extra_env=shared_env)
    gw.start("--workers", "2")
    assert gw.proc is not None
    try:
        _wait_for(lambda: gw.logs().count("Running on") == 2)
        key = account_with_plan(gw)
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(30):  # a new connection each: the port spreads them over both workers
            answer = requests.post(
                gw.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
            )
            assert answer.status_code == 200

        def answered() -> float:
            text = requests.get(gw.url + "/metrics", timeout=10).text
            ok = {"endpoint": "chat.completions", "model": "gpt-test", "status": "200"}
            return sum(
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "chatgate_requests_total" and s.labels == ok
            )

        seen = [answered()]  # scraped at once: the other worker's file may be behind...
        deadline = time.monotonic() + 10
        while seen[-1] != 30 and time.monotonic() < deadline:
            seen.append(answered())
        assert seen == sorted(seen) and seen[-1] == 30, seen  # ...but never goes back
        assert [answered() for _ in range(8)] == [30] * 8
        time.sleep(1.5)  # each worker's file has its last requests
        os.kill(min(_children(gw.proc.pid)), signal.SIGKILL)
        _wait_for(lambda: gw.logs().count("Running on") == 3)
        assert [answered() for _ in range(8)] == [30] * 8
    finally:
        gw.stop()
