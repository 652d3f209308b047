"""Every Python snippet of the README's "Calling chatgate" runs, as pasted, on the real server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SECTION = (ROOT / "README.md").read_text().split("## Calling chatgate", 1)[1].split("\n## ", 1)[0]
SNIPPETS = re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)


def test_the_doc_has_the_three_snippets() -> None:
    text = "\n".join(SNIPPETS)
    assert "requests.post(" in text and "from openai import OpenAI" in text
    assert "from chatgate.client import OpenAI" in text


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code: str, client_env: dict[str, str]) -> None:
    code = code.replace('"chatgate-mini"', '"gpt-test"')  # the test server has no local model
    result = subprocess.run(
        [sys.executable, "-c", code], env=client_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr
