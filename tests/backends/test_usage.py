"""Token counts an upstream reports are taken only when they are counts."""

from __future__ import annotations

from typing import Any

import pytest

from chatgate.backends.base import MAX_REPORTED_TOKENS, Usage, reported_tokens


@pytest.mark.parametrize("value", [0, 1, 4096, MAX_REPORTED_TOKENS])
def test_a_count_is_taken(value: int) -> None:
    assert reported_tokens(value) == value


@pytest.mark.parametrize(
    "value", [-1, -(2**40), MAX_REPORTED_TOKENS + 1, 2**40, True, False, 3.0, "12", None, [1]]
)
def test_what_is_not_a_count_is_refused(value: Any) -> None:
    assert reported_tokens(value) is None


def test_usage_with_any_count_refused_is_none_so_the_gateway_counts() -> None:
    assert Usage.from_openai({"prompt_tokens": 7, "completion_tokens": 3}) == Usage(7, 3)
    assert Usage.from_openai({"prompt_tokens": 2**40, "completion_tokens": 3}) is None
    assert Usage.from_openai({"prompt_tokens": 7, "completion_tokens": -3}) is None
    assert Usage.from_openai({"prompt_tokens": True, "completion_tokens": 3}) is None
    assert Usage.from_openai({"prompt_tokens": 7}) is None
    assert Usage.from_openai(None) is None
