"""chatgate.client against a real ``chatgate serve``: retries, quota, tool calls, rate limits."""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests
from openai.types.chat import ChatCompletionToolParam

from chatgate.client import AsyncOpenAI, OpenAI, RetryPolicy
from tests.client.conftest import Counting, Keys
from tests.helpers import Gateway, Upstream

FAST = RetryPolicy(max_retries=3, initial_delay=0.05, max_delay=0.2)
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "schedule_event",
            "description": "Put an event in the agenda.",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "when": {"type": "string"},
                    "minutes": {"type": "integer"},
                },
                "required": ["title", "when"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_reminder",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    },
]


def flaky(fail_times: int, status: int) -> dict[str, Any]:
    """The fake upstream's "fail N times, then succeed" switch, keyed by a fresh id."""
    return {"fake": {"fail_times": fail_times, "status": status, "key": secrets.token_hex(6)}}


def arrivals(upstream: Upstream) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, body) of every request the fake upstream got (both lists only grow)."""
    times = requests.get(f"http://127.0.0.1:{upstream.port}/_received_at", timeout=10).json()
    return list(zip(times, upstream.received(), strict=False))


def seen_by_upstream(upstream: Upstream, marker: str) -> list[dict[str, Any]]:
    return [b for b in upstream.received() if marker in json.dumps(b)]


# -- retries ------------------------------------------------------------------------------


def test_fails_twice_then_succeeds(base_url: str, api_key: str, upstream: Upstream) -> None:
    counting = Counting()
    client = OpenAI(api_key=api_key, base_url=base_url, retry=FAST, transport=counting)
    extra = flaky(2, 500)
    reply = client.chat.completions.create(
        model="gpt-flaky", messages=[{"role": "user", "content": "try"}], extra_body=extra
    )
    assert "try" in (reply.choices[0].message.content or "")
    assert counting.statuses == [502, 502, 200]  # upstream 500 -> the gateway's 502
    assert len(seen_by_upstream(upstream, extra["fake"]["key"])) == 3


def test_upstream_429_retry_after_is_honoured(
    base_url: str, api_key: str, upstream: Upstream
) -> None:
    counting = Counting()
    client = OpenAI(api_key=api_key, base_url=base_url, retry=FAST, transport=counting)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model="gpt-flaky", messages=[{"role": "user", "content": "x"}], extra_body=flaky(2, 429)
    )
    assert reply.choices[0].message.content
    assert counting.statuses == [429, 429, 200]
    assert time.monotonic() - started >= 1.9  # twice the fake's "retry-after: 1"


def test_too_many_failures_raise_the_sdks_error(
    base_url: str, api_key: str, upstream: Upstream
) -> None:
    counting = Counting()
    client = OpenAI(
        api_key=api_key, base_url=base_url, retry=RetryPolicy(1, 0.01, 0.01), transport=counting
    )
    extra = flaky(5, 503)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="gpt-flaky", messages=[{"role": "user", "content": "x"}], extra_body=extra
        )
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert counting.statuses == [502, 502]
    assert len(seen_by_upstream(upstream, extra["fake"]["key"])) == 2


def test_with_options_max_retries_is_the_number_of_retries(
    base_url: str, api_key: str, upstream: Upstream
) -> None:
    counting = Counting()
    client = OpenAI(api_key=api_key, base_url=base_url, retry=FAST, transport=counting)
    extra = flaky(5, 503)
    with pytest.raises(openai.InternalServerError):
        client.with_options(max_retries=1).chat.completions.create(
            model="gpt-flaky", messages=[{"role": "user", "content": "x"}], extra_body=extra
        )
    assert counting.statuses == [502, 502]  # one retry: not the SDK's around the transport's
    assert len(seen_by_upstream(upstream, extra["fake"]["key"])) == 2


def test_insufficient_quota_from_the_server_is_not_retried(base_url: str, keys: Keys) -> None:
    key = keys.key(keys.plan("--monthly-tokens", "1"))
    counting = Counting()
    client = OpenAI(api_key=key, base_url=base_url, retry=FAST, transport=counting)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}], max_tokens=5
        )
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers.get("x-should-retry") == "false"
    assert counting.statuses == [429]


def test_bad_key_is_the_sdks_authentication_error(base_url: str) -> None:
    counting = Counting()
    client = OpenAI(api_key="sk-cg-nope", base_url=base_url, retry=FAST, transport=counting)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert counting.statuses == [401]


def test_nothing_listening_is_an_api_connection_error() -> None:
    from tests.helpers import free_port

    client = OpenAI(api_key="sk-cg-x", base_url=f"http://127.0.0.1:{free_port()}/v1", retry=FAST)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


async def test_async_client_streams_through_the_gateway(base_url: str, api_key: str) -> None:
    client = AsyncOpenAI(api_key=api_key, base_url=base_url, rpm=100, retry=FAST)
    reply = await client.chat.completions.create(
        model="gpt-flaky", messages=[{"role": "user", "content": "async"}], extra_body=flaky(1, 500)
    )
    assert "async" in (reply.choices[0].message.content or "")
    stream = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hey"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "hey" in text
    await client.close()


# -- tool calling passes through unchanged ------------------------------------------------


def test_tool_calls_pass_through(base_url: str, api_key: str, upstream: Upstream) -> None:
    client = OpenAI(api_key=api_key, base_url=base_url)
    marker = secrets.token_hex(4)
    messages: list[Any] = [{"role": "user", "content": f"book it {marker}"}]
    reply = client.chat.completions.create(
        model="gpt-tools",
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "schedule_event"}},
    )
    forwarded = seen_by_upstream(upstream, marker)[-1]
    assert forwarded["tools"] == TOOLS
    assert forwarded["tool_choice"] == {"type": "function", "function": {"name": "schedule_event"}}
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "schedule_event"
    assert json.loads(call.function.arguments) == {"title": "fake title", "when": "fake when"}

    # The tool's result goes back, with its call id, and the model answers in words.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'},
    ]
    final = client.chat.completions.create(model="gpt-tools", messages=messages, tools=TOOLS)
    assert final.choices[0].finish_reason == "stop"
    assert '{"ok": true}' in (final.choices[0].message.content or "")
    forwarded = seen_by_upstream(upstream, marker)[-1]
    assert forwarded["messages"][1]["tool_calls"][0]["id"] == call.id
    assert forwarded["messages"][2] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": '{"ok": true}',
    }


def test_streamed_tool_call_deltas_pass_through(base_url: str, api_key: str) -> None:
    client = OpenAI(api_key=api_key, base_url=base_url)
    stream = client.chat.completions.create(
        model="gpt-tools",
        messages=[{"role": "user", "content": "remind me"}],
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    first = deltas[0].tool_calls
    assert first is not None and first[0].id and first[0].function is not None
    assert first[0].function.name == "schedule_event" and first[0].type == "function"
    pieces = [
        d.tool_calls[0].function.arguments
        for d in deltas[1:]
        if d.tool_calls and d.tool_calls[0].function and d.tool_calls[0].function.arguments
    ]
    assert len(pieces) >= 2  # arguments arrive in several deltas
    assert json.loads("".join(pieces)) == {"title": "fake title", "when": "fake when"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


# -- client-side rate limiting against the server's limits ---------------------------------

BURST = 90  # > 60 so that a 60/min limit bites; the 200 would take over 3 minutes
RPM = 60


def burst(client: openai.OpenAI, n: int, marker: str) -> list[BaseException | None]:
    def one(i: int) -> BaseException | None:
        try:
            client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": f"{marker} {i}"}],
                max_tokens=1,
            )
        except openai.OpenAIError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.slow
def test_burst_through_the_limiter_sees_no_429(
    gw: Gateway, base_url: str, keys: Keys, upstream: Upstream
) -> None:
    """A 60/min key, a burst of 90 calls from 16 threads sharing one client.

    Without the limiter the burst collects 429s (the test can fail); with it, none reach the
    caller, none are even sent back by the server, and the upstream never sees more than 60
    in any minute. Takes a little over a minute: the 61st call must wait for the first.
    """
    plan = keys.plan("--rpm", str(RPM))

    bare = OpenAI(api_key=keys.key(plan), base_url=base_url, rate_limit=False, max_retries=0)
    outcomes = burst(bare, BURST, secrets.token_hex(4))
    refused = [e for e in outcomes if isinstance(e, openai.RateLimitError)]
    assert refused, "the server did not limit the burst: the test below would prove nothing"
    assert all(e.code == "rate_limit_exceeded" for e in refused)

    marker = secrets.token_hex(4)
    counting = Counting()
    client = OpenAI(api_key=keys.key(plan), base_url=base_url, rpm=RPM, transport=counting)
    started = time.monotonic()
    outcomes = burst(client, BURST, marker)
    assert [e for e in outcomes if e is not None] == []
    assert 429 not in counting.statuses and len(counting.statuses) == BURST
    assert time.monotonic() - started >= 59.0

    arrived = [t for t, body in arrivals(upstream) if marker in json.dumps(body)]
    assert len(arrived) == BURST
    arrived.sort()
    # No more than RPM in any minute: call k and call k + RPM arrive at least 60 s apart.
    closest = min(later - earlier for earlier, later in zip(arrived, arrived[RPM:], strict=False))
    print(f"closest {RPM + 1} calls spanned {closest:.3f}s")
    assert closest >= 60.0


def test_a_learned_token_limit_gives_back_what_an_answer_did_not_use(
    base_url: str, keys: Keys
) -> None:
    """A request that sets no ``max_tokens`` reserves 4,096 tokens (chatgate's default) and
    uses a few: its answer's headers said the reservation was spent until the reset, so the
    client, following them, believed 900 of 5,000 tokens were left for the next minute.
    Now a whole answer's headers are as its settlement leaves them, and the client books
    what the server reserves (it guessed 256, and let through requests the server refused)."""
    key = keys.key(keys.plan("--tpm", "5000"))
    counting = Counting()
    client = OpenAI(api_key=key, base_url=base_url, transport=counting, max_retries=0)
    limiter = client._client._transport.limiter  # type: ignore[attr-defined]
    for i in range(3):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"no max {i}"}]
        )
        assert limiter.state().tokens.limit == 5000
        # Another such request may go now (not after the reset: no wall clock is read here,
        # only the delay the limiter would book).
        permit = limiter.reserve(4100)
        limiter.cancel(permit)
        assert permit.delay == 0, permit
    assert counting.statuses == [200] * 3


def test_requests_waiting_on_an_estimate_go_when_the_real_usage_is_known(
    base_url: str, keys: Keys
) -> None:
    """Three threads, a 5,000 tokens-per-minute key, requests without ``max_tokens``: each is
    booked at 4,096 tokens (what chatgate reserves), so the second and third wait for the one
    before. Each uses a few tokens; when it settles, the ones waiting are booked again and go.
    Before, each waited a whole minute behind the one before it, whatever it had used."""
    key = keys.key(keys.plan("--tpm", "5000"))
    counting = Counting()
    client = OpenAI(api_key=key, base_url=base_url, tpm=5000, transport=counting, max_retries=0)

    def one(i: int) -> int:
        answer = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"estimate {i}"}]
        )
        assert answer.usage is not None
        return answer.usage.total_tokens

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one, i) for i in range(3)]
        # A minute each, were they not moved up: a failure here is a timeout, not a slow run.
        used = [f.result(timeout=45) for f in futures]
    assert counting.statuses == [200] * 3  # and the server refused none of them
    limiter = client._client._transport.limiter  # type: ignore[attr-defined]
    assert limiter.state().tokens.remaining == 5000 - sum(used)
