"""``OpenAI(...)`` and ``AsyncOpenAI(...)``: the official clients, configured for chatgate.

They return ``openai.OpenAI`` / ``openai.AsyncOpenAI`` objects, so every method, type and
error is the ``openai`` package's own. What changes is underneath: the key and base URL come
from the environment (see :mod:`chatgate.client._config`), and the HTTP client's transport
waits for a client-side :class:`RateLimiter` and does the retries. The SDK's own retries are
switched off (``max_retries=0``) so that a failure is not retried twice over.

The objects are of a subclass that changes one method, ``copy`` (alias ``with_options``): the
SDK's ``with_options(max_retries=N)`` would add N retries of its own around the transport's,
so the subclass keeps the SDK's at 0 and hands N to the transport instead, in a request header
(:data:`~chatgate.client._transport.RETRIES_HEADER`) that the transport takes off before
sending. Everything else about the copy is the SDK's.

Note: ``openai`` 3.x is built on ``httpx2`` and accepts a legacy ``httpx.Client`` as
``http_client`` (it converts timeouts and exceptions); that is what these factories pass.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai

from chatgate.client._config import resolve_config
from chatgate.client._limiter import RateLimiter
from chatgate.client._transport import RETRIES_HEADER, AsyncTransport, RetryPolicy, Transport

__all__ = ["DEFAULT_LIMITS", "DEFAULT_TIMEOUT", "AsyncOpenAI", "OpenAI"]

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
"""The ``openai`` package's default: ten minutes to answer, five seconds to connect."""
DEFAULT_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
"""The ``openai`` package's connection pool limits."""


def _retries_to_transport(
    client: openai.OpenAI | openai.AsyncOpenAI, kwargs: dict[str, Any], max_retries: object
) -> dict[str, Any]:
    """``copy()``'s arguments, the SDK's retries kept at 0 and ``max_retries`` in a header.

    A ``set_default_headers`` that replaces ``client``'s default headers keeps the retry
    count they held, since the caller did not ask to change it. A copy on an ``http_client``
    of another transport (given now or before) is the SDK's own: its retries are the SDK's.
    """
    http_client = kwargs.get("http_client") or client._client
    if not isinstance(getattr(http_client, "_transport", None), Transport | AsyncTransport):
        return {**kwargs, "max_retries": max_retries}
    if isinstance(max_retries, openai.NotGiven):
        count = client._custom_headers.get(RETRIES_HEADER)
        if count is None or kwargs.get("set_default_headers") is None:
            return {**kwargs, "max_retries": 0}
    elif isinstance(max_retries, int) and not isinstance(max_retries, bool) and max_retries >= 0:
        count = str(max_retries)
    else:
        raise ValueError(f"max_retries must be a whole number from 0 up, not {max_retries!r}")
    replaced = kwargs.get("set_default_headers") is not None
    field = "set_default_headers" if replaced else "default_headers"
    headers = {**(kwargs.get(field) or {}), RETRIES_HEADER: count}
    return {**kwargs, field: headers, "max_retries": 0}


class _OpenAI(openai.OpenAI):
    """``openai.OpenAI`` whose ``with_options(max_retries=N)`` sets the transport's retries."""

    def copy(self, *, max_retries: Any = openai.NOT_GIVEN, **kwargs: Any) -> _OpenAI:
        return super().copy(**_retries_to_transport(self, kwargs, max_retries))

    with_options = copy


class _AsyncOpenAI(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` whose ``with_options(max_retries=N)`` sets the transport's."""

    def copy(self, *, max_retries: Any = openai.NOT_GIVEN, **kwargs: Any) -> _AsyncOpenAI:
        return super().copy(**_retries_to_transport(self, kwargs, max_retries))

    with_options = copy


def _pick_limiter(
    limiter: RateLimiter | None, rate_limit: bool, rpm: int | None, tpm: int | None
) -> RateLimiter | None:
    if limiter is not None:
        return limiter
    return RateLimiter(rpm, tpm) if rate_limit else None


def _no_http_client(kwargs: dict[str, Any]) -> None:
    """An ``http_client`` of the caller's would be a second one beside ours ("got multiple
    values for keyword argument"): said plainly, with what to do instead."""
    if "http_client" in kwargs:
        raise TypeError(
            "chatgate.client makes its own http_client (its transport is the limiter and the "
            "retries): pass transport= for the httpx transport underneath, or give your own "
            "client chatgate.client.Transport and openai.OpenAI(..., max_retries=0)"
        )


def OpenAI(  # named like the class it stands in for
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    limiter: RateLimiter | None = None,
    rate_limit: bool = True,
    max_retries: int = 3,
    retry: RetryPolicy | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
    **kwargs: Any,
) -> openai.OpenAI:
    """An ``openai.OpenAI`` for chatgate (or any OpenAI-compatible server).

    - ``api_key``/``base_url``: argument > ``CHATGATE_*`` > ``OPENAI_*`` > default URL;
      no key anywhere raises :class:`~chatgate.client.MissingAPIKeyError`.
    - ``rpm``/``tpm``: client-side limits; without them the limiter learns the server's from
      its ``x-ratelimit-*`` headers. Pass ``limiter=`` to share one limiter between clients,
      ``rate_limit=False`` for none.
    - ``max_retries`` (or a full ``retry=RetryPolicy(...)``): retries of 429, 5xx and
      connection errors; ``insufficient_quota`` and 401/403 are never retried.
    - ``transport``: the transport underneath (default httpx's; tests pass a mock).
    - anything else (``organization``, ``default_headers``, ...) goes to ``openai.OpenAI``.
    """
    _no_http_client(kwargs)
    config = resolve_config(api_key, base_url)
    wrapped = Transport(
        transport if transport is not None else httpx.HTTPTransport(limits=DEFAULT_LIMITS),
        limiter=_pick_limiter(limiter, rate_limit, rpm, tpm),
        retry=retry or RetryPolicy(max_retries=max_retries),
    )
    # Typed as httpx2.Client in openai 3.x, which accepts httpx.Client at run time.
    http_client: Any = httpx.Client(transport=wrapped, timeout=timeout, follow_redirects=True)
    return _OpenAI(
        api_key=config.api_key,
        base_url=config.base_url,
        max_retries=0,
        http_client=http_client,
        **kwargs,
    )


def AsyncOpenAI(  # named like the class it stands in for
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    limiter: RateLimiter | None = None,
    rate_limit: bool = True,
    max_retries: int = 3,
    retry: RetryPolicy | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` for chatgate; the arguments are those of :func:`OpenAI`."""
    _no_http_client(kwargs)
    config = resolve_config(api_key, base_url)
    wrapped = AsyncTransport(
        transport if transport is not None else httpx.AsyncHTTPTransport(limits=DEFAULT_LIMITS),
        limiter=_pick_limiter(limiter, rate_limit, rpm, tpm),
        retry=retry or RetryPolicy(max_retries=max_retries),
    )
    http_client: Any = httpx.AsyncClient(transport=wrapped, timeout=timeout, follow_redirects=True)
    return _AsyncOpenAI(
        api_key=config.api_key,
        base_url=config.base_url,
        max_retries=0,
        http_client=http_client,
        **kwargs,
    )
