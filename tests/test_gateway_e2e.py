"""End to end: a real ``chatgate serve`` (SQLite and PostgreSQL), keys from the real CLI,
called with ``requests`` (the article's snippet) and the official ``openai`` package."""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from chatgate.keys import format as keyfmt
from tests.helpers import Gateway, make_gateway, slow_model_toml


def new_account(gw: Gateway, plan: str = "enterprise") -> str:
    email = f"user-{secrets.token_hex(4)}@example.com"
    gw.cli("accounts", "create", email, "--plan", plan)
    return email


def new_key(gw: Gateway, email: str | None = None, *extra: str) -> dict[str, Any]:
    email = email or new_account(gw)
    return gw.cli_json("keys", "create", "--account", email, "--name", "test", *extra)


def chat(gw: Gateway, key: str | None, body: Any = None, **kw: Any) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(kw.pop("headers", {}))
    data = (
        body
        if isinstance(body, (str, bytes))
        else json.dumps(
            body or {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
        )
    )
    return requests.post(gw.url + "/v1/chat/completions", data=data, headers=headers, timeout=30)


def assert_error(
    resp: requests.Response,
    status: int,
    code: str | None,
    param: str | None = None,
    type_: str | None = None,
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["x-request-id"].startswith("req_")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    if type_ is not None:
        assert error["type"] == type_
    return error


def stored_state(gw: Gateway) -> Any:
    # last_used_at of keys used by earlier tests is flushed in the background: not compared
    keys = [{**k, "last_used_at": None} for k in gw.cli_json("keys", "list")]
    return (gw.cli_json("accounts", "list"), keys, gw.cli_json("plans", "list"))


def test_first_start_prints_one_admin_key(upstream: Any, tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, upstream=upstream).start()
    try:
        printed = [line for line in gw.logs().splitlines() if "CHATGATE_API_KEY=" in line]
        assert len(printed) == 1
        # the first start lists the migrations it ran, not alembic's own plugins
        assert "Running upgrade  -> 0001" in gw.logs()
        assert "setup plugin" not in gw.logs()
        key = printed[0].split("=", 1)[1].strip()
        assert keyfmt.is_well_formed(key)
        assert chat(gw, key).status_code == 200
        admin = [a for a in gw.cli_json("accounts", "list") if a["email"] == "admin@localhost"]
        assert admin and admin[0]["is_admin"]
    finally:
        gw.stop()
    gw.start()  # a second start creates nothing and prints no key
    try:
        assert sum("CHATGATE_API_KEY=" in line for line in gw.logs().splitlines()) == 1
        assert chat(gw, key).status_code == 200
    finally:
        gw.stop()


def test_articles_requests_snippet(gateway: Gateway) -> None:
    API_KEY = new_key(gateway)["key"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    data = {"model": "gpt-test", "messages": [{"role": "user", "content": "Tell me a joke"}]}
    response = requests.post(
        gateway.url + "/v1/chat/completions", headers=headers, json=data, timeout=30
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert "Tell me a joke" in body["choices"][0]["message"]["content"]
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert response.headers["x-request-id"].startswith("req_")


def test_openai_sdk_unmodified(gateway: Gateway, upstream: Any) -> None:
    key = new_key(gateway)["key"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "ping"}]
    )
    assert "ping" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "stream" in text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20

    names = [m.id for m in client.models.list()]
    assert {"gpt-test", "gpt-other"} <= set(names)
    assert client.models.retrieve("gpt-test").id == "gpt-test"

    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-cg-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "invalid_api_key"


def test_stream_without_usage_option_has_no_usage_chunk(gateway: Gateway) -> None:
    key = new_key(gateway)["key"]
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "a"}]}
    resp = chat(gateway, key, body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)  # no usage-only chunk was asked for


def test_streams_keep_their_upstream_connection(gateway: Gateway, upstream: Any) -> None:
    """A stream read to its end leaves its upstream connection for the next request: no new
    connection (and, to a remote upstream, no new TLS handshake) per stream."""
    key = new_key(gateway)["key"]
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    def seen() -> int:
        url = f"http://127.0.0.1:{upstream.port}/_connections"
        return int(requests.get(url, timeout=5).json()["seen"])

    assert chat(gateway, key, body).text.endswith("data: [DONE]\n\n")  # one is open now
    before = seen()
    for _ in range(5):
        assert chat(gateway, key, body).text.endswith("data: [DONE]\n\n")
    assert seen() == before
    # [DONE] ends the client's body at once; an event an upstream sends after it is read (the
    # connection is still kept) but not relayed.
    for _ in range(3):
        text = chat(gateway, key, {**body, "fake": {"after_done": True}}).text
        assert text.endswith("data: [DONE]\n\n") and "stray" not in text
    assert seen() == before


def test_upstream_key_is_sent_upstream_not_echoed(gateway: Gateway, upstream: Any) -> None:
    key = new_key(gateway)["key"]
    assert chat(gateway, key).status_code == 200
    forwarded = upstream.received()[-1]
    assert forwarded["model"] == "fake-model"


def test_an_upstream_cookie_is_never_sent_back(upstream: Any, tmp_path: Path) -> None:
    """An upstream's Set-Cookie stays with that answer: no jar shared across accounts.

    The upstream is named by host name: aiohttp's default jar would keep a cookie from one
    (it ignores those from bare IP addresses).
    """
    named = f"""
[[models]]
name = "gpt-named-host"
base_url = "http://localhost:{upstream.port}/v1"
upstream_model = "fake-model"
"""
    gw = make_gateway(tmp_path, upstream=upstream, extra_toml=named)
    gw.start()
    try:
        first, second = new_key(gw)["key"], new_key(gw)["key"]
        body = {"model": "gpt-named-host", "messages": [{"role": "user", "content": "hi"}]}
        upstream.clear()
        setting = {**body, "fake": {"set_cookie": "affinity=account-one; Path=/"}}
        assert chat(gw, first, setting).status_code == 200
        assert chat(gw, second, body).status_code == 200
        assert chat(gw, first, body).status_code == 200
        cookies = requests.get(f"http://127.0.0.1:{upstream.port}/_cookies", timeout=10).json()
        assert cookies == [None, None, None]
    finally:
        gw.stop()


def test_upstream_connections_are_capped(upstream: Any, tmp_path: Path) -> None:
    """CHATGATE_UPSTREAM_MAX_CONNECTIONS: six requests at once reach the upstream two at a
    time, and all six are answered (the others wait for a free connection)."""
    slow = slow_model_toml(upstream)
    gw = make_gateway(
        tmp_path,
        upstream=upstream,
        extra_toml=slow,
        extra_env={"CHATGATE_UPSTREAM_MAX_CONNECTIONS": "2"},
    )
    gw.start()
    try:
        key = new_key(gw)["key"]
        body = {
            "model": "gpt-slow",
            "messages": [{"role": "user", "content": "hi"}],
            "fake": {"delay": 0.4},
        }
        upstream.clear()
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: chat(gw, key, body).status_code, range(6)))
        assert statuses == [200] * 6
        seen = requests.get(f"http://127.0.0.1:{upstream.port}/_in_flight", timeout=10).json()
        assert seen["max"] == 2

        # Streams and whole answers share the cap: three of each at once, still two at a time.
        upstream.clear()
        streamed = {**body, "stream": True}

        def one(i: int) -> int:
            resp = chat(gw, key, streamed if i % 2 else body)
            assert i % 2 == 0 or b"[DONE]" in resp.content
            return int(resp.status_code)

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(one, range(6)))
        assert statuses == [200] * 6
        seen = requests.get(f"http://127.0.0.1:{upstream.port}/_in_flight", timeout=10).json()
        assert seen["max"] == 2
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "invalid_api_key"),
        ("Basic abc", "invalid_api_key"),
        ("Bearer", "invalid_api_key"),
        ("Bearer not-a-key", "invalid_api_key"),
    ],
)
def test_missing_or_malformed_header(gateway: Gateway, header: str | None, code: str) -> None:
    headers = {} if header is None else {"Authorization": header}
    resp = requests.post(gateway.url + "/v1/chat/completions", json={}, headers=headers, timeout=10)
    assert_error(resp, 401, code, type_="invalid_request_error")


def test_wrong_checksum_and_unknown_key(gateway: Gateway) -> None:
    real = new_key(gateway)["key"]
    flipped = real[:-1] + ("A" if real[-1] != "A" else "B")
    error = assert_error(chat(gateway, flipped), 401, "invalid_api_key")
    assert real not in json.dumps(error) and flipped not in json.dumps(error)
    unknown = keyfmt.generate()
    error = assert_error(chat(gateway, unknown), 401, "invalid_api_key")
    assert unknown not in json.dumps(error)


def test_revoked_key_stops_within_a_second(gateway: Gateway) -> None:
    issued = new_key(gateway)
    assert chat(gateway, issued["key"]).status_code == 200  # now cached by the server
    revoked = gateway.cli_json("keys", "revoke", issued["id"])
    assert revoked["status"] == "revoked" and "key" not in revoked
    time.sleep(1.0)
    assert_error(chat(gateway, issued["key"]), 401, "invalid_api_key")


def test_expired_key(gateway: Gateway) -> None:
    issued = new_key(gateway, None, "--expires-in", "2s")
    assert chat(gateway, issued["key"]).status_code == 200
    time.sleep(2.2)
    assert_error(chat(gateway, issued["key"]), 401, "expired_api_key")


def test_rotation_with_grace_and_without(gateway: Gateway) -> None:
    issued = new_key(gateway)
    assert chat(gateway, issued["key"]).status_code == 200
    rotated = gateway.cli_json("keys", "rotate", issued["id"], "--grace", "1h")
    assert rotated["id"] == issued["id"] and rotated["key"] != issued["key"]
    time.sleep(1.0)
    assert chat(gateway, issued["key"]).status_code == 200  # old secret, within grace
    assert chat(gateway, rotated["key"]).status_code == 200
    again = gateway.cli_json("keys", "rotate", issued["id"], "--grace", "0")
    time.sleep(1.0)
    assert_error(chat(gateway, rotated["key"]), 401, "invalid_api_key")  # grace 0: gone
    assert_error(chat(gateway, issued["key"]), 401, "invalid_api_key")
    assert chat(gateway, again["key"]).status_code == 200
    listed = [k for k in gateway.cli_json("keys", "list") if k["id"] == issued["id"]]
    assert listed[0]["hint"] == keyfmt.hint(again["key"])


def test_a_known_url_with_another_method_is_a_405_with_allow(gateway: Gateway) -> None:
    """OpenAI's shape, and the ``Allow`` header RFC 9110 requires of a 405 (QA: none)."""
    for method, path, allow in (
        ("GET", "/v1/chat/completions", "POST"),
        ("OPTIONS", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET, HEAD"),
    ):
        answer = requests.request(method, gateway.url + path, timeout=10)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "method_not_allowed"
        assert answer.headers["allow"] == allow, (method, path)


def test_key_limited_to_a_model(gateway: Gateway) -> None:
    key = new_key(gateway, None, "--models", "gpt-test")["key"]
    assert chat(gateway, key).status_code == 200
    body = {"model": "gpt-other", "messages": [{"role": "user", "content": "x"}]}
    hidden = chat(gateway, key, body)
    assert_error(hidden, 404, "model_not_found", "model", "invalid_request_error")
    unknown = chat(gateway, key, dict(body, model="gpt-none"))
    assert_error(unknown, 404, "model_not_found", "model", "invalid_request_error")
    # A model the key may not use reads like one that does not exist: the same words.
    words = hidden.json()["error"]["message"].replace("gpt-other", "gpt-none")
    assert words == unknown.json()["error"]["message"]
    models = requests.get(
        gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).json()
    assert [m["id"] for m in models["data"]] == ["gpt-test"]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ("{not json", 400, "invalid_json", None),
        ("[1, 2]", 400, "invalid_json", None),
        ({"model": "gpt-test"}, 400, "missing_required_parameter", "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            400,
            "missing_required_parameter",
            "model",
        ),
        ({"model": "gpt-test", "messages": "hi"}, 400, "invalid_value", "messages"),
        ({"model": "gpt-test", "messages": []}, 400, "invalid_value", "messages"),
        (
            {"model": "gpt-test", "messages": [{"role": "boss", "content": "x"}]},
            400,
            "invalid_value",
            "messages[0].role",
        ),
        (
            {"model": "gpt-test", "messages": [{"role": "user", "content": 5}]},
            400,
            "invalid_value",
            "messages[0].content",
        ),
        (
            {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            "invalid_value",
            "temperature",
        ),
        (
            {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            "model",
        ),
    ],
)
def test_bad_requests_are_rejected_and_change_nothing(
    gateway: Gateway, body: Any, status: int, code: str, param: str | None
) -> None:
    issued = new_key(gateway)
    before = stored_state(gateway)
    error = assert_error(chat(gateway, issued["key"], body), status, code, param)
    assert issued["key"] not in error["message"]
    time.sleep(0.1)
    assert stored_state(gateway) == before


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/chat/completions", '{"model":"gpt-test","messages":MSGS,"extra":DEEP}'),
        ("/v1/chat/completions", '{"model":"gpt-test","stream":true,"messages":MSGS,"x":DEEP}'),
        (
            "/v1/chat/completions",
            '{"model":"gpt-test","messages":MSGS,'
            '"tools":[{"type":"function","function":{"name":"f","parameters":{"a":DEEP}}}]}',
        ),
        ("/v1/embeddings", '{"model":"gpt-test","input":"hi","extra":DEEP}'),
        ("/v1/embeddings", '{"model":"gpt-test","input":[DEEP]}'),
        ("/v1/responses", '{"model":"gpt-test","input":"hi","metadata_x":DEEP}'),
    ],
)
def test_json_nested_beyond_what_can_be_forwarded_is_400(
    gateway: Gateway, upstream: Any, path: str, template: str
) -> None:
    """orjson parses 1,024 levels but writes 254: a body between the two was a 500 when it
    was forwarded; it is a 400 before anything is sent, and a little less still goes through."""
    key = new_key(gateway)["key"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(depth: int) -> requests.Response:
        body = template.replace("MSGS", '[{"role":"user","content":"hi"}]')
        body = body.replace("DEEP", _nested(depth))
        return requests.post(gateway.url + path, data=body, headers=headers, timeout=30)

    upstream.clear()
    for depth in (255, 300, 1000):
        error = assert_error(post(depth), 400, "invalid_json", type_="invalid_request_error")
        assert "nested too deeply" in error["message"]
    assert upstream.received() == []
    assert post(240).status_code == 200  # 240 in a field: under 254 in all
    assert len(upstream.received()) == 1


def test_body_too_large_is_413(gateway: Gateway) -> None:
    key = new_key(gateway)["key"]
    huge = json.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * (21 << 20)}]}
    )
    assert_error(chat(gateway, key, huge), 413, "request_too_large")


def test_unknown_url_and_health(gateway: Gateway) -> None:
    resp = requests.get(gateway.url + "/v1/nothing", timeout=10)
    assert_error(resp, 404, "unknown_url")
    health = requests.get(gateway.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.headers["x-request-id"]
    spec = requests.get(gateway.url + "/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


def test_unreachable_upstream_is_502(gateway: Gateway) -> None:
    key = new_key(gateway)["key"]
    body = {"model": "gpt-dead", "messages": [{"role": "user", "content": "x"}]}
    error = assert_error(chat(gateway, key, body), 502, "upstream_error", type_="server_error")
    assert "127.0.0.1" not in error["message"]
