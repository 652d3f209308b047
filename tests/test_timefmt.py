"""Durations as written in settings and as sent in OpenAI's ``x-ratelimit-reset-*`` headers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatgate.client import parse_reset
from chatgate.timefmt import parse_duration, reset_text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3.0, "0ms"),
        (0.0, "0ms"),
        (0.0004, "0ms"),
        (0.0015, "1ms"),
        (0.12, "120ms"),
        (0.9999, "999ms"),
        (1.0, "1s"),
        (1.2, "2s"),  # a second begun counts whole: waiting that long is enough
        (59.0, "59s"),
        (60.0, "1m0s"),
        (3723.0, "1h2m3s"),
        (86400.0, "24h0m0s"),
    ],
)
def test_reset_text(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


def test_reset_text_under_a_second_is_whole_milliseconds_rounded_down() -> None:
    for ms in range(1000):
        assert reset_text(ms / 1000 + 0.0004) == f"{ms}ms"


@given(st.floats(min_value=-10.0, max_value=10 * 86400.0))
def test_the_client_reads_back_no_less_than_the_wait_less_a_millisecond(seconds: float) -> None:
    """What the server sends, chatgate's client reads: never more than 1 ms short of the
    wait (a millisecond begun is dropped), never more than 1 s over it."""
    read = parse_reset(reset_text(seconds))
    assert read is not None
    wait = max(seconds, 0.0)
    assert wait - 0.001 <= read + 1e-9
    assert read <= (math.ceil(wait) if wait >= 1 else wait) + 1e-9


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 2592000), ("0", 0)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5h", "-1s", "10y", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["36501d", "5215w", "9" * 20 + "d", "9" * 5000])
def test_parse_duration_refuses_more_than_100_years(text: str) -> None:
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration(text)
    assert parse_duration("36500d") == 36500 * 86400
