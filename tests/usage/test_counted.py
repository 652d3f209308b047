"""Usage chatgate counts itself (an upstream that reports none): the prompt is counted once a
request (the token reservation's count also meters it), and a client that asked for usage
gets it in the stream's last chunk even when the upstream ends without ``[DONE]``; never after
an error event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from chatgate import tokens
from tests.helpers import Upstream, served_app, stored_usage

MESSAGES = [{"role": "user", "content": "count me once"}]


@pytest.fixture
async def served(upstream: Upstream, tmp_path: Path) -> AsyncIterator[tuple[TestServer, str]]:
    """The app in process (SQLite) and a key on the free plan (it has token limits)."""
    broken = f"""
[[models]]
name = "gpt-break"
base_url = "{upstream.base_url}"
upstream_model = "break-stream"
"""
    async with served_app(tmp_path, upstream, extra_toml=broken) as served:
        yield served


async def _post(served: tuple[TestServer, str], body: dict[str, Any]) -> tuple[str, int]:
    server, key = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        text = await resp.text()
        assert resp.status == 200, text
        return text, int(resp.headers["x-ratelimit-remaining-tokens"])


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_prompt_is_counted_once(
    stream: bool, served: tuple[TestServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[Any] = []
    real = tokens.count_messages

    def spy(messages: Any, *args: Any, **kwargs: Any) -> int:
        counted.append(messages)
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(tokens, "count_messages", spy)
    body: dict[str, Any] = {"model": "gpt-no-usage", "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    text, remaining = await _post(served, body)
    assert len(counted) == 1, counted  # the reservation's count, kept for the meter
    prompt = real(MESSAGES, "no-usage")
    assert f'"prompt_tokens":{prompt},' in text.replace(" ", "")
    assert remaining < 40_000 - prompt  # the free plan's 40,000 a minute, reserved from


async def test_a_stream_without_done_gets_it_after_the_usage_asked_for(
    served: tuple[TestServer, str],
) -> None:
    """An upstream that ends a finished answer without ``[DONE]``: the client gets the usage
    it asked for, then the ``[DONE]`` it waits for (it got neither before the usage, then)."""
    body = {
        "model": "gpt-no-usage",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake": {"no_done": True},
    }
    text, _ = await _post(served, body)
    events = _events(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == [] and last["id"] == chunks[0]["id"], last
    assert [c for c in chunks[:-1] if c.get("usage")] == []
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert last["usage"]["prompt_tokens"] == tokens.count_messages(MESSAGES, "no-usage")
    assert last["usage"]["completion_tokens"] == tokens.count_text(streamed, "no-usage") > 0
    # Not asked for: no usage chunk.
    body.pop("stream_options")
    text, _ = await _post(served, body)
    events = _events(text)
    assert events[-1] == "[DONE]"
    assert all(not json.loads(e).get("usage") for e in events[:-1])


async def test_no_usage_chunk_after_an_error_event(served: tuple[TestServer, str]) -> None:
    body = {
        "model": "gpt-no-usage",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, _ = await _post(served, {**body, "model": "gpt-test", "fake": {"no_done": True}})
    *chunks, done = _events(text)
    assert done == "[DONE]"
    assert json.loads(chunks[-1])["usage"]["prompt_tokens"] > 0  # the upstream's own
    # The upstream cuts the connection after two chunks: the stream ends in an error event.
    text, _ = await _post(served, {**body, "model": "gpt-break"})
    events = _events(text)
    assert json.loads(events[-1]).get("error"), events
    assert not any(json.loads(e).get("usage") for e in events)


async def test_the_reservation_holds_the_output_budget_of_every_choice(
    served: tuple[TestServer, str],
) -> None:
    """``n`` choices may each write ``max_tokens``: the free plan's 40,000 tokens a minute hold
    40 choices of 1,000 but not 50, and 3 choices reserve 3,000 (read off a stream's headers,
    sent at admission: a whole answer's say what its settlement left)."""
    base = {"model": "gpt-test", "messages": MESSAGES, "max_tokens": 1_000}
    _, remaining = await _post(served, {**base, "n": 3, "stream": True})
    prompt = tokens.count_messages(MESSAGES, "fake-model")
    assert remaining <= 40_000 - prompt - 3_000 + 100  # 100: what refills meanwhile
    server, key = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            json={**base, "n": 50},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        assert resp.status == 429, await resp.text()
        assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "choices",
    [
        [{"message": {"content": "odd but fine", "tool_calls": ["not a call"]}}],
        [{"message": {"content": "odd but fine", "tool_calls": [{"function": "f"}]}}],
        [{"message": {"content": "odd but fine"}}, "not a choice"],
        # (choices that are not a list are no answer at all: a 502, see
        # tests/backends/test_resilience.py::test_a_200_that_is_not_an_answer_is_502)
    ],
)
async def test_a_whole_answer_of_an_odd_shape_is_relayed_and_counts_what_it_can(
    upstream: Upstream, tmp_path: Path, choices: Any
) -> None:
    """An upstream that reports no usage, with choices or tool calls that are not objects:
    its answer is relayed as it came (as a stream's odd chunk is), and its text is counted
    where there is some, never a 500 on the way."""
    from tests.backends.upstreams import stream_server

    odd = json.dumps({"id": "chatcmpl-odd", "object": "chat.completion", "choices": choices})
    raw = odd.encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    base_url, _ = await stream_server([[head + b"content-length: %d\r\n\r\n%s" % (len(raw), raw)]])
    toml = f'[[models]]\nname = "odd"\nbase_url = "{base_url}"\nupstream_model = "odd"\n'
    async with served_app(tmp_path, upstream, extra_toml=toml) as served:
        text, _ = await _post(served, {"model": "odd", "messages": MESSAGES})
    assert json.loads(text)["choices"] == choices
    records, _ = await stored_usage(tmp_path, "status", "completion_tokens")
    text_tokens = tokens.count_text("odd but fine", "odd")
    assert [tuple(r) for r in records] == [(200, text_tokens)]
