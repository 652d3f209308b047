"""Every script in ``examples/`` runs against the real server and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"


def run(env: dict[str, str], script: str, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{script}: {result.stderr}"
    return result.stdout


def test_support_bot(client_env: dict[str, str]) -> None:
    out = run(client_env, "support_bot.py", "--model", "gpt-test", "My site is down", "#4711")
    assert "[conversation: conv_" in out
    assert "support:  echo: My site is down" in out and "support:  echo: #4711" in out
    assert "[turns: 2, tokens:" in out


def test_chatbot(client_env: dict[str, str]) -> None:
    out = run(client_env, "chatbot.py", "--model", "gpt-test", stdin="hello\nagain\nquit\n")
    assert "bot: echo: hello" in out and "bot: echo: again" in out


def test_content_generation(client_env: dict[str, str], tmp_path: Path) -> None:
    topics = tmp_path / "topics.txt"
    topics.write_text("backups\npasswords\n\nstanding desks\n")
    results = tmp_path / "out.jsonl"
    run(
        client_env,
        "content_generation.py",
        "--model",
        "gpt-test",
        "--prompts",
        str(topics),
        "--rpm",
        "600",
        "--workers",
        "3",
        "--out",
        str(results),
    )
    items = [json.loads(line) for line in results.read_text().splitlines()]
    assert [i["topic"] for i in items] == ["backups", "passwords", "standing desks"]
    assert all("echo: Write a short" in i["text"] and i["tokens"] > 0 for i in items)


def test_content_generation_refuses_a_bad_number_in_one_line(client_env: dict[str, str]) -> None:
    """``--rpm 0`` ended in a traceback (the limiter's ValueError): argparse's error now."""
    for bad in ("0", "-3", "many"):
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "content_generation.py"), "--rpm", bad],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "--rpm" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_personal_assistant(client_env: dict[str, str], tmp_path: Path, stream: bool) -> None:
    agenda = tmp_path / "agenda.json"
    args = ["--model", "gpt-tools", "--agenda", str(agenda)] + (["--stream"] if stream else [])
    out = run(client_env, "personal_assistant.py", *args)
    assert "tool: schedule_event(" in out and "assistant: echo:" in out
    assert json.loads(agenda.read_text()) == [
        {"kind": "event", "title": "fake title", "when": "fake when", "minutes": 60}
    ]
