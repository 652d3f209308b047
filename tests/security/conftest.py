"""Fixtures for the security suite: one shared gateway (SQLite, the embedded default) with an
admin key, and helpers to make accounts and keys with the real CLI."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import Gateway, Upstream, make_gateway

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}


def admin_key(gw: Gateway) -> str:
    """The admin key the first start printed (once, to stdout, which the helpers log)."""
    for line in gw.logs().splitlines():
        if "CHATGATE_API_KEY=" in line:
            return line.split("=", 1)[1].strip()
    raise AssertionError("the first start printed no admin key")


def new_account(gw: Gateway, plan: str = "enterprise") -> str:
    email = f"sec-{secrets.token_hex(4)}@example.com"
    gw.cli("accounts", "create", email, "--plan", plan)
    return email


def new_key(gw: Gateway, email: str, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = gw.cli_json("keys", "create", "--account", email, "--name", "t", *extra)
    return data


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def call(
    gw: Gateway, method: str, path: str, key: str | None = None, **kw: Any
) -> requests.Response:
    headers = {**bearer(key), **kw.pop("headers", {})}
    return requests.request(method, gw.url + path, headers=headers, timeout=30, **kw)


def stored_state(gw: Gateway) -> Any:
    """Everything durable a bad request must not change (last-used stamps excluded: they are
    written in the background for keys used earlier)."""
    keys = [{**k, "last_used_at": None} for k in gw.cli_json("keys", "list")]
    return (gw.cli_json("accounts", "list"), keys, gw.cli_json("plans", "list"))


def assert_openai_error(resp: requests.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx in OpenAI's error shape (``status`` exact when given)."""
    if status is not None:
        assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-request-id"].startswith("req_")
    error = json.loads(resp.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return dict(error)


@pytest.fixture(scope="session")
def sec(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A running gateway shared by the security tests (SQLite)."""
    gw = make_gateway(Path(tmp_path_factory.mktemp("security")), upstream=upstream)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def sec_admin(sec: Gateway) -> str:
    return admin_key(sec)
