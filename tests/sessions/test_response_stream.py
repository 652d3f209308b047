"""Responses streams (:mod:`chatgate.sessions.response_stream`) from upstreams that answer in
shapes the fake upstream does not: the app in process, the upstream a raw server."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from chatgate import tokens
from tests.helpers import Upstream, served_app, stored_usage
from tests.sessions.test_chat import refusing_model


async def test_a_streamed_refusal_is_stored_and_metered_as_one(
    upstream: Upstream, tmp_path: Path
) -> None:
    """An upstream that refuses in ``delta.refusal`` and reports no usage: the stored response
    holds the refusal part that was streamed, and the refusal's tokens are metered."""
    toml = await refusing_model("I can't help with that.")
    async with served_app(tmp_path, upstream, extra_toml=toml) as (server, key):
        base = f"http://127.0.0.1:{server.port}/v1"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            body = {"model": "refuser", "input": "something bad", "stream": True}
            async with http.post(base + "/responses", json=body) as resp:
                text = (await resp.read()).decode()
            assert "event: response.refusal.done" in text
            assert "event: response.output_text.delta" not in text
            response_id = text.split('"id":"', 1)[1].split('"', 1)[0]
            async with http.get(f"{base}/responses/{response_id}") as resp:
                stored = await resp.json()
    refusal = {"type": "refusal", "refusal": "I can't help with that."}
    assert stored["output"][0]["content"] == [refusal]
    records, _ = await stored_usage(tmp_path, "completion_tokens")
    assert [r[0] for r in records] == [tokens.count_text("I can't help with that.", "refuser")]
