"""The fresh-install promise: ``chatgate serve`` with nothing configured answers a chat
request with the embedded model — no upstream, no internet — through the official SDK."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.helpers import Gateway, make_gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = make_gateway(Path(tmp_path_factory.mktemp("local")), local_model=True)
    gw.start()
    yield gw
    gw.stop()


def first_key(gw: Gateway) -> str:
    line = next(x for x in gw.logs().splitlines() if "CHATGATE_API_KEY=" in x)
    return line.split("=", 1)[1].strip()


def test_fresh_install_answers_with_the_embedded_model(local_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key=first_key(local_gateway))
    assert "chatgate-mini" in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model="chatgate-mini",
        messages=[{"role": "user", "content": "Say hello in one word."}],
        max_tokens=12,
        seed=7,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
    assert reply.choices[0].finish_reason in ("stop", "length")

    chunks = list(
        client.chat.completions.create(
            model="chatgate-mini",
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10


def test_a_json_format_the_local_model_cannot_keep_names_the_field_sent(
    local_gateway: Gateway,
) -> None:
    """``/v1/responses`` with ``text.format`` JSON was refused naming ``response_format``, the
    chat field it becomes, which the client never sent (found by QA)."""
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key=first_key(local_gateway))
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="chatgate-mini", input="hi", text={"format": {"type": "json_object"}}
        )
    assert refused.value.param == "text.format"
    assert "'text.format'" in refused.value.message and "response_format" not in (
        refused.value.message
    )
    with pytest.raises(openai.BadRequestError) as chat:  # chat completions: its own name
        client.chat.completions.create(
            model="chatgate-mini",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_object"},
        )
    assert chat.value.param == "response_format"


def test_a_long_local_embeddings_request_ends_at_the_total_timeout(tmp_path: Path) -> None:
    """One request of many long inputs held the embedded model's only worker (and every chat
    behind it) for hours: CHATGATE_UPSTREAM_TIMEOUT did not apply to the local backend (QA).
    Now it answers 504 at the deployment's total timeout and the model is free after the batch
    it was on."""
    gw = make_gateway(
        tmp_path, local_model=True, extra_env={"CHATGATE_UPSTREAM_TIMEOUT": "1"}
    ).start()
    try:
        headers = {"Authorization": f"Bearer {first_key(gw)}"}
        resp = requests.post(
            gw.url + "/v1/embeddings",
            json={"model": "chatgate-mini", "input": ["word " * 3000] * 64},
            headers=headers,
            timeout=120,
        )
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "upstream_timeout"
        chat = requests.post(
            gw.url + "/v1/chat/completions",
            json={
                "model": "chatgate-mini",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 3,
            },
            headers=headers,
            timeout=300,
        )
        assert chat.status_code == 200, chat.text
    finally:
        gw.stop()


def test_embedded_embeddings(local_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key=first_key(local_gateway))
    result = client.embeddings.create(model="chatgate-mini", input=["a cat", "a dog"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 10
    assert result.usage.prompt_tokens > 0


def test_local_usage_is_recorded(local_gateway: Gateway) -> None:
    email = f"l{secrets.token_hex(3)}@example.com"
    local_gateway.cli("accounts", "create", email, "--plan", "pro")
    key = local_gateway.cli_json("keys", "create", "--account", email)["key"]
    resp = requests.post(
        local_gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "chatgate-mini",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
        },
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    # The pro plan limits tokens: the reservation is made with the model's own tokenizer.
    assert int(resp.headers["x-ratelimit-limit-tokens"]) > 0
    deadline = time.monotonic() + 20
    totals: dict[str, int] = {"requests": 0}
    while time.monotonic() < deadline and not totals["requests"]:
        out = local_gateway.cli("usage", "--account", email, "--since", "1d", "--format", "json")
        totals = json.loads(out.stdout)["totals"]
        time.sleep(0.5)
    assert totals["requests"] == 1
    assert totals["prompt_tokens"] == usage["prompt_tokens"]
    assert totals["completion_tokens"] == usage["completion_tokens"]


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The embedded model with a 1,024-token context: a prompt that fills it is a few
    seconds' work on two cores, not a minute's."""
    gw = make_gateway(
        Path(tmp_path_factory.mktemp("local-small")),
        local_model=True,
        extra_env={"CHATGATE_LOCAL_CONTEXT": "1024", "CHATGATE_LOCAL_EMBEDDINGS": "off"},
    )
    gw.start()
    yield gw
    gw.stop()


def short_turns(count: int) -> list[dict[str, str]]:
    return [
        {"role": "user" if j % 2 == 0 else "assistant", "content": f"message {j} in a few words"}
        for j in range(count)
    ]


def test_a_prompt_that_fits_is_counted_as_sent(small_gateway: Gateway) -> None:
    """40 short messages are ~660 prompt tokens of a 1,024 window: /v1/responses refused them
    as ~1,500 (each message priced alone, with the template's default system prompt every
    time), and a conversation kept about half of what fits."""
    client = openai.OpenAI(base_url=small_gateway.url + "/v1", api_key=first_key(small_gateway))
    messages = [*short_turns(40), {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model="chatgate-mini",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=1,
    )
    response = client.responses.create(
        model="chatgate-mini",
        input=messages,  # type: ignore[arg-type]
        max_output_tokens=1,
        truncation="disabled",
    )
    assert chat.usage is not None and response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens < 1024


def test_a_stored_message_too_long_for_the_context_is_dropped(small_gateway: Gateway) -> None:
    """One stored message longer than the context made its conversation a 400 forever, even
    with truncation 'auto'; it is old history and goes, and the new turn is answered."""
    client = openai.OpenAI(base_url=small_gateway.url + "/v1", api_key=first_key(small_gateway))
    huge = "lorem ipsum dolor sit amet " * 8000  # 216,000 characters, ~50,000 tokens
    conv = client.conversations.create(
        items=[{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]
    )
    chat = client.chat.completions.create(
        model="chatgate-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"conversation": conv.id},
    )
    assert chat.usage is not None and chat.usage.prompt_tokens < 100
    response = client.responses.create(
        model="chatgate-mini", input="hi", conversation=conv.id, max_output_tokens=1
    )
    assert response.usage is not None and response.usage.input_tokens < 100
    with pytest.raises(openai.BadRequestError) as info:  # the 400 names the Responses field
        client.responses.create(
            model="chatgate-mini", input="hi", conversation=conv.id, truncation="disabled"
        )
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "input")


def test_max_tokens_beyond_the_context_is_the_same_with_a_conversation(
    small_gateway: Gateway,
) -> None:
    """A chat of max_tokens 5000 (more than the window) was answered, the same in an empty
    conversation a 400: both are answered, in at most the room left."""
    client = openai.OpenAI(base_url=small_gateway.url + "/v1", api_key=first_key(small_gateway))
    conv = client.conversations.create()
    for extra in ({}, {"conversation": conv.id}):
        reply = client.chat.completions.create(
            model="chatgate-mini",
            messages=[{"role": "user", "content": "Say ok"}],
            max_tokens=5000,
            temperature=0,
            stop=[" ", "\n", ".", ","],  # a word or two: the answer is not what is tested
            extra_body=extra,
        )
        assert reply.choices[0].finish_reason == "stop"


def test_a_long_embeddings_input_is_reserved_as_the_embedder_reads_it(
    local_gateway: Gateway,
) -> None:
    """The embedder reads (and bills) an input's first 2,048 tokens: a 420 KB input was
    reserved whole, ~70,000 tokens, tokenized on the event loop (8 MB held it 11 s). A key
    of 1,000 tokens a minute shows the reservation in its refusal, before anything is
    embedded."""
    email = f"e{secrets.token_hex(3)}@example.com"
    local_gateway.cli("accounts", "create", email, "--plan", "free")
    key = local_gateway.cli_json("keys", "create", "--account", email, "--tpm", "1000")["key"]
    client = openai.OpenAI(base_url=local_gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="chatgate-mini", input="hello world " * 35_000)
    assert "Limit 1000, Requested 2048." in info.value.message
