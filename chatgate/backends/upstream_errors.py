"""The errors of an OpenAI-compatible upstream, in chatgate's error tree.

Subclasses of the tree in :mod:`chatgate.errors` (same status and code)::

    UpstreamError (502)
    ├── UpstreamUnreachable       connect refused/reset, DNS, TLS, a connection broken
    └── UpstreamStatusError       an unexpected upstream status (5xx, 401, 403, ...)

plus the 504s of each time limit (:func:`timeout_error`) and the mapping of an upstream's HTTP
error to the error the client gets (:func:`upstream_status_error`): a 429 stays a 429 with its
retry hint; every message names the public model, never a URL or a key
(:func:`scrub_upstream_text`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson

from chatgate import errors
from chatgate.settings import ModelConfig

Phase = Literal["connect", "first_byte", "idle", "total"]  # which time limit passed


class UpstreamUnreachable(errors.UpstreamError):
    """No connection to the upstream (refused, reset, DNS, TLS: ``reason`` "connect"), or one
    it closed before a whole answer ("broken"): 502, retried elsewhere."""

    def __init__(self, message: str, *, reason: Literal["connect", "broken"] = "connect") -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamStatusError(errors.UpstreamError):
    """The upstream answered an unexpected HTTP status: 502 to the client."""

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


def _secs(value: float) -> str:
    return f"{value:g}s"


def timeout_error(model: ModelConfig, phase: Phase, limit: float) -> errors.UpstreamTimeout:
    """The 504 for ``phase`` (which limit passed), naming the model and the limit."""
    text = {
        "connect": f"could not be connected to within {_secs(limit)}",
        "first_byte": f"did not start answering within {_secs(limit)}",
        "idle": f"stopped sending for {_secs(limit)}",
        "total": f"did not finish within {_secs(limit)}",
    }[phase]
    return errors.UpstreamTimeout(f"The upstream for model `{model.name}` {text}.")


def _retry_hint(headers: Any) -> dict[str, str]:
    """The upstream's ``retry-after`` (seconds) as ``retry-after`` and ``retry-after-ms``."""
    hint: dict[str, str] = {}
    ms = headers.get("retry-after-ms")
    secs = headers.get("retry-after")
    try:
        if ms is not None:
            value = max(0.0, float(ms))
            hint["retry-after-ms"] = str(int(value))
            hint["retry-after"] = str(max(1, int(-(-value // 1000))))
        elif secs is not None:
            value = max(0.0, float(secs))
            hint["retry-after"] = str(max(1, int(-(-value // 1))))
            hint["retry-after-ms"] = str(int(value * 1000))
    except (ValueError, OverflowError):  # OverflowError: "1e400", "inf", no hint of ours
        if secs:  # an HTTP date: pass it on as it is
            hint = {"retry-after": str(secs)}
    return hint


# What an upstream's error text may carry that a caller must never see: our upstream key (an
# upstream echoing a bad key), any bearer token or key-shaped string, and internal URLs.
_SECRETISH = re.compile(
    r"(?i)bearer\s+\S+|\b(?:sk|pk|rk|key|tok)[-_][A-Za-z0-9_\-*.]{6,}|https?://\S+"
)


def scrub_upstream_text(text: str, secret: str | None) -> str:
    """An upstream's error message made safe to pass on to our caller."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _SECRETISH.sub("[redacted]", text)


def upstream_status_error(
    model: ModelConfig, status: int, raw: bytes, headers: Any, secret: str | None = None
) -> errors.APIError:
    """Map an upstream HTTP error: 429 stays 429 (with its retry hint), client errors pass,
    408 is a timeout (504), the rest is 502."""
    message = None
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict):  # OpenAI's shape
                message = error.get("message")
            elif isinstance(error, str):  # text-generation-inference
                message = error
            elif data.get("object") == "error":  # vLLM before it took OpenAI's shape
                message = data.get("message")
    except orjson.JSONDecodeError:
        pass
    if status == 429:
        # Without a hint of the upstream's, one second: every 429 of chatgate's says when.
        hint = _retry_hint(headers) or {"retry-after": "1", "retry-after-ms": "1000"}
        when = " Please try again later."
        if "retry-after-ms" in hint:  # a number of seconds, not an HTTP date
            when = f" Please try again in {hint['retry-after']}s."
        return errors.RateLimited(
            f"The upstream for model `{model.name}` is rate limited.{when}",
            headers=hint,
            type="requests",
        )
    if status in (400, 404, 422) and isinstance(message, str):
        # Scrubbed, then cut: cut first, a key across the cut was no longer the key to find.
        safe = scrub_upstream_text(message[: 600 + len(secret or "")], secret)[:500]
        return errors.InvalidRequest(f"Upstream rejected the request: {safe}")
    if status == 408:
        return errors.UpstreamTimeout(f"The upstream for model `{model.name}` timed out.")
    return UpstreamStatusError(
        f"The upstream for model `{model.name}` answered with status {status}.",
        upstream_status=status,
    )


__all__ = [
    "Phase",
    "UpstreamStatusError",
    "UpstreamUnreachable",
    "scrub_upstream_text",
    "timeout_error",
    "upstream_status_error",
]
