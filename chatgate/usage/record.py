"""The usage record: one per request, filled on the request path, written by the recorder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Status codes that count as "rate limited" in the rollups (a 429 for rpm/tpm/rpd or quota).
RATE_LIMITED_STATUS = 429
# The status of a request whose client went away (or whose server stopped) before its answer
# began, as nginx logs it: no answer was sent. Counted among the errors, never as a refusal.
CLIENT_CLOSED = 499


@dataclass(slots=True)  # not frozen: one per request, and 3x cheaper to build so
class UsageRecord:
    """What one request used and how it ended. ``request_id`` is the idempotency key."""

    request_id: str  # "req_..." unique; the idempotency key
    created_at: float  # unix seconds, when the request arrived
    account_id: str | None  # None for unauthenticated rejects (then key_id None too)
    key_id: str | None
    model: str  # public model name ("" if unknown)
    backend: str  # "openai_compat", "local", "" if none
    endpoint: str  # "chat.completions", "embeddings", "responses"
    prompt_tokens: int
    completion_tokens: int
    cost: float  # in USD; 0.0 when unpriced
    latency_ms: float
    ttft_ms: float | None  # time to first token (streams)
    status: int  # HTTP status returned to the client; for a stream the upstream broke after
    # its 200, the failure's (502, 504), so that it counts among the errors
    error_code: str | None  # e.g. "rate_limit_exceeded", "upstream_error"
    conversation_id: str | None
    streamed: bool
    admitted: bool = True  # the limits let it through (see usage.tables.usage_records)
    cached_tokens: int = 0  # of prompt_tokens, read from the upstream's prompt cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def is_error(self) -> bool:
        """Counted in the rollups' ``errors``: every answer that was not a success."""
        return self.status >= 400

    @property
    def is_rate_limited(self) -> bool:
        return self.status == RATE_LIMITED_STATUS

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the spool's line format)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        """The inverse of :meth:`to_dict`; unknown keys are ignored, missing ones raise.

        A line spooled before ``admitted`` was recorded reads as the rollups of then do:
        admitted unless it was a 429; one spooled before ``cached_tokens``, none cached."""
        if "admitted" not in data:
            data = {**data, "admitted": data.get("status") != RATE_LIMITED_STATUS}
        if "cached_tokens" not in data:
            data = {**data, "cached_tokens": 0}
        return cls(**{f.name: data[f.name] for f in fields(cls)})


__all__ = ["CLIENT_CLOSED", "RATE_LIMITED_STATUS", "UsageRecord"]
