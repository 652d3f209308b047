"""Token counts an upstream reports are taken only when they are counts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from chatgate.backends.base import DONE_EVENT, MAX_REPORTED_TOKENS, Usage, reported_tokens
from chatgate.backends.sse import SSEPassThrough
from chatgate.settings import ModelConfig
from tests.backends.upstreams import Reads


@pytest.mark.parametrize("value", [0, 1, 4096, MAX_REPORTED_TOKENS])
def test_a_count_is_taken(value: int) -> None:
    assert reported_tokens(value) == value


@pytest.mark.parametrize(
    "value", [-1, -(2**40), MAX_REPORTED_TOKENS + 1, 2**40, True, False, 3.0, "12", None, [1]]
)
def test_what_is_not_a_count_is_refused(value: Any) -> None:
    assert reported_tokens(value) is None


def test_usage_with_any_count_refused_is_none_so_the_gateway_counts() -> None:
    assert Usage.from_openai({"prompt_tokens": 7, "completion_tokens": 3}) == Usage(7, 3)
    assert Usage.from_openai({"prompt_tokens": 2**40, "completion_tokens": 3}) is None
    assert Usage.from_openai({"prompt_tokens": 7, "completion_tokens": -3}) is None
    assert Usage.from_openai({"prompt_tokens": True, "completion_tokens": 3}) is None
    assert Usage.from_openai({"prompt_tokens": 7}) is None
    assert Usage.from_openai(None) is None
    # A total other than the sum: the client was shown it, the sum was billed (QA: 999).
    assert Usage.from_openai({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    for total in (999, 9, True, "10", None):
        wrong = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": total}
        assert Usage.from_openai(wrong) is None, total


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chunk(choices: list[Any], usage: Any = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": "fp",
        "choices": choices,
        "usage": usage,
    }


async def _relay(include_usage: bool, *events: bytes) -> tuple[list[bytes], SSEPassThrough]:
    stream = SSEPassThrough(
        Reads(b"".join(events)),  # type: ignore[arg-type]
        ModelConfig(name="m"),
        include_usage=include_usage,
    )
    return [event async for event in stream], stream


TEXT = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
NONSENSE = {"prompt_tokens": 2**40, "completion_tokens": -3, "total_tokens": 2**40 - 3}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_refused_usage_chunk_is_not_relayed(include_usage: bool) -> None:
    out, stream = await _relay(
        include_usage, _event(_chunk([TEXT])), _event(_chunk([], NONSENSE)), DONE_EVENT
    )
    assert out == [_event(_chunk([TEXT])), DONE_EVENT]
    assert stream.usage is None and stream.completion_text == "hi"


async def test_a_believed_usage_chunk_is_relayed_when_asked_for() -> None:
    good = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    events = (_event(_chunk([TEXT])), _event(_chunk([], good)), DONE_EVENT)
    out, stream = await _relay(True, *events)
    assert out == list(events) and stream.usage == Usage(5, 1)
    out, stream = await _relay(False, *events)
    assert out == [events[0], DONE_EVENT] and stream.usage == Usage(5, 1)


async def test_a_refused_usage_on_a_chunk_with_choices_is_shown_as_null() -> None:
    out, stream = await _relay(True, _event(_chunk([TEXT], NONSENSE)), DONE_EVENT)
    assert [orjson.loads(e[6:]) for e in out[:-1]] == [_chunk([TEXT])]
    assert stream.usage is None and stream.completion_text == "hi"


async def test_the_gateway_usage_chunk_repeats_the_stream_envelope() -> None:
    _, stream = await _relay(True, _event(_chunk([TEXT])), DONE_EVENT)
    event = stream.usage_event(Usage(4, 2))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:]) == _chunk(
        [], {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    )


def test_the_cached_and_reasoning_parts_are_read_when_they_are_counts_within_the_whole() -> None:
    """OpenAI reports the prompt's cached part and the completion's reasoning part in
    ``*_tokens_details``: kept when each is a count no larger than its whole, else 0 (the usage
    itself stays: its two counts are good)."""
    base = {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130}
    full = {
        **base,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 12},
    }
    assert Usage.from_openai(full) == Usage(100, 30, 64, 12)
    assert Usage.from_openai({**base, "prompt_tokens_details": None}) == Usage(100, 30)
    for bad in (101, -1, True, "64", 2**40, None):
        usage = Usage.from_openai({**base, "prompt_tokens_details": {"cached_tokens": bad}})
        assert usage == Usage(100, 30, 0, 0), bad
        usage = Usage.from_openai({**base, "completion_tokens_details": {"reasoning_tokens": bad}})
        assert usage == Usage(100, 30, 0, 0), bad
    for odd in ([64], "64", 64, {"cached": 64}):
        assert Usage.from_openai({**base, "prompt_tokens_details": odd}) == Usage(100, 30), odd
