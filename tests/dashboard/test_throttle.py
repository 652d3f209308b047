"""Login throttling: in process (unit) and against a real server of its own, so its lockouts
don't reach the other tests' server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from chatgate.dashboard.throttle import (
    ACCOUNT_FAILURES,
    IP_FAILURES,
    SIGNUPS_PER_IP,
    LoginThrottle,
    SlidingWindow,
)
from tests.dashboard.conftest import PASSWORD, User, csrf_of, make_user, start_gateway
from tests.helpers import Gateway, Upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_sliding_window() -> None:
    clock = Clock()
    window = SlidingWindow(3, 60.0, clock=clock)
    for _ in range(3):
        assert await window.retry_after("a") == 0
        await window.hit("a")
        clock.now += 10
    assert await window.retry_after("a") == pytest.approx(30.0)  # the first hit leaves at 1060
    assert await window.retry_after("b") == 0
    clock.now += 30
    assert await window.retry_after("a") == 0
    await window.hit("a")
    assert await window.retry_after("a") == pytest.approx(10.0)
    await window.reset("a")
    assert await window.retry_after("a") == 0
    assert await window.take("a") == 0 and await window.take("a") == 0
    assert await window.take("a") == 0 and await window.take("a") > 0  # the 4th does not fit


async def test_login_throttle_counts_email_and_address() -> None:
    clock = Clock()
    throttle = LoginThrottle.default(clock)
    for _ in range(ACCOUNT_FAILURES):
        await throttle.login_failed("a@x", "10.0.0.1")
    assert await throttle.login_wait("a@x", "10.0.0.2") > 0  # the account, from anywhere
    assert await throttle.login_wait("b@x", "10.0.0.1") == 0
    for i in range(IP_FAILURES - ACCOUNT_FAILURES):
        await throttle.login_failed(f"user{i}@x", "10.0.0.1")
    assert await throttle.login_wait("fresh@x", "10.0.0.1") > 0  # the address, for anyone
    assert await throttle.login_wait("fresh@x", "10.0.0.3") == 0
    clock.now += 15 * 60 + 1
    assert await throttle.login_wait("a@x", "10.0.0.1") == 0


@pytest.fixture(scope="module")
def own(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(Path(tmp_path_factory.mktemp("throttle")), upstream)
    yield gw
    gw.stop()


def attempt(gw: Gateway, email: str, password: str) -> requests.Response:
    http = requests.Session()
    token = csrf_of(http, gw.url + "/dashboard/login")
    return http.post(
        gw.url + "/dashboard/login",
        data={"csrf_token": token, "email": email, "password": password},
        timeout=30,
    )


def test_password_change_guesses_are_throttled_with_the_wait(own: Gateway) -> None:
    """A session's holder guessing the current password is throttled as a login is; the 429
    said "later" and had no Retry-After (it runs before the brute-force test, whose spray
    locks this address out: its five failures leave that test's counts in reach)."""
    user = make_user(own)
    form = {"current": "not the password", "password": "a new long one 42", "password2": ""}
    for _ in range(ACCOUNT_FAILURES):
        assert user.post("/dashboard/account/password", form).status_code == 400
    blocked = user.post("/dashboard/account/password", {**form, "current": PASSWORD})
    assert blocked.status_code == 429 and "Try again in" in blocked.text
    assert int(blocked.headers["Retry-After"]) > 0


def test_brute_force_is_throttled(own: Gateway) -> None:
    victim = make_user(own, login=False)
    for i in range(ACCOUNT_FAILURES):
        resp = attempt(own, victim.email, f"guess number {i}")
        assert resp.status_code == 401
    # Now even the right password is not checked.
    blocked = attempt(own, victim.email, PASSWORD)
    assert blocked.status_code == 429
    assert "Too many attempts" in blocked.text and int(blocked.headers["Retry-After"]) > 0
    # Unknown emails are throttled the same way: the lockout tells nothing.
    for i in range(ACCOUNT_FAILURES):
        assert attempt(own, "ghost@example.com", f"guess {i}").status_code == 401
    assert attempt(own, "ghost@example.com", "guess again").status_code == 429
    # Spraying many emails from one address trips the per-address limit.
    statuses = [
        attempt(own, f"spray{i}@example.com", "password123").status_code for i in range(IP_FAILURES)
    ]
    assert statuses[-1] == 429
    other = make_user(own, login=False)
    assert User(own, other.email).login().status_code == 429


def test_sign_ups_past_the_limit_are_429_with_the_wait(own: Gateway) -> None:
    """The sign-up throttle answered 400, as for a mistyped form, with no wait (QA); the
    login's answers 429. Now both: 429, the wait said and in Retry-After."""

    def sign_up() -> requests.Response:
        http = requests.Session()
        token = csrf_of(http, own.url + "/dashboard/signup")
        form = {
            "csrf_token": token,
            "email": f"signup-{secrets.token_hex(4)}@example.com",
            "password": PASSWORD,
            "password2": PASSWORD,
        }
        return http.post(own.url + "/dashboard/signup", data=form, timeout=30)

    for _ in range(SIGNUPS_PER_IP):
        assert sign_up().status_code == 200
    refused = sign_up()
    assert refused.status_code == 429 and "Too many sign-ups" in refused.text
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
