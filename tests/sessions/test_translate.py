"""Responses <-> chat translation, checked against the official SDK's own types (validated
strictly with pydantic, so a missing or mistyped field fails here, not in a user's program)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from openai.types.conversations import ConversationItem
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from chatgate import errors
from chatgate.backends.base import Usage
from chatgate.sessions.response_stream import StreamTranslator
from chatgate.sessions.responses import (
    ResponsesRequest,
    chat_body,
    chat_message_to_items,
    content_logprobs,
    items_to_messages,
    normalize_input,
    normalize_items,
    output_items,
    response_object,
)

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
ITEM: TypeAdapter[Any] = TypeAdapter(ConversationItem)
REQ = ResponsesRequest(model="gpt-test", input="hi", instructions="be nice")


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_string_input_is_one_user_message() -> None:
    [item] = normalize_input("hello")
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    assert item["id"].startswith("msg_")
    ITEM.validate_python(item)
    assert items_to_messages([item]) == [{"role": "user", "content": "hello"}]


def test_items_become_chat_messages() -> None:
    items = normalize_items(
        [
            {"role": "developer", "content": "rules"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "https://x/y.png"},
                ],
            },
            {"role": "assistant", "content": "calling"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]
    )
    for item in items:
        ITEM.validate_python(item)
    assert items_to_messages(items) == [
        {"role": "system", "content": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "auto"}},
            ],
        },
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": "answer"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c9", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c9", "content": "done"},
    ],
)
def test_chat_messages_round_trip(message: dict[str, Any]) -> None:
    assert items_to_messages(chat_message_to_items(message)) == [message]


def test_unsupported_input_is_a_400_naming_the_field() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        normalize_input([{"role": "user", "content": "ok"}, {"type": "web_search_call"}])
    assert info.value.param == "input[1].type"
    with pytest.raises(errors.InvalidRequest) as info:
        normalize_input([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}])
    assert info.value.param == "input[0].content[0].type"
    with pytest.raises(errors.InvalidRequest) as info:
        chat_body(ResponsesRequest(model="m", tools=[{"type": "web_search"}]), [], "m")
    assert info.value.param == "tools[0].type"


def test_chat_body_translates_the_options() -> None:
    req = ResponsesRequest(
        model="m",
        max_output_tokens=50,
        temperature=0.5,
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
    )
    body = chat_body(req, [{"role": "user", "content": "x"}], "up")
    assert body["model"] == "up" and body["max_tokens"] == 50 and body["temperature"] == 0.5
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"]["json_schema"]["name"] == "s"


def test_chat_body_passes_on_reasoning_logprobs_and_the_shared_fields() -> None:
    """Fields a chat upstream takes under its own names reach it (they were dropped without a
    word: QA); logprobs only when ``include`` asks for them, as OpenAI returns them."""
    req = msgspec.convert(
        {
            "model": "m",
            "reasoning": {"effort": "low", "summary": "auto"},
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
            "service_tier": "flex",
            "prompt_cache_key": "pk",
            "safety_identifier": "si",
        },
        ResponsesRequest,
    )
    body = chat_body(req, [], "up")
    assert {k: v for k, v in body.items() if k not in ("model", "messages")} == {
        "reasoning_effort": "low",
        "logprobs": True,
        "top_logprobs": 2,
        "service_tier": "flex",
        "prompt_cache_key": "pk",
        "safety_identifier": "si",
    }
    assert "logprobs" not in chat_body(ResponsesRequest(model="m", top_logprobs=2), [], "up")
    answer = response_object(
        response_id="resp_1", created_at=1, req=req, model="m", truncation="auto"
    )
    assert answer["reasoning"] == {"effort": "low", "summary": "auto"}
    assert (answer["service_tier"], answer["top_logprobs"]) == ("flex", 2)
    Response.model_validate(answer)


def test_logprobs_and_the_usage_details_reach_the_response_whole_and_streamed() -> None:
    logprobs = [
        {"token": "hi", "logprob": -0.1, "bytes": [104, 105], "top_logprobs": []},
        {"token": "!", "logprob": -0.5, "bytes": [33], "top_logprobs": []},
    ]
    choice = {"message": {"role": "assistant", "content": "hi!"}, "logprobs": {"content": logprobs}}
    usage = Usage.from_openai(
        {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 1},
        }
    )
    assert usage is not None
    whole = response_object(
        response_id="resp_1",
        created_at=1,
        req=REQ,
        model="m",
        truncation="auto",
        output=output_items(choice["message"], logprobs=content_logprobs(choice)),
        usage=usage,
    )
    parsed = Response.model_validate(whole)
    assert [p.token for p in parsed.output[0].content[0].logprobs] == ["hi", "!"]
    assert parsed.usage.input_tokens_details.cached_tokens == 8
    assert parsed.usage.output_tokens_details.reasoning_tokens == 1

    tr = StreamTranslator(whole | {"output": [], "usage": None})
    events = tr.start()
    for piece, probs in (("hi", logprobs[:1]), ("!", logprobs[1:])):
        events += tr.feed(
            {"choices": [{"index": 0, "delta": {"content": piece}, "logprobs": {"content": probs}}]}
        )
    events += tr.close()
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"] for d in deltas] == [logprobs[:1], logprobs[1:]]
    assert tr.output[0]["content"][0]["logprobs"] == logprobs


def test_tool_options_without_tools_are_not_sent_to_the_chat_upstream() -> None:
    """OpenAI's chat completions refuse parallel_tool_calls or tool_choice without tools (400
    'only allowed when tools are specified'); the Responses API takes them, as SDKs send them."""
    req = ResponsesRequest(model="m", parallel_tool_calls=False, tool_choice="auto")
    body = chat_body(req, [{"role": "user", "content": "x"}], "up")
    assert "parallel_tool_calls" not in body and "tool_choice" not in body
    assert chat_body(ResponsesRequest(model="m", tools=[], tool_choice="none"), [], "up") == {
        "model": "up",
        "messages": [],
    }
    # With tools they go along; a choice that needs a tool still goes, to be refused upstream.
    tools = [{"type": "function", "name": "f"}]
    body = chat_body(
        ResponsesRequest(model="m", tools=tools, parallel_tool_calls=False, tool_choice="none"),
        [],
        "up",
    )
    assert body["parallel_tool_calls"] is False and body["tool_choice"] == "none"
    body = chat_body(ResponsesRequest(model="m", tool_choice="required"), [], "up")
    assert body["tool_choice"] == "required"


def test_response_object_is_a_valid_sdk_response() -> None:
    output = output_items({"role": "assistant", "content": "hello there"})
    body = response_object(
        response_id="resp_1",
        created_at=1,
        req=REQ,
        model="gpt-test",
        truncation="auto",
        output=output,
        usage=Usage(10, 3),
    )
    response = Response.model_validate(body, strict=False)
    assert response.output_text == "hello there"
    assert response.usage is not None and response.usage.total_tokens == 13
    calls = output_items(
        {"content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}
    )
    assert [c["type"] for c in calls] == ["function_call"]
    Response.model_validate({**body, "output": calls})


def test_stream_events_are_valid_sdk_events_in_order() -> None:
    base = response_object(
        response_id="resp_1",
        created_at=1,
        req=REQ,
        model="gpt-test",
        truncation="auto",
        status="in_progress",
    )
    tr = StreamTranslator(base)
    events = tr.start()
    for piece in ("Hel", "lo"):
        events += tr.feed(chunk({"content": piece}))
    events += tr.feed(chunk({}, "stop"))
    events += tr.feed({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    events += tr.close()
    final = response_object(
        response_id="resp_1",
        created_at=1,
        req=REQ,
        model="gpt-test",
        truncation="auto",
        output=tr.output,
        usage=tr.usage,
    )
    events.append(tr.completed(final))
    parsed = [EVENTS.validate_python(e) for e in events]
    assert [e.type for e in parsed] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert parsed[6].text == "Hello"
    assert parsed[-1].response.output_text == "Hello"
    assert parsed[-1].response.usage.input_tokens == 5
    assert parsed[2].item.content == []  # the item as it was when added


def test_an_item_the_upstream_broke_off_is_incomplete() -> None:
    """A stream broken after some text ends in response.failed; the item it was writing is
    closed as incomplete (in its done event and in the failed response), not completed."""
    tr = StreamTranslator(
        response_object(response_id="r", created_at=1, req=REQ, model="m", truncation="auto")
    )
    events = tr.start()
    events += tr.feed(chunk({"content": "Hal"}))
    events += tr.feed({"error": {"message": "broke off", "code": "upstream_error"}})
    events += tr.close()
    failed = response_object(
        response_id="r",
        created_at=1,
        req=REQ,
        model="m",
        truncation="auto",
        status="failed",
        output=tr.output,
        error={"code": "server_error", "message": "broke off"},
    )
    events.append(tr.failed(failed))
    parsed = [EVENTS.validate_python(e) for e in events]
    assert [e.type for e in parsed][-2:] == ["response.output_item.done", "response.failed"]
    assert parsed[-2].item.status == "incomplete"  # type: ignore[union-attr]
    assert [item.status for item in parsed[-1].response.output] == ["incomplete"]  # type: ignore[union-attr]


def test_a_streamed_refusal_is_a_refusal_part() -> None:
    """A refusal streamed in ``delta.refusal`` comes out as OpenAI streams one (refusal events,
    a refusal part), as a whole answer's does: not as output_text, which a client would take
    for the answer (and parse as the JSON its text.format asked for)."""
    tr = StreamTranslator(
        response_object(response_id="r", created_at=1, req=REQ, model="m", truncation="auto")
    )
    events = tr.start()
    events += tr.feed(chunk({"role": "assistant", "content": None, "refusal": ""}))
    for piece in ("I can't ", "help."):
        events += tr.feed(chunk({"refusal": piece}))
    events += tr.feed(chunk({}, "stop"))
    events += tr.close()
    final = response_object(
        response_id="r", created_at=1, req=REQ, model="m", truncation="auto", output=tr.output
    )
    events.append(tr.completed(final))
    parsed = [EVENTS.validate_python(e) for e in events]
    assert [e.type for e in parsed][2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert parsed[6].refusal == "I can't help."  # type: ignore[union-attr]
    whole = output_items({"role": "assistant", "content": None, "refusal": "I can't help."})
    assert tr.output[0]["content"] == whole[0]["content"]
    assert parsed[-1].response.output_text == ""  # type: ignore[union-attr]


def test_stream_tool_calls_and_length_limit() -> None:
    tr = StreamTranslator(
        response_object(response_id="r", created_at=1, req=REQ, model="m", truncation="auto")
    )
    events = tr.start()
    events += tr.feed(
        chunk(
            {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}
        )
    )
    events += tr.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}))
    events += tr.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}))
    events += tr.feed(chunk({}, "length"))
    events += tr.close()
    parsed = [EVENTS.validate_python(e) for e in events]
    kinds = [e.type for e in parsed]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert parsed[-2].arguments == '{"a":1}'
    assert tr.output[0]["status"] == "incomplete"


def test_empty_answer_still_has_a_message() -> None:
    tr = StreamTranslator(
        response_object(response_id="r", created_at=1, req=REQ, model="m", truncation="auto")
    )
    tr.start()
    tr.feed(chunk({}, "stop"))
    events = [EVENTS.validate_python(e) for e in tr.close()]
    assert [e.type for e in events] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]


def test_stream_tool_calls_without_index_are_told_apart() -> None:
    """Servers that send each tool call whole in one delta, without ``index`` (some Ollama and
    llama.cpp versions): each call with a new ``id`` is a call of its own, a delta without an
    ``id`` continues the last. They were merged into one call, names and arguments joined."""
    tr = StreamTranslator(
        response_object(response_id="r", created_at=1, req=REQ, model="m", truncation="auto")
    )
    tr.start()
    weather = {"id": "c1", "function": {"name": "weather", "arguments": '{"city":'}}
    tr.feed(chunk({"tool_calls": [weather]}))
    tr.feed(chunk({"tool_calls": [{"function": {"arguments": '"Paris"}'}}]}))
    both = [
        {"id": "c2", "function": {"name": "time", "arguments": "{}"}},
        {"id": "c3", "function": "not an object", "index": "x"},
        "not a call",
    ]
    tr.feed(chunk({"tool_calls": both}))
    tr.feed({"choices": [{"index": 0, "delta": "not an object"}, 7]})
    tr.feed({"choices": 7})
    tr.feed(chunk({}, "tool_calls"))
    tr.close()
    calls = [(o["call_id"], o["name"], o["arguments"]) for o in tr.output]
    assert calls == [("c1", "weather", '{"city":"Paris"}'), ("c2", "time", "{}"), ("c3", "", "")]
