"""The retry rules (two pure functions) and the transports, over httpx's in-process mock."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from chatgate.client import (
    RETRIES_HEADER,
    AsyncOpenAI,
    OpenAI,
    RateLimiter,
    RetryPolicy,
    Transport,
    estimate_tokens,
    parse_retry_after,
    retry_delay,
    should_retry,
)
from chatgate.client._transport import DEFAULT_COMPLETION_TOKENS
from chatgate.settings import Settings

POLICY = RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=8.0, max_retry_after=60.0)
FAST = RetryPolicy(max_retries=3, initial_delay=0.001, max_delay=0.002)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error(status: int, code: str | None, type_: str = "requests", **headers: str) -> httpx.Response:
    body = {"error": {"message": "nope", "type": type_, "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def completion(total: int = 7) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": total - 2, "total_tokens": total},
        },
    )


class Script:
    """A mock server answering from a list; counts attempts."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.attempts = 0
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        self.headers.append(request.headers)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


# -- the pure rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "code", "expected"),
    [
        (None, {}, None, True),  # connection error, timeout
        (429, {}, "rate_limit_exceeded", True),
        (429, {}, "insufficient_quota", False),
        (429, {"x-should-retry": "true"}, "insufficient_quota", False),
        (500, {}, None, True),
        (502, {}, "upstream_error", True),
        (503, {}, None, True),
        (504, {}, "upstream_timeout", True),
        (408, {}, None, True),
        (409, {}, None, True),
        (400, {}, "invalid_request_error", False),
        (404, {}, "model_not_found", False),
        (401, {}, "invalid_api_key", False),
        (401, {"x-should-retry": "true"}, None, False),
        (403, {}, "model_not_allowed", False),
        (500, {"x-should-retry": "false"}, None, False),
        (429, {"x-should-retry": "false"}, "rate_limit_exceeded", False),
        (400, {"x-should-retry": "true"}, None, True),
    ],
)
def test_should_retry(
    status: int | None, headers: dict[str, str], code: str | None, expected: bool
) -> None:
    assert should_retry(status, headers, code) is expected


def test_retry_delay_honours_the_server() -> None:
    assert retry_delay(0, {"retry-after-ms": "1500", "retry-after": "9"}, POLICY, 0.5) == 1.5
    assert retry_delay(5, {"retry-after": "2"}, POLICY, 0.5) == 2.0
    assert retry_delay(0, {"retry-after": "0"}, POLICY, 0.5) == 0.0
    assert retry_delay(0, {"retry-after": "61"}, POLICY, 0.5) is None  # too long: give up
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert retry_delay(0, {"retry-after": date}, POLICY, 0.5) == pytest.approx(30, abs=1.5)


def test_retry_delay_backs_off_with_jitter_and_a_cap() -> None:
    assert [retry_delay(n, {}, POLICY, 0.0) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert retry_delay(0, {}, POLICY, 0.999) == pytest.approx(0.5 * 0.75, rel=0.01)
    assert retry_delay(3, None, POLICY, 0.5) == pytest.approx(4 * 0.875)
    assert retry_delay(10_000, {}, POLICY, 0.0) == 8.0
    assert retry_delay(0, {"retry-after": "soon"}, POLICY, 0.0) == 0.5  # unreadable: backoff


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "-1"}) is None


@pytest.mark.parametrize(
    "date", ["Fri, 01 Jan 10000 00:00:00 GMT", "Mon, 01 Jan 99999 00:00:00 GMT"]
)
def test_an_unreadable_retry_after_date_is_no_hint(date: str) -> None:
    assert parse_retry_after({"retry-after": date}) is None
    script = Script(error(503, None, "server_error", **{"retry-after": date}), completion())
    assert ask(sdk(script)).choices[0].message.content == "ok"  # backed off, retried
    script = Script(error(503, None, "server_error", **{"retry-after": date}))
    with pytest.raises(openai.InternalServerError):  # the SDK's error, not a ValueError
        ask(sdk(script))
    assert script.attempts == 4


def test_estimate_tokens() -> None:
    body = json.dumps({**CHAT, "max_tokens": 50}).encode()
    request = httpx.Request(
        "POST",
        "http://x/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert estimate_tokens(request) == len(body) // 4 + 1 + 50
    request = httpx.Request("POST", "http://x/v1/chat/completions", json=CHAT)
    assert estimate_tokens(request, default_completion=100) > 100
    # As chatgate reserves: each of n choices may write max_tokens, or the server's default.
    prompt = len(request.content) // 4 + 1
    assert estimate_tokens(request) == prompt + Settings().default_max_tokens
    many = httpx.Request("POST", "http://x/v1/chat/completions", json={**CHAT, "n": 3})
    assert estimate_tokens(many) == len(many.content) // 4 + 1 + 3 * DEFAULT_COMPLETION_TOKENS
    capped = httpx.Request("POST", "http://x/", json={**CHAT, "n": 2, "max_tokens": 50})
    assert estimate_tokens(capped) == len(capped.content) // 4 + 1 + 100
    assert estimate_tokens(httpx.Request("GET", "http://x/v1/models")) == 0
    embed = httpx.Request("POST", "http://x/v1/embeddings", json={"model": "e", "input": "abc"})
    assert 0 < estimate_tokens(embed) < 20


# -- the transports under the SDK -------------------------------------------------------


def sdk(script: Callable[[httpx.Request], httpx.Response], **kw: Any) -> openai.OpenAI:
    kw.setdefault("retry", FAST)
    return OpenAI(
        api_key="sk-cg-test", base_url="http://gw/v1", transport=httpx.MockTransport(script), **kw
    )


def ask(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_insufficient_quota_is_not_retried() -> None:
    script = Script(error(429, "insufficient_quota", "insufficient_quota", **{"retry-after": "1"}))
    with pytest.raises(openai.RateLimitError) as info:
        ask(sdk(script))
    assert script.attempts == 1
    assert info.value.code == "insufficient_quota"


@pytest.mark.parametrize(
    ("answer", "exc"),
    [
        (error(401, "invalid_api_key", "invalid_request_error"), openai.AuthenticationError),
        (error(403, "model_not_allowed", "permission_error"), openai.PermissionDeniedError),
        (error(400, None, "invalid_request_error"), openai.BadRequestError),
        (
            error(500, None, "server_error", **{"x-should-retry": "false"}),
            openai.InternalServerError,
        ),
    ],
)
def test_errors_not_worth_retrying_surface_at_once(
    answer: httpx.Response, exc: type[openai.APIStatusError]
) -> None:
    script = Script(answer)
    with pytest.raises(exc):
        ask(sdk(script))
    assert script.attempts == 1


def test_5xx_then_success() -> None:
    script = Script(error(502, "upstream_error"), error(503, None), completion())
    assert ask(sdk(script)).choices[0].message.content == "ok"
    assert script.attempts == 3


def test_gives_up_after_max_retries_with_the_sdks_own_error() -> None:
    script = Script(error(500, None, "server_error"))
    with pytest.raises(openai.InternalServerError):
        ask(sdk(script, max_retries=2, retry=None))  # retry=None: the policy from max_retries
    assert script.attempts == 3


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (1, 2), (5, 6)])
def test_with_options_max_retries_sets_the_transports_not_the_sdks(
    retries: int, attempts: int
) -> None:
    script = Script(error(500, None, "server_error"))
    client = sdk(script)  # the transport's own policy: 3 retries
    copy = client.with_options(max_retries=retries)
    assert isinstance(copy, openai.OpenAI) and copy.max_retries == 0
    with pytest.raises(openai.InternalServerError):
        ask(copy)
    assert script.attempts == attempts  # not (retries + 1) * 4, the SDK's around the transport's
    assert all(RETRIES_HEADER not in headers for headers in script.headers)  # never sent

    script.attempts = 0
    with pytest.raises(openai.InternalServerError):
        ask(client)  # the original keeps its own
    assert script.attempts == 4

    script.attempts = 0
    kept = copy.with_options(timeout=5).copy(set_default_headers={"x-team": "a"})
    with pytest.raises(openai.InternalServerError):
        ask(kept)  # a copy of the copy keeps its count, even when its headers are replaced
    assert script.attempts == attempts
    assert script.headers[-1]["x-team"] == "a"


def test_a_copy_on_an_http_client_of_its_own_keeps_the_sdks_retries() -> None:
    script = Script(error(500, None, "server_error"))
    plain = httpx.Client(transport=httpx.MockTransport(script))  # no chatgate transport
    copy = sdk(Script(completion())).with_options(http_client=plain, max_retries=1)
    assert copy.max_retries == 1  # nothing else would retry
    with pytest.raises(openai.InternalServerError):
        ask(copy.with_options(timeout=5))
    assert script.attempts == 2
    assert all(RETRIES_HEADER not in headers for headers in script.headers)


def test_with_options_refuses_a_retry_count_below_zero() -> None:
    client = sdk(Script(completion()))
    for bad in (-1, None, 1.5, True):
        with pytest.raises(ValueError, match="max_retries"):
            client.with_options(max_retries=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "attempts"), [("0", 1), ("2", 3), ("-1", 4), ("many", 4)])
def test_the_retries_header_sets_one_requests_retries(value: str, attempts: int) -> None:
    script = Script(error(503, None))
    transport = Transport(httpx.MockTransport(script), retry=FAST)
    with httpx.Client(transport=transport) as client:
        answer = client.post(
            "http://gw/v1/chat/completions", json=CHAT, headers={RETRIES_HEADER: value}
        )
    assert answer.status_code == 503
    assert script.attempts == attempts  # a value that is not a count leaves the policy's 3
    assert all(RETRIES_HEADER not in headers for headers in script.headers)


def test_429_waits_what_the_server_asks() -> None:
    slept: list[float] = []
    script = Script(error(429, "rate_limit_exceeded", **{"retry-after-ms": "250"}), completion())
    transport = Transport(httpx.MockTransport(script), retry=POLICY, sleep=slept.append)
    with httpx.Client(transport=transport) as client:
        assert client.post("http://gw/v1/chat/completions", json=CHAT).status_code == 200
    assert slept == [0.25]


def test_backoff_sequence_without_hints() -> None:
    slept: list[float] = []
    script = Script(error(500, None), error(500, None), error(500, None), completion())
    transport = Transport(
        httpx.MockTransport(script), retry=POLICY, sleep=slept.append, rng=lambda: 0.0
    )
    with httpx.Client(transport=transport) as client:
        assert client.post("http://gw/v1/chat/completions", json=CHAT).status_code == 200
    assert slept == [0.5, 1.0, 2.0]


def test_a_long_retry_after_is_passed_on() -> None:
    script = Script(error(429, "rate_limit_exceeded", **{"retry-after": "3600"}))
    with pytest.raises(openai.RateLimitError):
        ask(sdk(script, retry=POLICY))
    assert script.attempts == 1


def test_connection_errors_are_retried_then_raised_as_the_sdks_error() -> None:
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(openai.APIConnectionError):
        ask(sdk(script))
    assert script.attempts == 4
    script = Script(httpx.ReadTimeout("slow"), completion())
    assert ask(sdk(script)).choices[0].message.content == "ok"


def test_a_refused_connection_gives_its_limiter_slot_back() -> None:
    limiter = RateLimiter(rpm=1, window=60)
    script = Script(httpx.ConnectError("refused"), completion())
    assert ask(sdk(script, limiter=limiter)).choices[0].message.content == "ok"
    assert limiter.state().requests.remaining == 0  # one request counted, not two


def test_headers_and_usage_keep_the_limiter_in_step() -> None:
    limiter = RateLimiter(tpm=10_000)
    answer = completion(total=42)
    answer.headers.update(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-reset-requests": "600ms",
        }
    )
    ask(sdk(Script(answer), limiter=limiter))
    state = limiter.state()
    assert state.requests.limit == 100
    assert state.tokens.remaining == 10_000 - 42  # the estimate was replaced by the usage


def sse(*events: dict[str, Any]) -> Iterator[bytes]:
    for event in events:
        yield b"data: " + json.dumps(event).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def test_stream_usage_is_metered_and_the_stream_unchanged() -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": "he"}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "stop"}]},
        {
            **chunk,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]
    raw = b"".join(sse(*events))

    def handler(request: httpx.Request) -> httpx.Response:
        # Split mid-line, as a network would.
        pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=httpx.ByteStream(b"") if not pieces else _Chunks(pieces),
        )

    limiter = RateLimiter(tpm=1000)
    client = OpenAI(
        api_key="k",
        base_url="http://gw/v1",
        limiter=limiter,
        transport=httpx.MockTransport(handler),
    )
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hey"
    assert limiter.state().tokens.remaining == 1000 - 5


class _Chunks(httpx.SyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces


async def test_async_client_retries_and_keeps_the_sdks_errors() -> None:
    script = Script(error(503, None), completion())
    client = AsyncOpenAI(
        api_key="k", base_url="http://gw/v1", retry=FAST, transport=httpx.MockTransport(script)
    )
    reply = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "ok" and script.attempts == 2

    quota = Script(error(429, "insufficient_quota", "insufficient_quota"))
    client = AsyncOpenAI(
        api_key="k", base_url="http://gw/v1", retry=FAST, transport=httpx.MockTransport(quota)
    )
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert quota.attempts == 1

    failing = Script(error(503, None))
    client = AsyncOpenAI(
        api_key="k", base_url="http://gw/v1", retry=FAST, transport=httpx.MockTransport(failing)
    )
    with pytest.raises(openai.InternalServerError):
        await client.with_options(max_retries=1).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert failing.attempts == 2
    assert all(RETRIES_HEADER not in headers for headers in failing.headers)
