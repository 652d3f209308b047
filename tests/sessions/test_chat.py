"""The chat ``conversation`` extension (:mod:`chatgate.sessions.chat`) against upstreams that
answer in shapes the fake upstream does not: the app in process, the upstream a raw server."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

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
