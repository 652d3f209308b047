"""Fixtures for the dashboard: a real server, accounts with passwords, a real Chromium."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from chatgate.dashboard.passwords import PasswordStore
from chatgate.db.engine import create_engine
from chatgate.settings import Settings
from tests.helpers import ROOT, Gateway, Upstream, make_gateway

ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def start_gateway(tmp: Path, upstream: Upstream) -> Gateway:
    gw = make_gateway(tmp, upstream=upstream)
    gw.start()
    return gw


def admin_key(gw: Gateway) -> str:
    for line in gw.logs().splitlines():
        if "CHATGATE_API_KEY=" in line:
            return line.split("=", 1)[1].strip()
    raise AssertionError("the first start printed no admin key")


@pytest.fixture(scope="session")
def dash(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A running gateway (SQLite) shared by the dashboard tests."""
    gw = start_gateway(Path(tmp_path_factory.mktemp("dash")), upstream)
    yield gw
    gw.stop()


def set_password(gw: Gateway, email: str, password: str) -> None:
    """Give an account made by the CLI a dashboard password (there is no CLI command yet)."""

    async def go() -> None:
        engine = create_engine(Settings.from_env(gw.env))
        try:
            store = PasswordStore(engine)
            creds = await store.credentials(email)
            assert creds is not None
            await store.set_password(creds.account_id, password)
        finally:
            await engine.dispose()

    # In a thread: Playwright's sync API keeps an event loop running in the test's thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


@dataclass
class User:
    """An account with a password, and a logged-in ``requests`` session for it."""

    gw: Gateway
    email: str
    password: str = PASSWORD
    http: requests.Session = field(default_factory=requests.Session)

    def url(self, path: str) -> str:
        return self.gw.url + path

    def csrf(self, path: str = "/dashboard/") -> str:
        page = self.http.get(self.url(path), timeout=10)
        match = CSRF.search(page.text)
        assert match, f"no CSRF token on {path}: {page.status_code}"
        return match.group(1)

    def login(self) -> requests.Response:
        token = csrf_of(self.http, self.url("/dashboard/login"))
        return self.http.post(
            self.url("/dashboard/login"),
            data={"csrf_token": token, "email": self.email, "password": self.password},
            timeout=30,
        )

    def post(self, path: str, data: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
        """Post a dashboard form with this session's CSRF token."""
        form = {"csrf_token": self.csrf(), **(data or {})}
        return self.http.post(self.url(path), data=form, timeout=30, **kw)

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Call /api/* with the session cookie and the CSRF header."""
        token = self.http.get(self.url("/api/me"), timeout=10).json()["csrf_token"]
        headers = {"X-CSRF-Token": token, **kw.pop("headers", {})}
        return self.http.request(method, self.url(path), headers=headers, timeout=30, **kw)

    def new_key(self, **body: Any) -> dict[str, Any]:
        resp = self.api("POST", "/api/keys", json={"name": "test", **body})
        assert resp.status_code == 201, resp.text
        return resp.json()


def csrf_of(http: requests.Session, url: str) -> str:
    match = CSRF.search(http.get(url, timeout=10).text)
    assert match
    return match.group(1)


def make_user(gw: Gateway, *, admin: bool = False, plan: str = "free", login: bool = True) -> User:
    """An account made with the CLI, given a password, and (by default) logged in."""
    email = f"{'admin' if admin else 'user'}-{secrets.token_hex(4)}@example.com"
    gw.cli("accounts", "create", email, "--plan", plan, *(["--admin"] if admin else []))
    set_password(gw, email, PASSWORD)
    user = User(gw, email)
    if login:
        resp = user.login()
        assert resp.status_code == 200 and resp.url.endswith("/dashboard/"), resp.status_code
    return user


def chat(
    gw: Gateway, key: str, model: str = "gpt-test", content: str = "hello"
) -> requests.Response:
    return requests.post(
        gw.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": content}]},
        timeout=30,
    )
