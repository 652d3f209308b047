"""Fixtures for the client tests: one real ``chatgate serve`` (SQLite) over the fake upstream.

Besides the shared models (``gpt-test`` echoes), it serves ``gpt-tools`` (the fake's tool-calling
model) and ``gpt-flaky`` (no gateway retries, a breaker that never opens), so that a failure
made on purpose reaches the client as it is and cannot trip a breaker other tests rely on.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Gateway, Upstream, make_gateway

EXTRA_MODELS = """
[[models]]
name = "gpt-tools"
base_url = "{url}"
upstream_model = "tools"

[[models]]
name = "gpt-flaky"
base_url = "{url}"
upstream_model = "flaky"
retries = 0
breaker_failures = 1000000
"""


class Keys:
    """Plans, accounts and keys made with the real CLI."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def plan(self, *limits: str) -> str:
        """A new plan with CLI limit options, e.g. ``plan("--rpm", "60")``; its name."""
        name = "plan-" + secrets.token_hex(4)
        self.gw.cli("plans", "create", name, *limits)
        return name

    def key(self, plan: str = "enterprise") -> str:
        """A key of a new account on ``plan`` (limits are per account: never shared)."""
        email = f"client-{secrets.token_hex(4)}@example.com"
        self.gw.cli("accounts", "create", email, "--plan", plan)
        return str(self.gw.cli_json("keys", "create", "--account", email, "--name", "t")["key"])


class Counting(httpx.HTTPTransport):
    """httpx's transport, noting the status of every attempt that got an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        with self._lock:
            self.statuses.append(response.status_code)
        return response


@pytest.fixture(scope="session")
def gw(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = make_gateway(
        Path(tmp_path_factory.mktemp("client-gateway")),
        upstream=upstream,
        extra_toml=EXTRA_MODELS.format(url=upstream.base_url),
    )
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def keys(gw: Gateway) -> Keys:
    return Keys(gw)


@pytest.fixture(scope="session")
def api_key(keys: Keys) -> str:
    """A key on the unlimited plan, shared by the tests that only need to get in."""
    return keys.key()


@pytest.fixture(scope="session")
def base_url(gw: Gateway) -> str:
    return gw.url + "/v1"


@pytest.fixture(scope="session")
def client_env(gw: Gateway, api_key: str) -> dict[str, str]:
    """An environment for subprocesses: CHATGATE_BASE_URL/API_KEY set, OPENAI_* removed."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OPENAI_"))}
    env.update(CHATGATE_BASE_URL=gw.url + "/v1", CHATGATE_API_KEY=api_key)
    return env
