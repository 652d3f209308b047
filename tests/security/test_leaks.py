"""``POST /api/keys/report-leak`` against the real server: anyone can report, a live key is
revoked, and the answer is the same whatever the key was. Each test sends from its own
loopback address (127.0.0.x), so the per-IP limit of one test does not touch another."""

from __future__ import annotations

import http.client
import itertools
import json
import time
from typing import Any

import pytest

from chatgate.api.leaks import REPORTS_PER_WINDOW
from chatgate.keys import format as keyfmt
from tests.helpers import Gateway
from tests.security.conftest import CHAT, assert_openai_error, call, new_account, new_key

_ADDRESSES = itertools.count(10)


@pytest.fixture
def source() -> str:
    """A loopback address no other test reports from."""
    return f"127.0.0.{next(_ADDRESSES)}"


def report(
    gw: Gateway, body: Any, source: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10, source_address=(source, 0))
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(
            "POST",
            "/api/keys/report-leak",
            body=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_status(gw: Gateway, key: str, status: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = call(gw, "POST", "/v1/chat/completions", key, json=CHAT).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_a_reported_live_key_is_revoked(sec: Gateway, source: str) -> None:
    issued = new_key(sec, new_account(sec))
    assert wait_status(sec, issued["key"], 200) == 200
    status, headers, body = report(sec, {"key": issued["key"]}, source)
    assert status == 202 and headers["cache-control"] == "no-store"
    answer = json.loads(body)
    assert answer["object"] == "leak_report" and answer["status"] == "received"
    assert wait_status(sec, issued["key"], 401) == 401
    listed = [k for k in sec.cli_json("keys", "list") if k["id"] == issued["id"]]
    assert listed[0]["status"] == "revoked"
    assert issued["key"] not in sec.logs()


def test_the_answer_never_tells_what_the_key_was(sec: Gateway, source: str) -> None:
    email = new_account(sec)
    live = new_key(sec, email)
    revoked = new_key(sec, email)
    sec.cli("keys", "revoke", revoked["id"])
    rotated_from = new_key(sec, email)
    rotated = sec.cli_json("keys", "rotate", rotated_from["id"], "--grace", "1h")
    cases = [live["key"], revoked["key"], rotated_from["key"], keyfmt.generate()]
    answers = {report(sec, {"key": key}, source)[::2] for key in cases}
    assert len(answers) == 1  # same status, same bytes
    status, body = answers.pop()
    assert status == 202
    for key in cases:
        assert key not in body.decode()
    # The live key is revoked; the old secret of the rotated key is cut off, its new one works.
    assert wait_status(sec, live["key"], 401) == 401
    assert wait_status(sec, rotated_from["key"], 401) == 401
    assert wait_status(sec, rotated["key"], 200) == 200


def test_no_authentication_needed_and_any_header_ignored(sec: Gateway, source: str) -> None:
    key = keyfmt.generate()
    assert report(sec, {"key": key}, source)[0] == 202
    junk = {"Authorization": "Bearer sk-cg-nope", "Cookie": "chatgate_session=junk"}
    assert report(sec, {"key": key}, source, junk)[0] == 202


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        ({}, "missing_required_parameter", "key"),
        ({"key": 5}, "invalid_type", "key"),  # (it said "missing")
        ({"key": "sk-cg-nope"}, "invalid_value", "key"),
        ({"key": "sk-cg-" + "a" * 38}, "invalid_value", "key"),  # checksum fails
    ],
)
def test_bad_reports_are_400(
    sec: Gateway, source: str, body: Any, code: str, param: str | None
) -> None:
    status, headers, raw = report(sec, body, source)
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["code"] == code and error["param"] == param
    assert headers["x-request-id"].startswith("req_")


def test_a_huge_report_is_413(sec: Gateway, source: str) -> None:
    status, _, raw = report(sec, {"key": "x" * (21 << 20)}, source)
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"


def test_reports_are_limited_per_address(sec: Gateway, source: str) -> None:
    key = keyfmt.generate()
    statuses = [report(sec, {"key": key}, source)[0] for _ in range(REPORTS_PER_WINDOW)]
    assert statuses == [202] * REPORTS_PER_WINDOW
    status, headers, raw = report(sec, {"key": key}, source)
    assert status == 429
    assert int(headers["retry-after"]) >= 1 and "retry-after-ms" in headers
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    # Invalid reports count too (no free guesses), and another address has its own budget.
    assert report(sec, b"{", source)[0] == 429
    other = source.rsplit(".", 1)[0] + ".250"
    assert report(sec, {"key": key}, other)[0] == 202


def test_documented_in_openapi(sec: Gateway) -> None:
    spec = call(sec, "GET", "/openapi.json").json()
    operation = spec["paths"]["/api/keys/report-leak"]["post"]
    assert operation["security"] == [] and "202" in operation["responses"]


def test_get_on_the_path_reveals_nothing(sec: Gateway) -> None:
    assert_openai_error(call(sec, "GET", "/api/keys/report-leak"))
