"""Sessions end to end: a real ``chatgate serve`` (SQLite and PostgreSQL) called with the official
``openai`` package, unmodified. What the model was really sent is read back from the fake
upstream (``GET /_requests``)."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from chatgate import tokens
from chatgate.settings import async_database_url
from tests.helpers import Gateway, Upstream, make_gateway
from tests.sessions.conftest import SMALL_WINDOW


def new_key(
    gw: Gateway, email: str | None = None, models: str | None = None, limits: tuple[str, ...] = ()
) -> str:
    if email is None:
        email = f"s-{secrets.token_hex(4)}@example.com"
        gw.cli("accounts", "create", email, "--plan", "enterprise")
    extra = ["--models", models] if models else []
    return str(gw.cli_json("keys", "create", "--account", email, *extra, *limits)["key"])


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def sent(upstream: Upstream) -> dict[str, Any]:
    """The last chat request the upstream received."""
    bodies = [b for b in upstream.received() if "messages" in b]
    return bodies[-1]


@pytest.fixture
def alice(sgw: Gateway) -> openai.OpenAI:
    return client(sgw, new_key(sgw))


def test_previous_response_id_carries_the_first_turn(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    first = alice.responses.create(
        model="gpt-test", input="My name is Ada.", instructions="Answer briefly."
    )
    assert first.status == "completed" and first.object == "response"
    assert "My name is Ada." in first.output_text
    assert first.usage is not None and first.usage.input_tokens > 0

    second = alice.responses.create(
        model="gpt-test", input="What is my name?", previous_response_id=first.id
    )
    body = sent(upstream)
    assert body["model"] == "fake-model"
    # As OpenAI: the previous turn is carried, its instructions are not.
    assert body["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the history is prompt

    again = alice.responses.retrieve(second.id)
    assert again.id == second.id and again.output_text == second.output_text
    inputs = list(alice.responses.input_items.list(second.id))
    assert [i.type for i in inputs] == ["message"]

    alice.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(second.id)
    with pytest.raises(openai.BadRequestError) as info:  # as OpenAI: 400, not 404
        alice.responses.create(model="gpt-test", input="x", previous_response_id=second.id)
    assert info.value.code == "previous_response_not_found"
    assert info.value.param == "previous_response_id"


def test_store_false_is_not_kept(alice: openai.OpenAI) -> None:
    response = alice.responses.create(model="gpt-test", input="forget me", store=False)
    assert response.output_text
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(response.id)


def test_conversation_turns_through_responses_and_chat(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    conv = alice.conversations.create(metadata={"app": "tests"})
    assert conv.object == "conversation" and conv.metadata == {"app": "tests"}
    assert alice.conversations.retrieve(conv.id).id == conv.id

    r1 = alice.responses.create(model="gpt-test", input="first turn", conversation=conv.id)
    assert r1.conversation is not None and r1.conversation.id == conv.id
    assert sent(upstream)["messages"] == [{"role": "user", "content": "first turn"}]

    chat = alice.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": "second turn"},
        ],
        extra_body={"conversation": conv.id},
    )
    answer2 = chat.choices[0].message.content
    assert sent(upstream)["messages"] == [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "second turn"},
    ]

    stream = alice.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "third turn"}],
        stream=True,
        extra_body={"conversation": conv.id},
    )
    answer3 = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert sent(upstream)["messages"][-2:] == [
        {"role": "assistant", "content": answer2},
        {"role": "user", "content": "third turn"},
    ]

    alice.responses.create(model="gpt-test", input="fourth turn", conversation={"id": conv.id})
    assert sent(upstream)["messages"][-3:] == [
        {"role": "user", "content": "third turn"},
        {"role": "assistant", "content": answer3},
        {"role": "user", "content": "fourth turn"},
    ]

    items = list(alice.conversations.items.list(conv.id, order="asc"))
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "user"),
        ("message", "assistant"),
    ] * 4  # the system message of the chat request is not stored
    newest = alice.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest.data] == [items[-1].id, items[-2].id] and newest.has_more
    one = alice.conversations.items.retrieve(items[0].id, conversation_id=conv.id)
    assert one.id == items[0].id

    added = alice.conversations.items.create(
        conv.id, items=[{"role": "user", "content": "an added note"}]
    )
    assert added.data[0].type == "message"
    alice.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    assert len(list(alice.conversations.items.list(conv.id))) == 8

    deleted = alice.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        alice.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        alice.conversations.items.list(conv.id)
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": conv.id},
        )


def test_a_chat_stream_ended_without_done_is_stored(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    """Some servers end a stream without ``data: [DONE]``; its turn is stored all the same."""
    conv = alice.conversations.create()
    stream = alice.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "first turn"}],
        stream=True,
        extra_body={"conversation": conv.id, "fake": {"no_done": True}},
    )
    answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "first" in answer
    items = list(alice.conversations.items.list(conv.id, order="asc"))
    assert [getattr(i, "role", None) for i in items] == ["user", "assistant"]

    alice.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "second turn"}],
        extra_body={"conversation": conv.id},
    )
    assert sent(upstream)["messages"] == [
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "second turn"},
    ]


@pytest.mark.parametrize("system_only", [False, True])
def test_a_chat_stream_with_an_event_after_done_stores_one_turn(
    alice: openai.OpenAI, upstream: Upstream, system_only: bool
) -> None:
    """An upstream that sends an event after ``[DONE]`` (some do): the relay gave a second
    ``[DONE]`` of its own at the end, and the turn was stored at each, twice (a request of a
    system message alone had its answer twice in the conversation; with a user message, the
    second store failed on a unique item id, with a traceback in the log)."""
    conv = alice.conversations.create()
    message = (
        {"role": "system", "content": "sysonly"}
        if system_only
        else {
            "role": "user",
            "content": "once only",
        }
    )
    stream = alice.chat.completions.create(
        model="gpt-test",
        messages=[message],  # type: ignore[list-item]
        stream=True,
        extra_body={"conversation": conv.id, "fake": {"after_done": True}},
    )
    answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    items = list(alice.conversations.items.list(conv.id, order="asc"))
    roles = [getattr(i, "role", None) for i in items]
    assert roles == (["assistant"] if system_only else ["user", "assistant"])
    assert items[-1].content[0].text == answer  # type: ignore[union-attr]


WEATHER_CHAT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_tool_call_is_stored_as_the_call_alone(
    alice: openai.OpenAI, upstream: Upstream, stream: bool
) -> None:
    """A streamed answer that is a tool call was stored with an empty assistant message
    before its function_call item (and replayed so); a whole one, as the call alone."""
    conv = alice.conversations.create()
    made = alice.chat.completions.create(
        model="gpt-tools",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_CHAT],  # type: ignore[list-item]
        stream=stream,
        extra_body={"conversation": conv.id},
    )
    if stream:
        list(made)  # type: ignore[call-overload]
    items = list(alice.conversations.items.list(conv.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call"]
    assert getattr(items[0], "role", None) == "user"
    assert items[1].name == "get_weather"  # type: ignore[union-attr]


def test_a_chat_part_a_conversation_cannot_store_is_a_400(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    """Audio or a file in a chat turn would be stored as an empty message, which every later
    turn would then send upstream: it is refused, naming the part, and nothing is stored."""
    conv = alice.conversations.create()
    upstream.clear()
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as info:
        alice.chat.completions.create(
            model="gpt-test",
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "hear this"}, audio]}  # type: ignore[list-item]
            ],
            extra_body={"conversation": conv.id},
        )
    assert info.value.status_code == 400
    assert info.value.param == "messages[0].content[1].type"
    assert "input_audio" in info.value.message
    assert not [b for b in upstream.received() if "messages" in b]
    assert list(alice.conversations.items.list(conv.id)) == []


def test_streaming_responses(alice: openai.OpenAI, upstream: Upstream) -> None:
    events = list(alice.responses.create(model="gpt-test", input="stream this", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and "stream" in text
    assert final.usage is not None and final.usage.output_tokens == 20

    # Stored before response.completed was sent: the next turn finds it at once.
    alice.responses.create(model="gpt-test", input="next", previous_response_id=final.id)
    assert sent(upstream)["messages"][1] == {"role": "assistant", "content": text}

    # The SDK's streaming helper accumulates the same events into the final response.
    conv = alice.conversations.create()
    with alice.responses.stream(
        model="gpt-test", input="helper stream", conversation=conv.id
    ) as stream:
        helper_final = stream.get_final_response()
    assert "helper" in helper_final.output_text
    assert len(list(alice.conversations.items.list(conv.id))) == 2


def test_a_broken_stream_is_stored_as_failed(alice: openai.OpenAI, upstream: Upstream) -> None:
    """A stream the upstream broke ended in response.failed, but the response its
    response.created announced was not kept: retrieving it was a 404, and so was continuing
    from it."""
    events = list(alice.responses.create(model="gpt-break", input="break here", stream=True))
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    partial = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert partial  # the upstream wrote two chunks before it broke

    kept = alice.responses.retrieve(failed.id)
    assert kept.status == "failed" and kept.error is not None
    assert kept.error.code == "server_error" and kept.output_text == partial

    alice.responses.create(model="gpt-test", input="again", previous_response_id=failed.id)
    assert sent(upstream)["messages"][:2] == [
        {"role": "user", "content": "break here"},
        {"role": "assistant", "content": partial},
    ]


def test_a_broken_response_turn_adds_nothing_to_its_conversation(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    """A Responses turn the upstream broke off added its input and half an answer (status
    ``incomplete``) to the conversation, which later turns then showed the model as its own
    words; a broken chat turn stores nothing. Now both: the conversation is as before, and
    the failed response is still kept on its own, with what it wrote."""
    conv = alice.conversations.create(items=[{"role": "user", "content": "before"}])
    events = list(
        alice.responses.create(
            model="gpt-break", input="break here", conversation=conv.id, stream=True
        )
    )
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    items = list(alice.conversations.items.list(conv.id, order="asc"))
    assert [getattr(i, "role", None) for i in items] == ["user"]
    assert alice.responses.retrieve(failed.id).status == "failed"
    alice.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "next"}],
        extra_body={"conversation": conv.id},
    )
    assert sent(upstream)["messages"] == [
        {"role": "user", "content": "before"},
        {"role": "user", "content": "next"},
    ]


def test_trimming_keeps_system_and_newest_turns_within_the_window(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    conv = alice.conversations.create()
    turns = []
    for i in range(12):
        turns.append({"role": "user", "content": f"question {i} " + "lorem ipsum " * 12})
        turns.append({"role": "assistant", "content": f"answer {i} " + "dolor sit " * 12})
    for start in range(0, len(turns), 20):
        alice.conversations.items.create(conv.id, items=turns[start : start + 20])  # type: ignore[arg-type]

    system = {"role": "system", "content": "You are the system prompt and must survive."}
    new = {"role": "user", "content": "the newest question"}
    alice.chat.completions.create(
        model="gpt-small",
        messages=[system, new],  # type: ignore[list-item]
        max_tokens=50,
        extra_body={"conversation": conv.id},
    )
    messages = sent(upstream)["messages"]
    assert messages[0] == system and messages[-1] == new
    assert tokens.count_messages(messages, "fake-model") <= SMALL_WINDOW - 50
    kept = messages[1:-1]
    assert kept and kept == turns[len(turns) - len(kept) :]  # the newest, whole turns
    assert kept[0]["role"] == "user" and len(kept) < len(turns)

    # Responses: instructions survive as the system message; truncation=disabled refuses.
    alice.responses.create(
        model="gpt-small",
        input="newest via responses",
        instructions="Instructions survive.",
        conversation=conv.id,
        max_output_tokens=50,
    )
    messages = sent(upstream)["messages"]
    assert messages[0] == {"role": "system", "content": "Instructions survive."}
    assert tokens.count_messages(messages, "fake-model") <= SMALL_WINDOW - 50
    with pytest.raises(openai.BadRequestError) as info:
        alice.responses.create(
            model="gpt-small", input="x", conversation=conv.id, truncation="disabled"
        )
    assert info.value.code == "context_length_exceeded"


def test_a_context_too_long_names_the_field_the_request_used(
    alice: openai.OpenAI, upstream: Upstream
) -> None:
    """The 400 context_length_exceeded names the request's own field (``input`` in the
    Responses API). An output limit beyond the window is no 400 of the conversation's: the
    request goes as it would without one (the upstream or the local model decides), the
    history trimmed as for the default output."""
    conv = alice.conversations.create()
    long = [{"role": "user", "content": "lorem ipsum " * 300}]  # more than the window
    alice.conversations.items.create(conv.id, items=long)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        alice.responses.create(
            model="gpt-small", input="x", conversation=conv.id, truncation="disabled"
        )
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "input"
    alice.responses.create(
        model="gpt-small", input="x", conversation=conv.id, max_output_tokens=1000
    )
    assert sent(upstream)["messages"] == [{"role": "user", "content": "x"}]
    assert sent(upstream)["max_tokens"] == 1000
    # Each turn is stored: what is sent is the newest that fit, never the long one.
    for field in ("max_completion_tokens", "max_tokens"):
        alice.chat.completions.create(
            model="gpt-small",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": conv.id},
            **{field: 1000},
        )
        messages = sent(upstream)["messages"]
        assert long[0] not in messages and messages[-1] == {"role": "user", "content": "x"}
        assert sent(upstream)[field] == 1000


def test_other_accounts_get_404(sgw: Gateway, alice: openai.OpenAI) -> None:
    bob = client(sgw, new_key(sgw))
    conv = alice.conversations.create(items=[{"role": "user", "content": "private"}])
    item_id = next(iter(alice.conversations.items.list(conv.id))).id
    resp = alice.responses.create(model="gpt-test", input="private too")
    attempts = [
        lambda: bob.conversations.retrieve(conv.id),
        lambda: bob.conversations.update(conv.id, metadata={"x": "y"}),
        lambda: bob.conversations.items.list(conv.id),
        lambda: bob.conversations.items.retrieve(item_id, conversation_id=conv.id),
        lambda: bob.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
        lambda: bob.conversations.items.delete(item_id, conversation_id=conv.id),
        lambda: bob.conversations.delete(conv.id),
        lambda: bob.responses.retrieve(resp.id),
        lambda: bob.responses.delete(resp.id),
        lambda: bob.responses.input_items.list(resp.id),
        lambda: bob.responses.create(model="gpt-test", input="x", conversation=conv.id),
        lambda: bob.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": conv.id},
        ),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as info:
            attempt()
        assert info.value.status_code == 404
    # A new turn names the field its id came in (not the path's conversation_id).
    assert info.value.param == "conversation"
    with pytest.raises(openai.BadRequestError) as continued:  # what a missing one gets
        bob.responses.create(model="gpt-test", input="x", previous_response_id=resp.id)
    assert continued.value.code == "previous_response_not_found"
    # Nothing of Alice's changed.
    assert alice.conversations.retrieve(conv.id).id == conv.id
    assert [i.id for i in alice.conversations.items.list(conv.id)] == [item_id]
    assert alice.responses.retrieve(resp.id).id == resp.id


def test_a_conversation_cannot_reach_a_model_the_key_may_not_use(
    sgw: Gateway, upstream: Upstream
) -> None:
    email = f"r-{secrets.token_hex(4)}@example.com"
    sgw.cli("accounts", "create", email, "--plan", "enterprise")
    full = client(sgw, new_key(sgw, email))
    limited = client(sgw, new_key(sgw, email, models="gpt-test"))
    conv = full.conversations.create()
    other = full.responses.create(
        model="gpt-other", input="made with the other model", conversation=conv.id
    )
    assert sent(upstream)["model"] == "other-model"

    with pytest.raises(openai.NotFoundError):
        limited.responses.create(model="gpt-other", input="x", conversation=conv.id)
    with pytest.raises(openai.NotFoundError):
        limited.chat.completions.create(
            model="gpt-other",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": conv.id},
        )
    # The same account's conversation and responses are usable, with the key's own model only.
    limited.responses.create(model="gpt-test", input="y", conversation=conv.id)
    assert sent(upstream)["model"] == "fake-model"
    limited.responses.create(model="gpt-test", input="z", previous_response_id=other.id)
    assert sent(upstream)["model"] == "fake-model"


def stored_usage(
    gw: Gateway,
    database_url: str,
    conversation_ids: list[str],
    count: int,
    endpoints: tuple[str, ...] = ("chat.completions", "responses"),
) -> list[Any]:
    """The usage records (status, error_code, conversation_id, prompt_tokens) of requests
    made in these conversations to ``endpoints`` (the model's, by default: the writes to the
    conversations make records too), oldest first, once ``count`` have been written (or 10 s)."""

    async def read() -> list[Any]:
        url = database_url or f"sqlite:///{gw.workdir / 'data' / 'chatgate.db'}"
        engine = create_async_engine(async_database_url(url))
        try:
            async with engine.connect() as conn:
                query = sa.text(
                    "SELECT status, error_code, conversation_id, prompt_tokens FROM usage_records"
                    " WHERE conversation_id IN :c AND endpoint IN :e ORDER BY created_at"
                ).bindparams(sa.bindparam("c", expanding=True), sa.bindparam("e", expanding=True))
                return list(await conn.execute(query, {"c": conversation_ids, "e": endpoints}))
        finally:
            await engine.dispose()

    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while time.monotonic() < deadline and len(rows) < count:
        rows = asyncio.run(read())
        time.sleep(0.2)
    return rows


def test_usage_is_recorded_with_the_conversation(
    sgw: Gateway, alice: openai.OpenAI, database_url: str
) -> None:
    conv = alice.conversations.create()
    for text in ("one", "two"):
        alice.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": text}],
            extra_body={"conversation": conv.id},
        )

    rows = stored_usage(sgw, database_url, [conv.id], 2)
    if not rows:
        pytest.skip("the usage recorder is not wired into the server yet")
    assert len(rows) == 2
    # The second turn's prompt includes the first turn.
    assert rows[1].prompt_tokens > rows[0].prompt_tokens


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_function_calling_round_trip(
    alice: openai.OpenAI, upstream: Upstream, stream: bool
) -> None:
    if stream:
        with alice.responses.stream(
            model="gpt-tools",
            input="Weather in Paris?",
            tools=[WEATHER],  # type: ignore[list-item]
        ) as events:
            first = events.get_final_response()
    else:
        first = alice.responses.create(
            model="gpt-tools",
            input="Weather in Paris?",
            tools=[WEATHER],  # type: ignore[list-item]
        )
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert sent(upstream)["tools"][0]["function"]["name"] == "get_weather"

    second = alice.responses.create(
        model="gpt-tools",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    messages = sent(upstream)["messages"]
    assert messages[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": call.arguments},
            }
        ],
    }
    assert messages[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    assert "sunny" in second.output_text


def test_a_conversation_deleted_during_a_response_turn_still_answers(
    sgw: Gateway, alice: openai.OpenAI, upstream: Upstream, database_url: str
) -> None:
    """The conversation is deleted while the model answers (gpt-slow takes 5 s). Whole, the
    answer was a 404 naming ``conversation_id`` and billed; streamed, response.failed "could
    not be stored" with a traceback in the log, and the id response.created announced was a
    404. Now, as on chat completions: the answer the client paid for, recorded as a 200, and
    the response kept (its input items too), as a deletion just after the turn leaves it."""
    marker = f"deleted-mid-turn-{secrets.token_hex(4)}"
    convs = {stream: alice.conversations.create().id for stream in (False, True)}
    answers: dict[bool, Any] = {}

    def turn(stream: bool) -> None:
        try:
            made = alice.responses.create(
                model="gpt-slow",
                input=f"{marker} {stream}",
                conversation=convs[stream],
                stream=stream,
            )
            answers[stream] = list(made) if stream else made  # type: ignore[call-overload]
        except openai.APIError as exc:  # the main thread says what came instead
            answers[stream] = exc

    threads = [threading.Thread(target=turn, args=(stream,)) for stream in convs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(marker in str(b) for b in upstream.received()) < 2:  # both are with the model
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for conv in convs.values():
        assert alice.conversations.delete(conv).deleted
    for thread in threads:
        thread.join(60)

    whole, events = answers[False], answers[True]
    assert not isinstance(whole, openai.APIError), whole
    assert whole.status == "completed" and marker in whole.output_text
    assert events[-1].type == "response.completed", events[-1]
    streamed = events[-1].response
    assert marker in streamed.output_text
    for response in (whole, streamed):
        kept = alice.responses.retrieve(response.id)
        assert kept.status == "completed" and kept.output_text == response.output_text
        [given] = list(alice.responses.input_items.list(response.id))
        assert marker in given.content[0].text  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError) as info:  # its history went with it
            alice.responses.create(model="gpt-test", input="x", previous_response_id=response.id)
        assert info.value.code == "previous_response_not_found"
    rows = stored_usage(sgw, database_url, list(convs.values()), 2)
    assert sorted((r.status, r.error_code) for r in rows) == [(200, None), (200, None)]
    assert all(r.prompt_tokens > 0 for r in rows)
    log = sgw.logs()
    for response in (whole, streamed):
        assert f"could not store response {response.id}" not in log
    for conv in convs.values():
        assert f"conversation {conv} was deleted during a turn" in log


def run_sql(gw: Gateway, database_url: str, *statements: str) -> None:
    """``statements`` on the gateway's own database, from outside it."""

    async def run() -> None:
        engine = create_async_engine(async_database_url(database_url))
        try:
            async with engine.begin() as conn:
                for statement in statements:
                    await conn.exec_driver_sql(statement)
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_a_turn_the_database_cannot_store_answers_as_failed(
    sgw: Gateway, alice: openai.OpenAI, database_url: str
) -> None:
    """The database refuses the stored response (a trigger: a real error of the real
    database). Whole, that was a 500 after the answer had been paid for; streamed, it was
    already a response.failed with the output. Now both answer the same: the output the
    model wrote, status failed, "could not be stored", and no id that a later turn could
    name."""
    marker = f"unstorable{secrets.token_hex(4)}"
    if database_url.startswith("postgresql"):
        create = [
            f"CREATE FUNCTION {marker}() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            f"CREATE TRIGGER {marker} BEFORE INSERT ON session_responses FOR EACH ROW"
            f" WHEN (NEW.body::text LIKE '%{marker}%') EXECUTE FUNCTION {marker}()",
        ]
        drop = [f"DROP TRIGGER {marker} ON session_responses", f"DROP FUNCTION {marker}()"]
    else:
        create = [
            f"CREATE TRIGGER {marker} BEFORE INSERT ON session_responses"
            f" WHEN NEW.body LIKE '%{marker}%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ]
        drop = [f"DROP TRIGGER {marker}"]
    run_sql(sgw, database_url, *create)
    try:
        whole = alice.responses.create(model="gpt-test", input="hi", metadata={"tag": marker})
        events = list(
            alice.responses.create(
                model="gpt-test", input="hi", metadata={"tag": marker}, stream=True
            )
        )
    finally:
        run_sql(sgw, database_url, *drop)
    assert events[-1].type == "response.failed", events[-1]
    for response in (whole, events[-1].response):
        assert response.status == "failed" and response.output_text
        assert response.error is not None and response.error.code == "server_error"
        assert response.error.message == "The response could not be stored."
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(response.id)
        assert f"could not store response {response.id}" in sgw.logs()


def test_conversation_writes_are_recorded_and_seed_the_daily_limit_after_a_restart(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Conversation writes counted against rpd but made no usage record: not shown in the
    usage, and after a restart the in-process day limit was seeded without them (a key of
    --rpd 3 made two writes, restarted, then two more). Now each write is recorded, admitted,
    as a chat request is."""
    gw = make_gateway(tmp_path, upstream=upstream).start()
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {new_key(gw, limits=('--rpd', '3'))}"
        base = gw.url + "/v1/conversations"
        made = http.post(base, json={})
        assert made.status_code == 200
        conv = made.json()["id"]
        added = http.post(
            f"{base}/{conv}/items", json={"items": [{"role": "user", "content": "y"}]}
        )
        assert added.status_code == 200
        rows = stored_usage(gw, "", [conv], 2, ("conversations",))
        assert [(r.status, r.error_code) for r in rows] == [(200, None)] * 2
        gw.stop()
        base = gw.start().url + "/v1/conversations"  # on a new port
        kept = http.post(f"{base}/{conv}", json={"metadata": {"k": "v"}})
        assert kept.status_code == 200, kept.text
        refused = http.post(f"{base}/{conv}", json={"metadata": {"k": "w"}})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == (
            "rate_limit_exceeded"
        )
    finally:
        gw.stop()


def test_a_long_metadata_key_names_its_param(alice: openai.OpenAI) -> None:
    """A key over 64 characters was param null, in msgspec's words ("at `key` in
    `$.metadata`"); a value over 512 already named ``metadata[...]``."""
    long_key = {"k" * 65: "v"}
    calls = [
        lambda: alice.conversations.create(metadata=long_key),
        lambda: alice.responses.create(model="gpt-test", input="x", metadata=long_key),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == "metadata" and info.value.code == "invalid_value"
        assert info.value.body["message"] == (  # type: ignore[index]
            "Invalid key in 'metadata': Expected `str` of length <= 64."
        )
    with pytest.raises(openai.BadRequestError) as value:
        alice.conversations.create(metadata={"k": "v" * 513})
    assert value.value.param == "metadata[...]"


def test_conversation_writes_count_against_the_request_rate(sgw: Gateway) -> None:
    """A key with --rpm 2 made six conversations of 20 items in a row: session writes were not
    limited at all. Now creating, updating and adding items each count as a request (a read
    or a deletion does not, nor a body refused as invalid), with OpenAI's 429 past it."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {new_key(sgw, limits=('--rpm', '2'))}"
    base = sgw.url + "/v1/conversations"
    assert http.post(base, json={"metadata": {"k" * 65: "v"}}).status_code == 400
    first = http.post(base, json={"items": [{"role": "user", "content": "x"}] * 20})
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    conv = first.json()["id"]
    assert http.get(f"{base}/{conv}").status_code == 200
    assert http.get(f"{base}/{conv}/items").status_code == 200
    added = http.post(f"{base}/{conv}/items", json={"items": [{"role": "user", "content": "y"}]})
    assert added.status_code == 200
    for write in (
        lambda: http.post(base, json={}),
        lambda: http.post(f"{base}/{conv}", json={"metadata": {"a": "b"}}),
        lambda: http.post(
            f"{base}/{conv}/items", json={"items": [{"role": "user", "content": "z"}]}
        ),
    ):
        refused = write()
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "(RPM): Limit 2" in error["message"] and "retry-after" in refused.headers
    assert len(http.get(f"{base}/{conv}/items").json()["data"]) == 20  # the 21st came in
    assert http.delete(f"{base}/{conv}").status_code == 200


def test_conversation_writes_refuse_unknown_fields_and_unknown_conversations_first(
    sgw: Gateway,
) -> None:
    """QA: ``POST /v1/conversations`` took fields it does not have (OpenAI refuses them: a
    typo such as ``metdata`` silently stored nothing), and a write to a conversation that is
    not the account's spent a request of the key's rate before its 404. Now an unknown field
    is OpenAI's 400 ``unknown_parameter``, and the 404 comes before admission (as chat's and
    responses' do): neither spends the one request a minute this key has."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {new_key(sgw, limits=('--rpm', '1'))}"
    base = sgw.url + "/v1/conversations"
    for path, body, param in (
        (base, {"metdata": {"a": "b"}}, "metdata"),
        (f"{base}/conv_{'0' * 48}", {"metadata": {}, "extra": 1}, None),  # 404 first
        (f"{base}/conv_{'0' * 48}/items", {"items": [{"role": "user", "content": "x"}]}, None),
        (f"{base}/conv_{'0' * 48}", {"metadata": {}}, None),
    ):
        refused = http.post(path, json=body)
        error = refused.json()["error"]
        if param is None:
            assert refused.status_code == 404, refused.text
        else:
            assert refused.status_code == 400
            assert (error["code"], error["param"]) == ("unknown_parameter", param)
            assert error["message"] == f"Unknown parameter: '{param}'."
    made = http.post(base, json={"metadata": {"a": "b"}})  # the minute's one request
    assert made.status_code == 200, made.text
    assert made.headers["x-ratelimit-remaining-requests"] == "0"
    conv = made.json()["id"]
    one = [{"role": "user", "content": "x"}]
    typo = http.post(f"{base}/{conv}/items", json={"items": one, "itemz": one})
    assert typo.status_code == 400 and typo.json()["error"]["code"] == "unknown_parameter"
