"""Upstream failures end to end: a real ``chatgate serve`` against real misbehaving upstreams.

Every upstream is a process on loopback: fake upstreams that hang, answer 500 or 429, stall or
die mid-stream, and free ports with nothing listening (refused connections). Timeouts in the
config are short, so each case finishes quickly; the tests assert what the client gets (status,
error code, SSE error event), never how long it took.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import (
    REDIS_URL,
    ROOT,
    create_pg_database,
    drop_pg_database,
    drop_redis_prefix,
    free_port,
    make_gateway,
    pg_admin,
    start_upstream,
    stop,
    wait_http,
)

TIMEOUTS = """connect_timeout = 0.5
first_byte_timeout = 1.0
idle_timeout = 0.5
total_timeout = 5
retry_backoff = 0.01
retry_backoff_max = 0.05
"""


MAX_ANSWER = 64 * 1024


def table(name: str, base_url: str, upstream_model: str, extra: str = "") -> str:
    return (
        f'\n[[models]]\nname = "{name}"\nbase_url = "{base_url}"\n'
        f'upstream_model = "{upstream_model}"\n{TIMEOUTS}{extra}'
    )


class World:
    """The upstreams, the gateway and an admin key, shared by the module's tests."""

    def __init__(self, tmp: Path) -> None:
        self.up = start_upstream(chunks=5)
        self.primary = start_upstream(chunks=5)
        self.secondary = start_upstream(chunks=5)
        self.revive_port = free_port()
        dead = f"http://127.0.0.1:{free_port()}/v1"
        ok = self.up.base_url
        revive = f"http://127.0.0.1:{self.revive_port}/v1"
        toml = "".join(
            [
                table("r-refuse", dead, "fake-model", "breaker_failures = 1000\n"),
                table("r-hang", ok, "hang", "retries = 0\n"),
                table("r-500", ok, "fail-500"),
                table("r-429", ok, "fail-429"),
                table("r-stall", ok, "stall-stream"),
                table("r-die", ok, "break-stream"),
                table("r-not-an-answer", ok, "not-an-answer"),
                table("r-drop", ok, "drop", "retries = 0\n"),
                table("r-moved", ok.replace("/v1", "/moved/v1"), "fake-model"),
                table("r-fallback", dead, "fake-model", "retries = 0\n"),
                table("r-fallback", ok, "hang"),
                table("r-fallback", ok, "fail-500"),
                table("r-fallback", ok, "fail-429"),
                table("r-fallback", ok, "fake-model"),
                table("r-stream-fb", ok, "stall-stream"),
                table("r-stream-fb", ok, "fake-model"),
                table("r-429-then-dead", ok, "fail-429"),
                table("r-429-then-dead", dead, "fake-model"),
                table(
                    "r-revive",
                    revive,
                    "fake-model",
                    "retries = 0\nbreaker_failures = 2\nbreaker_cooldown = 1\n",
                ),
                table("gpt-ha", self.primary.base_url, "fake-model", "breaker_failures = 3\n"),
                table("gpt-ha", self.secondary.base_url, "fake-model"),
            ]
        )
        self.gw = make_gateway(
            tmp,
            upstream=self.up,
            extra_toml=toml,
            # Far above any answer here but the one test_an_answer_too_large_is_502 asks for.
            extra_env={"CHATGATE_UPSTREAM_MAX_ANSWER_BYTES": str(MAX_ANSWER)},
        ).start()
        printed = [line for line in self.gw.logs().splitlines() if "CHATGATE_API_KEY=" in line]
        self.admin_key = printed[0].split("=", 1)[1].strip()
        email = f"user-{int(time.time() * 1000)}@example.com"
        self.gw.cli("accounts", "create", email, "--plan", "enterprise")
        self.user_key = self.gw.cli_json("keys", "create", "--account", email)["key"]
        self.revived: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        self.gw.stop()
        for proc in (self.up.proc, self.primary.proc, self.secondary.proc, self.revived):
            if proc is not None:
                stop(proc)

    def post(self, body: dict[str, Any], *, key: str | None = None, **kw: Any) -> Any:
        return requests.post(
            self.gw.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key or self.user_key}"},
            timeout=30,
            **kw,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        resp = requests.get(
            self.gw.url + "/api/admin/backends",
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        return {row["deployment"]: row for row in resp.json()["data"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(Path(tmp_path_factory.mktemp("resilience")))
    yield w
    w.close()


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], **extra}


def assert_error(resp: Any, status: int, code: str, model: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert f"`{model}`" in error["message"]
    assert "127.0.0.1" not in error["message"] and "http" not in error["message"]
    assert resp.headers["x-request-id"].startswith("req_")
    return dict(error)


def sse_events(resp: Any) -> list[str]:
    return [line[6:] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]


# -- one failing upstream, nothing to fall back to --------------------------------------------


def test_refused_connection_is_502(world: World) -> None:
    error = assert_error(world.post(body("r-refuse")), 502, "upstream_error", "r-refuse")
    assert error["type"] == "server_error"
    assert world.status()["r-refuse#0"]["last_error"] == "connect"


def test_hanging_upstream_is_504(world: World) -> None:
    assert_error(world.post(body("r-hang")), 504, "upstream_timeout", "r-hang")
    streamed = world.post(body("r-hang", stream=True), stream=True)
    assert_error(streamed, 504, "upstream_timeout", "r-hang")


def test_500_is_502(world: World) -> None:
    assert_error(world.post(body("r-500")), 502, "upstream_error", "r-500")


def test_an_upstream_that_drops_the_request_is_a_broken_connection_not_a_refused_one(
    world: World,
) -> None:
    """A connection closed after the request went out was reported as "could not be
    reached" and labelled ``connect``, as a refused one: the status page and the metrics
    pointed at the network when the upstream had crashed on the request."""
    error = assert_error(world.post(body("r-drop")), 502, "upstream_error", "r-drop")
    assert "closed the connection before answering" in error["message"]
    assert world.status()["r-drop#0"]["last_error"] == "broken"


def test_a_200_that_is_not_an_answer_is_502(world: World) -> None:
    """A 200 whose JSON had no list of choices (or of embeddings) was relayed as it came, and
    the client's SDK failed on it; now it is the upstream's failure, as invalid JSON is."""
    assert_error(world.post(body("r-not-an-answer")), 502, "upstream_error", "r-not-an-answer")
    resp = requests.post(
        world.gw.url + "/v1/embeddings",
        json={"model": "r-not-an-answer", "input": "hi"},
        headers={"Authorization": f"Bearer {world.user_key}"},
        timeout=30,
    )
    assert_error(resp, 502, "upstream_error", "r-not-an-answer")


def test_an_answer_too_large_is_502_and_the_next_one_is_served(world: World) -> None:
    """A whole answer had no bound: an upstream's gigabytes (or a small gzip of them) were
    read into memory. Past CHATGATE_UPSTREAM_MAX_ANSWER_BYTES it is the upstream's failure."""

    def embed(count: int) -> Any:
        return requests.post(
            world.gw.url + "/v1/embeddings",
            json={"model": "r-500", "input": ["hi"] * count},  # r-500 embeds (chat fails)
            headers={"Authorization": f"Bearer {world.user_key}"},
            timeout=30,
        )

    small = embed(10)
    assert small.status_code == 200 and len(small.content) < MAX_ANSWER
    error = assert_error(embed(2_000), 502, "upstream_error", "r-500")  # ~150 KB of vectors
    assert "larger than chatgate relays (65,536 bytes)" in error["message"]
    assert len(embed(10).json()["data"]) == 10


def test_429_stays_429_with_the_retry_hint(world: World) -> None:
    resp = world.post(body("r-429"))
    error = assert_error(resp, 429, "rate_limit_exceeded", "r-429")
    assert error["type"] == "requests"
    assert resp.headers["retry-after"] == "2" and resp.headers["retry-after-ms"] == "2000"


def test_429_then_nothing_reachable_is_still_429(world: World) -> None:
    resp = world.post(body("r-429-then-dead"))
    assert_error(resp, 429, "rate_limit_exceeded", "r-429-then-dead")
    assert resp.headers["retry-after"] == "2"


@pytest.mark.parametrize(
    ("model", "code"), [("r-stall", "upstream_timeout"), ("r-die", "upstream_error")]
)
def test_stream_broken_midway_ends_with_an_error_event(world: World, model: str, code: str) -> None:
    with world.post(body(model, stream=True), stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)  # returns: the server closed the stream cleanly
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    error = json.loads(events[-1])["error"]
    assert error["code"] == code and f"`{model}`" in error["message"]
    assert "127.0.0.1" not in error["message"]


# -- fallback --------------------------------------------------------------------------------


def test_fallback_past_refused_hanging_500_and_429_upstreams(world: World) -> None:
    resp = world.post(body("r-fallback"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("echo")
    status = world.status()
    assert [status[f"r-fallback#{i}"]["last_error"] for i in range(5)] == [
        "connect",
        "timeout",
        "500",
        "429",
        None,
    ]


def test_stream_falls_back_while_nothing_was_sent(world: World) -> None:
    # The first deployment sends its headers, then nothing: the first-byte limit passes.
    req = body("r-stream-fb", stream=True, fake={"after": 0})
    with world.post(req, stream=True) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in events[:-1])
    assert world.status()["r-stream-fb#0"]["last_error"] == "timeout"


# -- the breaker, end to end -------------------------------------------------------------------


def test_breaker_opens_on_a_dead_upstream_and_closes_once_it_is_back(world: World) -> None:
    for _ in range(2):
        assert_error(world.post(body("r-revive")), 502, "upstream_error", "r-revive")
    assert world.status()["r-revive#0"]["state"] == "open"
    fast = world.post(body("r-revive"))  # no attempt: the circuit is open
    assert_error(fast, 502, "upstream_error", "r-revive")
    assert "available" in fast.json()["error"]["message"]
    assert int(fast.headers["retry-after"]) >= 1

    world.revived = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(world.revive_port)]
    )
    wait_http(f"http://127.0.0.1:{world.revive_port}/_requests", world.revived)
    deadline = time.monotonic() + 20
    while world.status()["r-revive#0"]["state"] != "half_open":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert world.post(body("r-revive")).status_code == 200  # the probe
    assert world.status()["r-revive#0"]["state"] == "closed"


def test_kill_the_primary_under_load_and_no_request_fails(world: World) -> None:
    results: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        session = requests.Session()
        for _ in range(50):
            resp = session.post(
                world.gw.url + "/v1/chat/completions",
                json=body("gpt-ha"),
                headers={"Authorization": f"Bearer {world.user_key}"},
                timeout=30,
            )
            with lock:
                results.append(resp.status_code)
                if resp.status_code != 200:
                    errors.append(resp.text)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(results) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    world.primary.proc.send_signal(signal.SIGKILL)
    world.primary.proc.wait()
    for thread in threads:
        thread.join(120)
    assert len(results) == 200
    assert errors == []
    assert len(world.secondary.received()) > 0
    primary = world.status()["gpt-ha#0"]
    # Requests in flight on its connections were cut ("broken"); later ones refused.
    assert primary["state"] == "open" and primary["last_error"] in ("connect", "broken")


# -- operator views ----------------------------------------------------------------------------


def test_admin_backends_is_for_admins_only(world: World) -> None:
    url = world.gw.url + "/api/admin/backends"
    user = requests.get(url, headers={"Authorization": f"Bearer {world.user_key}"}, timeout=10)
    assert user.status_code == 404
    assert requests.get(url, timeout=10).status_code == 401
    rows = world.status()
    row = rows["r-refuse#0"]
    assert set(row) >= {"model", "state", "consecutive_failures", "last_error", "in_flight"}
    assert "base_url" not in row and all("127.0.0.1" not in json.dumps(r) for r in rows.values())


def test_readyz_reports_database_and_backends(world: World) -> None:
    resp = requests.get(world.gw.url + "/readyz", timeout=10)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["status"] == "ok" and data["checks"]["database"]["ok"]
    assert "redis" not in data["checks"]
    backends = data["checks"]["backends"]
    assert backends["models"]["r-fallback"] == {"deployments": 5, "available": 5}


@pytest.mark.parametrize("reachable", [True, False])
def test_readyz_checks_redis_when_configured(tmp_path: Path, reachable: bool) -> None:
    url = REDIS_URL if reachable else f"redis://127.0.0.1:{free_port()}/0"
    prefix = f"readyz-{secrets.token_hex(4)}:"  # not the default: the shared Redis is not ours
    env = {"CHATGATE_REDIS_URL": url, "CHATGATE_REDIS_PREFIX": prefix}
    gw = make_gateway(tmp_path, extra_env=env).start()
    try:
        resp = requests.get(gw.url + "/readyz", timeout=10)
        data = resp.json()
        assert resp.status_code == (200 if reachable else 503), data
        assert data["status"] == ("ok" if reachable else "unavailable")
        assert data["checks"]["database"]["ok"]
        assert data["checks"]["redis"]["ok"] is reachable
    finally:
        gw.stop()
        if reachable:
            drop_redis_prefix(prefix)


def test_readyz_fails_on_a_read_only_redis(tmp_path: Path) -> None:
    """A replica answers PING (readiness was green) and refuses every write, so every limit's
    script: limits fell open on every node while each said it was ready."""
    import redis

    from tests.redisserver import RedisServer

    with RedisServer() as replica:
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", str(free_port()))  # a master that is gone: read-only
        assert client.ping()
        with pytest.raises(redis.exceptions.ReadOnlyError):
            client.set("x", "1")
        client.close()
        gw = make_gateway(tmp_path, extra_env={"CHATGATE_REDIS_URL": replica.url}).start()
        try:
            resp = requests.get(gw.url + "/readyz", timeout=10)
            assert resp.status_code == 503, resp.text
            redis_check = resp.json()["checks"]["redis"]
            assert redis_check == {"ok": False, "error": "ServerUnavailable", "reply": "READONLY"}
        finally:
            gw.stop()


def test_a_password_redis_does_not_need_is_ready_and_limits(tmp_path: Path) -> None:
    """A URL with a password, for a Redis that has none: readiness (redis-py) said ready while
    the limiter's own client refused the connection, and every limited request was a 503.
    Now both clients go on as Redis serves, and readiness asks the limiter's client."""
    from tests.redisserver import RedisServer

    with RedisServer() as server:
        url = server.url.replace("redis://", "redis://:not-needed@", 1)
        env = {"CHATGATE_REDIS_URL": url, "CHATGATE_RATELIMIT_FAIL_OPEN": "0"}
        upstream = start_upstream(chunks=2)
        gw = make_gateway(tmp_path, upstream=upstream, extra_env=env).start()
        try:
            assert requests.get(gw.url + "/readyz", timeout=10).status_code == 200
            gw.cli("accounts", "create", "lim@example.com", "--plan", "free")
            key = gw.cli_json("keys", "create", "--account", "lim@example.com")["key"]
            resp = requests.post(
                gw.url + "/v1/chat/completions",
                json=body("gpt-test", max_tokens=2),
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
            assert "x-ratelimit-limit-requests" in resp.headers
        finally:
            gw.stop()
            stop(upstream.proc)


def test_readyz_fails_on_a_read_only_database(tmp_path: Path) -> None:
    """A PostgreSQL that takes reads only (a hot standby: a failover that went the wrong way, a
    replica's URL) answered readiness, so a node on it stayed in the load balancer while every
    usage flush, key and sign-up failed. Set read-only here as a standby is, for new sessions;
    the node's pooled connections are cut so that it opens new ones."""
    url = create_pg_database()
    name = url.rsplit("/", 1)[1]
    gw = make_gateway(tmp_path, database_url=url).start()

    def reconnected(setting: str) -> dict[str, Any]:
        pg_admin(f'ALTER DATABASE "{name}" {setting}')
        pg_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        resp = requests.get(gw.url + "/readyz", timeout=10)
        assert resp.status_code in (200, 503), resp.text
        return {"status": resp.status_code, **resp.json()["checks"]["database"]}

    try:
        assert requests.get(gw.url + "/readyz", timeout=10).status_code == 200
        unready = reconnected("SET default_transaction_read_only = on")
        assert unready == {"status": 503, "ok": False, "error": "ReadOnlyDatabase"}
        assert reconnected("RESET default_transaction_read_only")["status"] == 200
    finally:
        gw.stop()
        drop_pg_database(url)


def test_models_check_prints_a_table_and_fails_on_a_dead_deployment(world: World) -> None:
    result = world.gw.cli("models", "check", check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "DEPLOYMENT", "BACKEND"]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert " yes " in rows["r-500#0"] and "unreachable" in rows["r-refuse#0"]
    # A redirect is followed by no chat call (a POST): the probe said "ok" all the same.
    assert " no " in rows["r-moved#0"] and "redirected (302)" in rows["r-moved#0"]
    assert world.post(body("r-moved")).status_code == 502
    data = json.loads(world.gw.cli("models", "check", "--json", check=False).stdout)
    assert {r["deployment"] for r in data} >= {"r-fallback#4", "gpt-ha#1"}
    assert world.gw.env["FAKE_UPSTREAM_KEY"] not in result.stdout + result.stderr
