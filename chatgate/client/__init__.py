"""What callers import: the official ``openai`` clients, configured for chatgate.

    from chatgate.client import OpenAI

    client = OpenAI(rpm=60)  # CHATGATE_API_KEY / CHATGATE_BASE_URL from the environment
    reply = client.chat.completions.create(
        model="chatgate-mini", messages=[{"role": "user", "content": "Hello"}]
    )

Imports only ``openai`` and ``httpx`` (``pip install 'chatgate[client]'``), nothing of the server.
Names are loaded on first use (PEP 562), so ``import chatgate.client`` costs nothing until
then: the ``chatgate`` command registers ``chat`` without importing ``openai`` (~1 s).

Errors are the ``openai`` package's own tree, unchanged, plus one for a missing key::

    openai.OpenAIError
    ├── MissingAPIKeyError            no key passed or in the environment (chatgate.client)
    └── APIError
        ├── APIConnectionError        no answer (after the retries)
        │   └── APITimeoutError
        └── APIStatusError            an error answer (after the retries, when retryable)
            ├── BadRequestError           400
            ├── AuthenticationError       401   never retried
            ├── PermissionDeniedError     403   never retried
            ├── NotFoundError             404
            ├── RateLimitError            429   retried, except code insufficient_quota
            └── InternalServerError       5xx   retried
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatgate.client._config import (
        DEFAULT_BASE_URL,
        ClientConfig,
        MissingAPIKeyError,
        resolve_config,
    )
    from chatgate.client._limiter import (
        BudgetState,
        LimiterState,
        Permit,
        RateLimiter,
        parse_reset,
    )
    from chatgate.client._openai import AsyncOpenAI, OpenAI
    from chatgate.client._transport import (
        RETRIES_HEADER,
        AsyncTransport,
        RetryPolicy,
        Transport,
        estimate_tokens,
        parse_retry_after,
        retry_delay,
        should_retry,
    )

__all__ = [
    "DEFAULT_BASE_URL",
    "RETRIES_HEADER",
    "AsyncOpenAI",
    "AsyncTransport",
    "BudgetState",
    "ClientConfig",
    "LimiterState",
    "MissingAPIKeyError",
    "OpenAI",
    "Permit",
    "RateLimiter",
    "RetryPolicy",
    "Transport",
    "estimate_tokens",
    "parse_reset",
    "parse_retry_after",
    "resolve_config",
    "retry_delay",
    "should_retry",
]

_HOME = {
    "_config": ("DEFAULT_BASE_URL", "ClientConfig", "MissingAPIKeyError", "resolve_config"),
    "_limiter": ("BudgetState", "LimiterState", "Permit", "RateLimiter", "parse_reset"),
    "_openai": ("AsyncOpenAI", "OpenAI"),
    "_transport": (
        "RETRIES_HEADER",
        "AsyncTransport",
        "RetryPolicy",
        "Transport",
        "estimate_tokens",
        "parse_retry_after",
        "retry_delay",
        "should_retry",
    ),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use, then keep the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
