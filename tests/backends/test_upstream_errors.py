"""``upstream_status_error``: what the client is told of an upstream's HTTP error."""

from __future__ import annotations

import orjson

from chatgate import errors
from chatgate.backends.upstream_errors import upstream_status_error
from chatgate.settings import ModelConfig

MODEL = ModelConfig(name="m")
SECRET = "ZZsecretUPSTREAM0987654321"


def test_a_key_across_the_cut_of_a_long_message_is_still_scrubbed() -> None:
    """The message was cut at 500 characters, then scrubbed: a key the cut went through was
    no longer the key to find, and its first characters reached the client."""
    for before in (480, 495, 499, 10):
        text = "x" * before + SECRET + " and more"
        raw = orjson.dumps({"error": {"message": text}})
        error = upstream_status_error(MODEL, 400, raw, {}, SECRET)
        assert isinstance(error, errors.InvalidRequest)
        assert "ZZsec" not in error.message, before
        assert len(error.message) <= 500 + len("Upstream rejected the request: ")


def test_a_429_without_a_hint_still_says_when_to_try_again() -> None:
    """Every 429 carries ``retry-after`` and ``retry-after-ms`` (README); an upstream's 429
    without a hint of its own went out without either."""
    error = upstream_status_error(MODEL, 429, b"{}", {})
    assert error.status == 429
    assert error.headers == {"retry-after": "1", "retry-after-ms": "1000"}
    hinted = upstream_status_error(MODEL, 429, b"{}", {"retry-after": "7"})
    assert hinted.headers == {"retry-after": "7", "retry-after-ms": "7000"}
