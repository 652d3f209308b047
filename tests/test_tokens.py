"""Offline token counting: exact ids, the model table, OpenAI's documented message overhead."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from chatgate import tokens

# OpenAI cookbook, "How to count tokens with tiktoken": these messages are 129 prompt tokens
# for gpt-3.5-turbo / gpt-4 (cl100k_base) and 124 for gpt-4o / gpt-4o-mini (o200k_base), as
# counted by the API itself.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# Same cookbook, "Counting tokens for chat completions with tool calls": 105 (cl100k), 101 (o200k).
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def test_known_token_ids() -> None:
    assert tokens.encode("hello world", "cl100k_base") == [15339, 1917]
    assert tokens.encode("hello world", "o200k_base") == [24912, 2375]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("GPT-3.5-Turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("llama-3-70b", tokens.DEFAULT_ENCODING),
        ("", tokens.DEFAULT_ENCODING),
    ],
)
def test_encoding_table(model: str, encoding: str) -> None:
    assert tokens.encoding_for_model(model) == encoding


def test_unknown_models_count_with_o200k() -> None:
    assert tokens.DEFAULT_ENCODING == "o200k_base"
    assert tokens.count_text("hello world", "some-local-model") == 2


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_message_overhead_matches_openai(model: str, expected: int) -> None:
    assert tokens.count_messages(COOKBOOK_MESSAGES, model) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_tools_overhead_matches_openai(model: str, expected: int) -> None:
    assert tokens.count_messages(WEATHER_MESSAGES, model, tools=WEATHER_TOOLS) == expected


def test_the_rule_piece_by_piece() -> None:
    hello = tokens.count_text("hello world", "gpt-4o")
    user = tokens.count_text("user", "gpt-4o")
    # 3 per message + its strings, 3 for the reply primer.
    assert tokens.count_messages([{"role": "user", "content": "hello world"}], "gpt-4o") == (
        3 + user + hello + 3
    )
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    bob = tokens.count_text("bob", "gpt-4o")
    assert tokens.count_messages(named, "gpt-4o") == 3 + user + bob + 1 + hello + 3
    assert tokens.count_messages([], "gpt-4o") == 3


@pytest.mark.parametrize("encoding", [tokens.O200K, tokens.CL100K])
def test_plain_messages_count_as_the_general_rule(encoding: str) -> None:
    """A {role, content} message of text takes a shortcut (its role's count kept); it must
    count as the general rule does. A key that adds no tokens sends a copy down that rule."""
    counter = tokens.BPECounter(encoding)
    texts = ["", "user", "assistant", "tööl", "a\ud800b", "Hello, world! " * 20, "日本語テキスト"]
    texts += [f"role{i}" for i in range(40)]  # more roles than are kept
    for role in texts:
        for content in ("", "Hi", "a\udfffz", "naïve café " * 5):
            plain = {"role": role, "content": content}
            general = {**plain, "pad": None}
            assert counter.count_messages([plain, plain]) == counter.count_messages(
                [general, general]
            ), (role, content)


def test_content_parts_tool_calls_and_nulls() -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello "},
                {"type": "text", "text": "world"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]

    def n(text: str) -> int:
        return tokens.count_text(text, "gpt-4o")

    # Text parts count their text; an image part its fixed floor.
    assert tokens.count_messages(parts, "gpt-4o") == (
        3 + n("user") + n("hello ") + n("world") + tokens.IMAGE_PART_TOKENS + 3
    )
    call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
    ]
    # Tool calls count their function name and arguments; a null content counts nothing.
    assert tokens.count_messages(call, "gpt-4o") == (
        3 + n("assistant") + n("get_weather") + n('{"city": "Paris"}') + 3
    )


def test_special_tokens_and_lone_surrogates_are_plain_text() -> None:
    # User text that looks like a special token must not become one (nor raise).
    assert tokens.count_text("<|endoftext|>", "gpt-4") > 1
    assert tokens.count_text("a\ud800b", "gpt-4o") >= 2
    assert tokens.count_text("", "gpt-4o") == 0


class FixedCounter:
    def count_text(self, text: str) -> int:
        return 1000 + len(text)

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        return 7 * len(messages)


def test_registered_counter_wins_and_can_be_removed() -> None:
    counter = FixedCounter()
    tokens.register_counter("gpt-4o-custom", counter)
    try:
        assert tokens.counter_for("gpt-4o-custom") is counter
        assert tokens.count_text("abc", "gpt-4o-custom") == 1003
        assert tokens.count_messages([{"role": "user", "content": "x"}], "gpt-4o-custom") == 7
        tokens.unregister_counter("gpt-4o-custom", FixedCounter())  # not the registered one
        assert tokens.counter_for("gpt-4o-custom") is counter
    finally:
        tokens.unregister_counter("gpt-4o-custom", counter)
    assert tokens.count_text("abc", "gpt-4o-custom") == tokens.count_text("abc", "gpt-4o")


def test_separate_registries_do_not_share_counters() -> None:
    mine = tokens.CounterRegistry()
    mine.register("m", FixedCounter())
    assert mine.counter_for("m").count_text("") == 1000
    assert tokens.counter_for("m").count_text("") == 0


def test_counting_is_fast() -> None:
    tokens.preload()
    text = "The quick brown fox jumps over the lazy dog. " * 230  # ~10 KB
    began = time.perf_counter()
    for _ in range(50):
        tokens.count_text(text, "gpt-4o")
    per_call = (time.perf_counter() - began) / 50
    assert per_call < 0.01  # measured ~0.2 ms; generous for a busy machine
    began = time.perf_counter()
    for _ in range(200):
        tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4")
    assert (time.perf_counter() - began) / 200 < 0.002  # measured ~25 µs


def test_loading_skips_the_pure_python_tables() -> None:
    # In a fresh process, so that nothing else imported bpe_openai's package before.
    code = (
        "import sys; from chatgate import tokens; tokens.preload(); "
        "print('bpe_openai.compat' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # bpe_openai/__init__ builds Python copies of the merge tables (~0.45 s, ~75 MB): skipped.
    assert out.stdout.strip() == "False"
