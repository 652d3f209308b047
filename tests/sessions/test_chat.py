"""The chat ``conversation`` extension (:mod:`chatgate.sessions.chat`) against upstreams that
answer in shapes the fake upstream does not: the app in process, the upstream a raw server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from chatgate.ids import new_id
from chatgate.sessions.chat import ChatSession
from chatgate.sessions.response_stream import StreamTranslator
from chatgate.sessions.responses import ResponsesRequest, response_object
from chatgate.sessions.store import SessionStore
from tests.backends.upstreams import CHUNKED, chunk, stream_server
from tests.helpers import Upstream, served_app


def _sse(delta: dict[str, object], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "refuser",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return chunk(b"data: " + json.dumps(event).encode() + b"\n\n")


async def refusing_model(*refusals: str) -> str:
    """The ``[[models]]`` table of a model ``refuser`` whose upstream streams ``refusals`` as
    ``delta.refusal`` (and reports no usage), once."""
    steps = [
        CHUNKED,
        _sse({"role": "assistant", "content": None, "refusal": ""}),
        *(_sse({"refusal": refusal}) for refusal in refusals),
        _sse({}, "stop"),
        chunk(b"data: [DONE]\n\n"),
        b"0\r\n\r\n",
    ]
    base_url, _ = await stream_server([steps])
    return f'[[models]]\nname = "refuser"\nbase_url = "{base_url}"\nupstream_model = "refuser"\n'


async def test_a_streamed_refusal_is_kept_in_the_conversation(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A model that refuses says so in ``delta.refusal``; streamed, the turn's stored answer
    keeps the refusal (as a whole answer's does), not an empty message."""
    toml = await refusing_model("I can't help ", "with that.")
    async with served_app(tmp_path, upstream, extra_toml=toml) as (server, key):
        base = f"http://127.0.0.1:{server.port}/v1"
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(base + "/conversations", json={}) as resp:
                conversation = (await resp.json())["id"]
            body = {
                "model": "refuser",
                "messages": [{"role": "user", "content": "something bad"}],
                "stream": True,
                "conversation": conversation,
            }
            async with http.post(base + "/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert b"with that." in await resp.read()
            url = f"{base}/conversations/{conversation}/items?order=asc"
            async with http.get(url) as resp:
                items = (await resp.json())["data"]
    assert [item["role"] for item in items] == ["user", "assistant"]
    assert items[1]["content"] == [{"type": "refusal", "refusal": "I can't help with that."}]


async def test_streamed_tool_calls_without_index_are_stored_apart(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    """The stored turn of a stream whose tool calls come whole and without ``index``: two
    calls, not one named ``weathertime`` (see the translator's test); odd shapes are skipped,
    not a crash of the relay."""
    account, _ = two_accounts
    conversation = new_id("conv")
    await store.create_conversation(account, conversation)
    session = ChatSession(conversation, [], 0, 0, store, account, [])

    def event(delta: object, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"

    batch = [
        event({"tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": "{}"}}]}),
        event({"tool_calls": [{"id": "c2", "function": {"name": "time", "arguments": "{}"}}]}),
        event({"tool_calls": 7}),
        event("not an object"),
        event({}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]

    async def batches() -> AsyncIterator[list[bytes]]:
        yield batch

    assert [b async for b in session.relay(batches())] == [batch]
    page = await store.list_items(account, conversation, order="asc")
    calls = [i.data for i in page.items if i.type == "function_call"]
    assert [(c["call_id"], c["name"]) for c in calls] == [("c1", "weather"), ("c2", "time")]


async def test_a_stored_turn_gathers_tool_calls_as_the_responses_stream_does(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    """The same deltas, read by a conversation's stored turn and by the Responses stream, give
    the same calls. They did not: a server that repeats a call's name in every delta had it
    stored as ``weatherweather``, and a call without an id was stored with an empty one (which
    an upstream refuses in the next turn's history); the stream had ``weather`` and a new id."""
    account, _ = two_accounts
    conversation = new_id("conv")
    await store.create_conversation(account, conversation)
    session = ChatSession(conversation, [], 0, 0, store, account, [])
    request = ResponsesRequest(model="m", input="hi")
    translator = StreamTranslator(
        response_object(response_id="r", created_at=1, req=request, model="m", truncation="auto")
    )
    deltas: list[dict[str, object]] = [
        {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '"Oslo"}'}}]},
        {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "time", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"name": "time", "arguments": "{}"}}]},
    ]
    events = []
    for delta in [*deltas, None]:
        chunk = {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": None}]}
        if delta is None:
            chunk["choices"][0]["finish_reason"] = "tool_calls"  # type: ignore[index]
        translator.feed(chunk)
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    translator.close()

    async def batches() -> AsyncIterator[list[bytes]]:
        yield events

    assert [b async for b in session.relay(batches())] == [events]
    page = await store.list_items(account, conversation, order="asc")
    calls = [i.data for i in page.items if i.type == "function_call"]
    stored = [(c["name"], c["arguments"], c["call_id"]) for c in calls]
    streamed = [(o["name"], o["arguments"], o["call_id"]) for o in translator.output]
    assert [s[:2] for s in stored] == [s[:2] for s in streamed]
    assert [s[:2] for s in stored] == [("weather", '{"city":"Oslo"}'), ("time", "{}")]
    assert stored[0][2].startswith("call_") and stored[1][2] == streamed[1][2] == "c2"


async def test_a_whole_answers_tool_call_without_an_id_is_stored_with_one(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    """A server that sends no tool-call id (as the streamed case above): the stored call gets
    one, as a streamed answer's does, not an empty id that a strict upstream refuses."""
    account, _ = two_accounts
    conversation = new_id("conv")
    await store.create_conversation(account, conversation)
    session = ChatSession(conversation, [], 0, 0, store, account, [])
    call = {"type": "function", "function": {"name": "weather", "arguments": "{}"}}
    await session.commit({"choices": [{"message": {"content": None, "tool_calls": [call]}}]})
    page = await store.list_items(account, conversation, order="asc")
    [stored] = [i.data for i in page.items if i.type == "function_call"]
    assert stored["call_id"].startswith("call_") and stored["name"] == "weather"
