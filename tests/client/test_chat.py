"""``chatgate chat``, run as a subprocess with its input fed line by line on stdin."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from chatgate.client import OpenAI
from tests.helpers import BIN, Upstream


def chat(env: dict[str, str], lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chatgate"), "chat", *args],
        input="".join(line + "\n" for line in lines),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_session_kept_by_the_server(client_env: dict[str, str]) -> None:
    result = chat(
        client_env,
        ["hello there", "/usage", "and again", "/usage", "/reset", "fresh start", "/quit"],
        "--model",
        "gpt-test",
        "--system",
        "be brief",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    first = re.search(r"kept by the server as (conv_\w+)", out)
    assert first, out
    assert "assistant> echo: hello there" in out  # streamed, then the next prompt
    assert "assistant> echo: and again" in out
    assert re.search(r"this conversation: 1 turn, \d+ prompt \+ 20 completion", out)
    assert re.search(r"this conversation: 2 turns, \d+ prompt \+ 40 completion", out)
    second = re.search(r"new conversation \((conv_\w+)\)", out)
    assert second and second.group(1) != first.group(1)
    assert "HTTP Request" not in result.stderr  # httpx's request log is kept quiet

    # The server stored both turns of the first conversation, not the system prompt.
    client = OpenAI(
        api_key=client_env["CHATGATE_API_KEY"], base_url=client_env["CHATGATE_BASE_URL"]
    )
    items = client.conversations.items.list(first.group(1), order="asc")
    roles = [getattr(item, "role", None) for item in items]
    assert roles == ["user", "assistant", "user", "assistant"]

    # ... and it can be resumed.
    resumed = chat(
        client_env, ["third turn"], "--model", "gpt-test", "--conversation", first.group(1)
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"kept by the server as {first.group(1)}" in resumed.stdout
    items = client.conversations.items.list(first.group(1))
    assert len(list(items)) == 6


def test_default_model_and_end_of_input(client_env: dict[str, str]) -> None:
    result = chat(client_env, ["hi"])
    assert result.returncode == 0, result.stderr
    assert "chatting with " in result.stdout and "assistant> echo: hi" in result.stdout


def test_errors_are_reported_and_the_chat_goes_on(client_env: dict[str, str]) -> None:
    result = chat(client_env, ["hi", "/nope", "/help", "hello"], "--model", "gpt-dead")
    assert result.returncode == 0
    assert result.stderr.count("error: 502") == 2, result.stderr
    assert "unknown command /nope" in result.stdout
    assert result.stdout.count("commands: /reset") >= 3


def test_an_unknown_model_is_refused_before_a_conversation_is_made(
    client_env: dict[str, str],
) -> None:
    """QA: ``--model nosuchmodel`` said "chatting with nosuchmodel", made a conversation (a
    request of the key's rate), printed a 404 for each line and exited 0."""
    result = chat(client_env, ["hi"], "--model", "no-such-model")
    assert result.returncode == 2
    assert "chatgate chat: error: no such model no-such-model" in result.stderr
    assert "chatting with" not in result.stdout


def test_unknown_conversation(client_env: dict[str, str]) -> None:
    result = chat(client_env, ["hi"], "--model", "gpt-test", "--conversation", "conv_nope")
    assert result.returncode == 2
    assert "no such conversation conv_nope" in result.stderr


def test_an_empty_conversation_id_is_a_clear_error(client_env: dict[str, str]) -> None:
    """``--conversation "$CONV"`` with CONV unset: no traceback, and no new conversation."""
    args = ["--model", "gpt-test", "--conversation", ""]
    alone = [sys.executable, "-m", "chatgate.client.chat", *args]  # only the client installed
    for result in (
        chat(client_env, ["hi"], *args),
        subprocess.run(alone, input="hi\n", env=client_env, capture_output=True, text=True),
    ):
        assert result.returncode == 2
        assert "--conversation" in result.stderr and "Traceback" not in result.stderr
        assert "assistant>" not in result.stdout


def test_missing_key_is_a_clear_error(client_env: dict[str, str]) -> None:
    env = {k: v for k, v in client_env.items() if k != "CHATGATE_API_KEY"}
    result = chat(env, ["hi"], "--model", "gpt-test")
    assert result.returncode == 2
    assert "CHATGATE_API_KEY" in result.stderr and "Traceback" not in result.stderr


def test_a_key_pasted_with_curly_quotes_is_a_clear_error(client_env: dict[str, str]) -> None:
    key = client_env["CHATGATE_API_KEY"]
    env = {**client_env, "CHATGATE_API_KEY": f"\u201c{key}\u201d"}
    result = chat(env, ["hi"], "--model", "gpt-test")
    assert result.returncode == 1
    assert "CHATGATE_API_KEY" in result.stderr and "HTTP header" in result.stderr
    assert "Traceback" not in result.stderr
    assert key[6:] not in result.stderr + result.stdout


def test_bad_key_ends_the_chat(client_env: dict[str, str]) -> None:
    env = {**client_env, "CHATGATE_API_KEY": "sk-cg-wrong"}
    result = chat(env, ["hi"], "--model", "gpt-test")
    assert result.returncode == 1
    assert "401 invalid_api_key" in result.stderr
    assert "sk-cg-wrong" not in result.stderr + result.stdout


def test_without_a_conversations_api_the_history_is_kept_locally(upstream: Upstream) -> None:
    """The fake upstream is an OpenAI-compatible server with no /v1/conversations."""
    env = {
        "CHATGATE_BASE_URL": upstream.base_url,
        "CHATGATE_API_KEY": "sk-anything",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "chatgate.client.chat", "--model", "fallback-model"],
        input="first question\nsecond question\n/usage\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "kept here in memory" in result.stdout
    assert "this conversation: 2 turns" in result.stdout
    sent = [b for b in upstream.received() if b.get("model") == "fallback-model"]
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert "first question" in json.dumps(sent[-1]["messages"][0])
    assert "conversation" not in sent[-1]
