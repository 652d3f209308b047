"""The ``/v1`` handlers in process (:func:`tests.helpers.served_app`), where a test can see
which thread did what."""

from __future__ import annotations

import threading
from pathlib import Path

import aiohttp
import pytest

from chatgate import errors, tokens
from chatgate.api.schemas import decode_json
from tests.helpers import Upstream, served_app


class WhereCounted(tokens.BPECounter):
    """The real counter of the fake upstream's model, noting the thread each count ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def count_text(self, text: str) -> int:
        self.threads.append(threading.get_ident())
        return super().count_text(text)


async def test_a_long_embeddings_input_is_counted_off_the_event_loop(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Counting megabytes held the event loop, and every other request, for seconds (8 MB
    for 11 s on the local model's tokenizer): a long input is counted in a thread."""
    counter = WhereCounted()
    tokens.register_counter("fake-model", counter)
    try:
        async with (
            served_app(tmp_path, upstream) as (server, key),  # free plan: tokens are counted
            aiohttp.ClientSession() as http,
        ):
            for words in (10, 20_000):  # 50 characters, then 100 KB
                body = {"model": "gpt-test", "input": "word " * words}
                async with http.post(
                    server.make_url("/v1/embeddings"),
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    await resp.read()
    finally:
        tokens.unregister_counter("fake-model", counter)
    loop = threading.get_ident()  # the test's loop serves the app too
    assert counter.threads[0] == loop  # a short one is counted at once
    assert len(counter.threads) == 2 and counter.threads[1] != loop


@pytest.mark.parametrize("text", ['"\\ud83d cut"', '"\\udc00"', '"\\ud83d"'])
def test_a_lone_surrogate_is_named_not_taken_for_bad_json(text: str) -> None:
    """QA: a string cut in the middle of an emoji (``\\ud83d`` without its pair, as JavaScript
    clients cut them) was "We could not parse the JSON body ... (HINT: ... not using your HTTP
    library correctly)" for JSON that is well formed."""
    with pytest.raises(errors.InvalidRequest) as refused:
        decode_json(b'{"model": "m", "input": ' + text.encode() + b"}")
    assert "lone UTF-16 surrogate" in refused.value.message
    assert refused.value.code == "invalid_json"
    with pytest.raises(errors.InvalidRequest) as broken:
        decode_json(b'{"model": ')
    assert "HINT" in broken.value.message


async def test_base64_embeddings_are_base64_when_the_upstream_sends_floats(
    tmp_path: Path, upstream: Upstream
) -> None:
    """OpenAI's SDKs ask for base64 by default and accept either; a raw client that asked for
    base64 got the upstream's list of floats (the fake upstream, like many servers, ignores
    ``encoding_format``: QA). Now the gateway encodes them, as OpenAI would have."""
    import base64
    import struct

    async with (
        served_app(tmp_path, upstream) as (server, key),
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        answers = {}
        for encoding in ("float", "base64", None):
            body = {"model": "gpt-test", "input": ["one", "two"], "encoding_format": encoding}
            async with http.post(server.make_url("/v1/embeddings"), json=body) as resp:
                assert resp.status == 200, await resp.text()
                answers[encoding] = await resp.json()
    floats = [item["embedding"] for item in answers["float"]["data"]]
    assert floats and all(isinstance(v, list) for v in floats)
    assert [item["embedding"] for item in answers[None]["data"]] == floats  # null: the default
    encoded = [item["embedding"] for item in answers["base64"]["data"]]
    assert all(isinstance(e, str) for e in encoded)
    decoded = [
        list(struct.unpack(f"<{len(v)}f", base64.b64decode(e)))
        for e, v in zip(encoded, floats, strict=True)
    ]
    assert decoded == [pytest.approx(v, rel=1e-6) for v in floats]
    assert answers["base64"]["usage"] == answers["float"]["usage"]
