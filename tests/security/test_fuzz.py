"""Fuzzing the live server.

1. schemathesis against the server's own ``/openapi.json``: every documented operation, with
   no credentials, with a user's key and (for ``/api/admin/*``) an admin's key; positive and
   negative (schema-violating) data. Checks: no 5xx, status codes, content types, headers and
   bodies as documented, schema-violating input rejected. Every call has a timeout (a hang
   fails the test). Bounded: :data:`MAX_EXAMPLES` per operation, well under two minutes.
2. Hand-made hostile inputs (bad JSON, huge bodies, deep nesting, invalid UTF-8, wrong
   content types, absurd numbers): each a clear 4xx in OpenAI's error shape, and nothing
   stored changes (``keys list``, ``accounts list``, ``plans list`` compared before/after).
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
import socket
import time
import zlib
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from tests.helpers import Gateway
from tests.security.conftest import (
    CHAT,
    admin_key,
    assert_openai_error,
    call,
    new_account,
    new_key,
    stored_state,
)

MAX_EXAMPLES = 25
TIMEOUT = 10.0
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]
REAL_MODEL = "gpt-test"


@pytest.fixture(scope="module")
def fuzz_keys(sec: Gateway) -> dict[str, str]:
    email = new_account(sec, plan="enterprise")
    return {"user": new_key(sec, email)["key"], "admin": admin_key(sec)}


@pytest.fixture(scope="module")
def api_schema(sec: Gateway) -> Any:
    """The live server's document, loaded by schemathesis (the server's, not a copy)."""
    return schemathesis.openapi.from_url(sec.url + "/openapi.json")


def _documented_operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation, known at collection time (the document
    is built from code); the test then checks the live server documents the same."""
    from chatgate.api.openapi import openapi_document

    return sorted(
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    )


def _callers(path: str, keys: dict[str, str]) -> list[dict[str, str]]:
    who: list[dict[str, str]] = [{}, {"Authorization": f"Bearer {keys['user']}"}]
    if path.startswith("/api/admin"):
        who.append({"Authorization": f"Bearer {keys['admin']}"})
    return who


def _with_real_model(case: Any) -> Any | None:
    """The same case naming a configured model, so the fuzz gets past the model lookup."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    return case.operation.Case(
        path_parameters=case.path_parameters,
        query=case.query,
        body={**body, "model": REAL_MODEL},
        media_type=case.media_type,
    )


def test_the_live_document_lists_these_operations(api_schema: Any) -> None:
    live = sorted(
        (result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()
    )
    assert live == _documented_operations()


@pytest.mark.parametrize(("method", "path"), _documented_operations())
def test_openapi_operation(
    api_schema: Any, fuzz_keys: dict[str, str], method: str, path: str
) -> None:
    """Positive and negative cases of one operation, as each kind of caller: no 5xx, no
    answer outside the document, nothing slower than :data:`TIMEOUT`."""
    operation = api_schema[path][method]
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.body or operation.query or operation.path_parameters:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=st.one_of(*strategies))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        variants = [case]
        real = _with_real_model(case)
        if real is not None:
            variants.append(real)
        for variant in variants:
            sent = {
                k: v for k, v in (variant.headers or {}).items() if k.lower() != "authorization"
            }
            for auth in _callers(path, fuzz_keys):
                variant.headers = {**sent, **auth}
                variant.call_and_validate(checks=CHECKS, timeout=TIMEOUT)

    run()


# -- hand-made hostile inputs -------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_key(sec: Gateway) -> str:
    return str(new_key(sec, new_account(sec, plan="enterprise"))["key"])


def _post(
    gw: Gateway, path: str, key: str | None, data: bytes | str, ctype: str | None
) -> requests.Response:
    headers = {"Content-Type": ctype} if ctype else {}
    return call(gw, "POST", path, key, data=data, headers=headers)


DEEP = 100_000
HOSTILE: list[tuple[str, bytes | str, str | None, int]] = [
    ("bad json", b"{not json", "application/json", 400),
    ("truncated json", b'{"model": "gpt-test", "messages": [', "application/json", 400),
    ("json array", b"[1, 2, 3]", "application/json", 400),
    ("json string", b'"hello"', "application/json", 400),
    ("json null", b"null", "application/json", 400),
    ("empty body", b"", "application/json", 400),
    ("nan", b'{"model": "gpt-test", "messages": [], "temperature": NaN}', "application/json", 400),
    ("duplicate keys", b'{"model": 1, "model": 2}', "application/json", 400),
    ("deep arrays", b"[" * DEEP + b"]" * DEEP, "application/json", 400),
    ("deep objects", b'{"a":' * DEEP + b"1" + b"}" * DEEP, "application/json", 400),
    (
        "deep in a field",
        b'{"model": "gpt-test", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        "application/json",
        400,
    ),
    ("invalid utf-8", b'{"model": "gpt-\xff\xfe", "messages": []}', "application/json", 400),
    (
        "lone surrogate",
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
        "application/json",
        400,
    ),
    ("utf-16 body", '{"model": "gpt-test"}'.encode("utf-16"), "application/json", 400),
    ("form body", b"model=gpt-test&messages=x", "application/x-www-form-urlencoded", 400),
    ("text body", b"hello", "text/plain", 400),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", 400),
    ("no content type", b'{"model": "gpt-test"}', None, 400),
]


def _chat(**extra: Any) -> bytes:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], **extra}
    return json.dumps(body).encode()


ABSURD: list[tuple[str, bytes, str | None]] = [
    ("max_tokens 10**12", _chat(max_tokens=10**12), "max_tokens"),
    ("max_completion_tokens 10**30", _chat(max_completion_tokens=10**30), "max_completion_tokens"),
    ("max_tokens negative", _chat(max_tokens=-1), "max_tokens"),
    ("max_tokens zero", _chat(max_tokens=0), "max_tokens"),
    ("max_tokens float", _chat(max_tokens=1.5), "max_tokens"),
    ("max_tokens string", _chat(max_tokens="100"), "max_tokens"),
    ("max_tokens bool", _chat(max_tokens=True), "max_tokens"),
    ("n negative", _chat(n=-3), "n"),
    ("n huge", _chat(n=10**9), "n"),
    ("temperature negative", _chat(temperature=-0.5), "temperature"),
    ("temperature huge", _chat(temperature=1e308), "temperature"),
    ("top_p negative", _chat(top_p=-1), "top_p"),
    ("presence_penalty", _chat(presence_penalty=-100), "presence_penalty"),
    (
        "huge integer",
        b'{"model": "gpt-test", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
        None,
    ),
    ("stream not bool", _chat(stream="yes"), "stream"),
    ("messages not list", b'{"model": "gpt-test", "messages": {"role": "user"}}', "messages"),
    ("empty model", _chat(model=""), "model"),
    ("huge model name", _chat(model="m" * 100_000), "model"),
    # What OpenAI refuses of tools, formats and messages (they were forwarded, or ignored).
    ("five stop sequences", _chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("tool_choice unknown", _chat(tool_choice="banana"), "tool_choice"),
    ("tool_choice required, no tools", _chat(tool_choice="required"), "tool_choice"),
    ("a tool without its function", _chat(tools=[{"type": "function"}]), "tools[0].function"),
    ("response_format unknown", _chat(response_format={"type": "xml"}), "response_format.type"),
    ("response_format a string", _chat(response_format="json"), "response_format"),
    (
        "json_schema without its name",
        _chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema",
    ),
    ("a user message without content", _chat(messages=[{"role": "user"}]), "messages[0]"),
    (
        "stream_options without stream",
        _chat(stream_options={"include_usage": True}),
        "stream_options",
    ),
    ("top_logprobs without logprobs", _chat(top_logprobs=3), "top_logprobs"),
    ("top_logprobs beyond 20", _chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (
        "a tool message without tool_call_id",
        _chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]),
        "messages[1]",
    ),
]


def _json_object_or_empty(data: bytes | str) -> bool:
    try:
        return not data or isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


def test_hostile_bodies_are_clear_4xx_and_change_nothing(sec: Gateway, fuzz_key: str) -> None:
    """Each case on every JSON endpoint; the stored state is compared once around them all
    (reading it takes three CLI runs)."""
    before = stored_state(sec)
    problems = []
    for name, data, ctype, status in HOSTILE:
        paths = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
        if not _json_object_or_empty(data):  # /api/keys makes a key from {} (fields optional)
            paths.append("/api/keys")
        for path in paths:
            began = time.monotonic()
            resp = _post(sec, path, fuzz_key, data, ctype)
            took = time.monotonic() - began
            try:
                assert took < TIMEOUT, f"took {took:.1f}s"
                assert_openai_error(resp, status if path == "/v1/chat/completions" else None)
            except AssertionError as exc:
                problems.append(f"{name} -> {path}: {exc}")
    assert not problems, "\n".join(problems)
    assert stored_state(sec) == before


# Header values are bytes on the wire; aiohttp reads what is not UTF-8 as lone surrogates.
HOSTILE_AUTHORIZATION: list[tuple[str, bytes]] = [
    ("not utf-8, key length", b"Bearer sk-cg-" + b"\xff" * 38),
    ("latin-1, key length", b"Bearer sk-cg-" + b"\xe9" * 38),
    ("utf-8, key length", b"Bearer sk-cg-" + "\u00e9".encode() * 38),
    ("not utf-8 inside", b"Bearer sk-cg-" + b"A" * 20 + b"\xff" + b"B" * 17),
    ("not utf-8 scheme", b"B\xffarer sk-cg-" + b"A" * 38),
]


def test_hostile_authorization_bytes_are_401(sec: Gateway) -> None:
    """A key header that is not ASCII (let alone UTF-8) is a wrong key: 401 invalid_api_key,
    on /v1 and /api alike (it was a 500: hashing it failed to encode it)."""
    problems = []
    for name, value in HOSTILE_AUTHORIZATION:
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/api/keys"),
            ("POST", "/api/keys"),
        ):
            body = json.dumps(CHAT) if method == "POST" else None
            resp = requests.request(
                method,
                sec.url + path,
                data=body,
                headers={"Authorization": value, "Content-Type": "application/json"},
                timeout=TIMEOUT,
            )
            try:
                error = assert_openai_error(resp, 401)
                assert error["code"] == "invalid_api_key", error
            except AssertionError as exc:
                problems.append(f"{name} -> {method} {path}: {exc}")
    assert not problems, "\n".join(problems)


def test_absurd_numbers_are_400_naming_the_field(sec: Gateway, fuzz_key: str) -> None:
    before = stored_state(sec)
    problems = []
    for name, data, param in ABSURD:
        resp = _post(sec, "/v1/chat/completions", fuzz_key, data, "application/json")
        try:
            error = assert_openai_error(resp, 400)
            assert param is None or error["param"] == param, error
        except AssertionError as exc:
            problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)
    assert stored_state(sec) == before


def test_huge_bodies_are_413(sec: Gateway, fuzz_key: str) -> None:
    before = stored_state(sec)
    huge = (
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "'
        + b"x" * (21 << 20)
        + b'"}]}'
    )
    # (/api/keys/report-leak: in test_leaks.py, from an address of its own: it is rate limited)
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/api/keys"):
        error = assert_openai_error(_post(sec, path, fuzz_key, huge, "application/json"), 413)
        assert error["code"] == "request_too_large"
    # Without a key too: the limit holds before authentication is even looked at.
    assert_openai_error(_post(sec, "/v1/chat/completions", None, huge, "application/json"))
    assert stored_state(sec) == before


def test_a_lying_content_length_does_not_hang(sec: Gateway, fuzz_key: str) -> None:
    """A client that announces more than it sends is cut off by the server or times out
    on its side only: other requests keep being served meanwhile."""
    with socket.create_connection(("127.0.0.1", sec.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + fuzz_key.encode() + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
        )
        ok = call(sec, "GET", "/v1/models", fuzz_key)
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "-1"},
        {"Content-Length": "99999999999999999999"},
        {"Transfer-Encoding": "chunked", "Content-Length": "5"},
    ],
    ids=["negative length", "huge length", "chunked and length"],
)
def test_broken_framing_is_a_4xx(sec: Gateway, fuzz_key: str, headers: dict[str, str]) -> None:
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: x",
        b"Authorization: Bearer " + fuzz_key.encode(),
        b"Content-Type: application/json",
        *(f"{k}: {v}".encode() for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", sec.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n{}")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", status_line), status_line


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_not_in_its_content_encoding_is_a_400(
    sec: Gateway, fuzz_key: str, encoding: str
) -> None:
    """Bytes that do not decode as the Content-Encoding they name were a 500 with a
    traceback in the log; every JSON endpoint answers OpenAI's 400 instead."""
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/conversations"):
        resp = requests.post(
            sec.url + path,
            data=b'{"model": "gpt-test"}',
            headers={
                "Authorization": f"Bearer {fuzz_key}",
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            },
            timeout=TIMEOUT,
        )
        assert resp.status_code == 400, (path, resp.status_code)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_body"
        assert encoding in error["message"]
    packed = gzip.compress(b'{"model": "gpt-test", "messages": []}')
    resp = requests.post(
        sec.url + "/v1/chat/completions",
        data=packed,
        headers={"Authorization": f"Bearer {fuzz_key}", "Content-Encoding": "gzip"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"  # read


def _send_encoded(gw: Gateway, key: str, data: bytes, encoding: str) -> requests.Response:
    return requests.post(
        gw.url + "/v1/chat/completions",
        data=data,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Encoding": encoding,
        },
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_an_unsupported_content_encoding_is_an_openai_415(
    sec: Gateway, fuzz_key: str, encoding: str
) -> None:
    """aiohttp's parser refused br and zstd before any handler ran: a plain-text 400 that said
    "Please install `Brotli`", and a traceback in the log. Now it is OpenAI's shape, naming
    the encoding, and the log stays quiet."""
    before = len(sec.logs())
    resp = _send_encoded(sec, fuzz_key, b"\x1b\x00\x00", encoding)
    assert resp.status_code == 415, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unsupported_content_encoding"
    assert repr(encoding.split(",")[-1].strip()) in error["message"]
    assert "Traceback" not in sec.logs()[before:]


def test_encoded_bodies_are_read_and_a_bomb_is_413(sec: Gateway, fuzz_key: str) -> None:
    """gzip (one member or several), zlib's deflate and raw deflate, and encodings listed with
    identity, are read; a small body that inflates beyond the body limit is a 413, inflated
    no further than that limit."""
    chat = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cases = {
        "gzip": gzip.compress(chat),
        "x-gzip": gzip.compress(chat[:20]) + gzip.compress(chat[20:]),
        "deflate": zlib.compress(chat),
        "Deflate": raw.compress(chat) + raw.flush(),
        "identity, gzip": gzip.compress(chat),
        "gzip, gzip": gzip.compress(gzip.compress(chat)),
    }
    for encoding, data in cases.items():
        resp = _send_encoded(sec, fuzz_key, data, encoding)
        assert resp.status_code == 200, (encoding, resp.text)
        assert resp.json()["choices"][0]["message"]["content"].startswith("echo: hi")
    bomb = gzip.compress(chat[:-4] + b" " * (64 << 20) + chat[-4:], compresslevel=9)
    assert len(bomb) < 100_000
    error = assert_openai_error(_send_encoded(sec, fuzz_key, bomb, "gzip"), 413)
    assert error["code"] == "request_too_large"
    error = assert_openai_error(_send_encoded(sec, fuzz_key, gzip.compress(chat)[:-9], "gzip"))
    assert error["code"] == "invalid_body"


# A role or a content part's type that is a list or an object: unhashable, where the
# sessions code looked them up in sets (a 500, "unhashable type: 'list'").
UNHASHABLE: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "a role that is a list",
        "/v1/responses",
        {"model": "gpt-test", "input": [{"type": "message", "role": [], "content": "hi"}]},
        "input[0].role",
    ),
    (
        "a role that is an object",
        "/v1/conversations",
        {"items": [{"role": {}, "content": "x"}]},
        "items[0].role",
    ),
    (
        "a content part type that is a list",
        "/v1/responses",
        {"model": "gpt-test", "input": [{"role": "user", "content": [{"type": [], "text": "h"}]}]},
        "input[0].content[0].type",
    ),
]


def test_unhashable_roles_and_types_are_400(sec: Gateway, fuzz_key: str) -> None:
    before = stored_state(sec)
    problems = []
    for name, path, body, param in UNHASHABLE:
        resp = _post(sec, path, fuzz_key, json.dumps(body).encode(), "application/json")
        try:
            error = assert_openai_error(resp, 400)
            assert error["param"] == param, error
        except AssertionError as exc:
            problems.append(f"{name}: {exc}")
    assert not problems, "\n".join(problems)
    assert stored_state(sec) == before


def test_a_malformed_header_never_puts_its_key_in_the_log(sec: Gateway, fuzz_key: str) -> None:
    """A request aiohttp cannot parse was logged as an ERROR whose traceback quoted the
    bytes at fault: a whole key from an ``Authorization`` header too long, or ending in a
    control character. Now one WARNING line, its class and status, and still a 400."""
    marker = secrets.token_hex(4)
    for value in (
        b"Bearer " + fuzz_key.encode() + b"a" * 8200,  # past aiohttp's 8190-byte line
        b"Bearer " + fuzz_key.encode() + b"\x01",
    ):
        with socket.create_connection(("127.0.0.1", sec.port), timeout=TIMEOUT) as sock:
            sock.sendall(
                b"GET /v1/models?" + marker.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: " + value + b"\r\n\r\n"
            )
            status_line = sock.recv(4096).split(b"\r\n", 1)[0]
        assert re.match(rb"HTTP/1\.[01] 400 ", status_line), status_line
    assert call(sec, "GET", "/v1/models", fuzz_key).status_code == 200  # still serving
    logs = sec.logs()
    assert fuzz_key not in logs and fuzz_key[6:30] not in logs
    assert logs.count("refused a malformed HTTP request from 127.0.0.1") >= 2


def test_static_files_are_served_by_name_only(sec: Gateway) -> None:
    """A name too long for the file system was an OSError, which the middleware took for
    the database's: 503 "database unavailable", retry-after, a false alarm in the log."""
    css = requests.get(sec.url + "/dashboard/static/app.css", timeout=TIMEOUT)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    again = requests.get(
        sec.url + "/dashboard/static/app.css",
        headers={"If-None-Match": css.headers["ETag"]},
        timeout=TIMEOUT,
    )
    assert again.status_code == 304
    for name in ("a" * 256, "a" * 5000, "..%2Fapp.py", "%2e%2e/__init__.py", "nope.css"):
        resp = requests.get(sec.url + "/dashboard/static/" + name, timeout=TIMEOUT)
        assert resp.status_code == 404, (name[:20], resp.status_code, resp.text[:200])
