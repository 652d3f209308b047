"""httpx transports that wait for a :class:`~chatgate.client.RateLimiter` and retry.

:class:`Transport` (threads) and :class:`AsyncTransport` (asyncio) wrap another transport
(by default httpx's own) and work under any httpx client, so under the ``openai`` package
too, talking to chatgate or to any OpenAI-compatible server. For each request they:

1. book a slot in the limiter, sized by an estimate of the tokens it may use, and wait;
2. send it; bring the limiter in step with the answer's ``x-ratelimit-*`` headers;
3. on a retryable failure wait (``retry-after-ms`` / ``retry-after``, else exponential
   backoff with jitter and a cap) and go back to 1, at most ``max_retries`` times;
4. charge the limiter the real token usage read from the answer (JSON or SSE) as it passes.

The retry rules are two pure functions, :func:`should_retry` and :func:`retry_delay`.
Errors are not translated here: the answer the caller finally gets is the server's, so the
``openai`` package raises its own ``RateLimitError``, ``AuthenticationError``,
``APIConnectionError``, ... exactly as without this transport.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import httpx

from chatgate.client._limiter import Permit, RateLimiter

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "NEVER_RETRY_CODES",
    "RETRIES_HEADER",
    "AsyncTransport",
    "RetryPolicy",
    "Transport",
    "error_code",
    "estimate_tokens",
    "parse_retry_after",
    "retry_delay",
    "should_retry",
]

log = logging.getLogger("chatgate.client")

DEFAULT_COMPLETION_TOKENS = 4096
"""Completion tokens assumed for a request that sets no ``max_tokens``: what a chatgate server
reserves for one by default (``CHATGATE_DEFAULT_MAX_TOKENS``). A smaller guess let through
requests the server then refused (a client that had learned its tokens-per-minute limit still
collected 429s); the limiter books at most its whole token budget for one request."""
NEVER_RETRY_CODES = frozenset(
    {"insufficient_quota", "invalid_api_key", "expired_api_key", "model_not_allowed"}
)
"""Error codes (or types) that retrying cannot fix."""
RETRIES_HEADER = "x-chatgate-max-retries"
"""A request header that sets ``max_retries`` for that request alone; taken off before sending.

The ``openai`` clients of :mod:`chatgate.client` set it for ``with_options(max_retries=N)``.
"""
_MAX_ERROR_BODY = 1 << 20
_MAX_SNIFF_JSON = 8 << 20


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry; the defaults follow the ``openai`` package."""

    max_retries: int = 3
    initial_delay: float = 0.5  # first backoff, doubled each retry
    max_delay: float = 8.0  # backoff cap
    max_retry_after: float = 60.0  # a server asking to wait longer gets its error passed on


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, else ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date. ``None`` when absent or unreadable.
    """
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    text = headers.get("retry-after")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        try:
            at = email.utils.mktime_tz(parsed)
        except (ValueError, OverflowError):  # a date past 9999, a day 0: unreadable too
            return None
        return max(at - time.time(), 0.0)
    return value if math.isfinite(value) and value >= 0 else None


def should_retry(status: int | None, headers: Mapping[str, str], code: str | None = None) -> bool:
    """Whether an answer is worth another attempt.

    ``status`` is ``None`` when no answer came (a connection error or a timeout): retried.
    Never retried: 401/403 and the codes in :data:`NEVER_RETRY_CODES` (``insufficient_quota``
    above all: only a bigger plan fixes it). Otherwise ``x-should-retry: true|false`` decides
    when present, and 408, 409, 429 and 5xx are retried, as the ``openai`` package does.
    """
    if status is None:
        return True
    if status in (401, 403) or (code is not None and code in NEVER_RETRY_CODES):
        return False
    flag = headers.get("x-should-retry", "").strip().lower()
    if flag in ("true", "false"):
        return flag == "true"
    return status in (408, 409, 429) or status >= 500


def retry_delay(
    attempt: int,
    headers: Mapping[str, str] | None,
    policy: RetryPolicy,
    jitter: float,
) -> float | None:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    The server's ``retry-after-ms``/``retry-after`` when given, or ``None`` (do not retry)
    when it asks for more than ``policy.max_retry_after``. Otherwise
    ``min(initial_delay * 2**attempt, max_delay)`` reduced by up to 25% with ``jitter``
    in ``[0, 1)``, so clients that failed together do not retry together.
    """
    hinted = parse_retry_after(headers)
    if hinted is not None:
        return hinted if hinted <= policy.max_retry_after else None
    backoff = min(policy.initial_delay * 2.0 ** min(attempt, 64), policy.max_delay)
    return max(backoff * (1 - 0.25 * jitter), 0.0)


def error_code(body: bytes) -> str | None:
    """The ``error.code`` (else ``error.type``) of an OpenAI-shaped error body."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    for field in ("code", "type"):
        value = error.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def estimate_tokens(
    request: httpx.Request, default_completion: int = DEFAULT_COMPLETION_TOKENS
) -> int:
    """A generous guess of the tokens a request may use: prompt plus completions, as a
    chatgate server reserves them (``prompt + n * max_tokens``).

    The prompt is taken as a quarter of the JSON body's length (an over-estimate for
    English text); each of the ``n`` completions as ``max_tokens`` (or
    ``max_completion_tokens``, ``max_output_tokens``), else ``default_completion``. The real
    usage replaces it later.
    """
    if request.method != "POST" or "json" not in request.headers.get("content-type", ""):
        return 0
    content = request.content
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return 0
    if not isinstance(body, dict):
        return 0
    prompt = len(content) // 4 + 1
    if request.url.path.endswith("/embeddings"):
        return prompt
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return prompt + choices * value
    return prompt + choices * default_completion


class _UsageSniffer:
    """Finds ``usage.total_tokens`` in a JSON body or an SSE stream as it passes by."""

    def __init__(self, content_type: str) -> None:
        self._sse = content_type.startswith("text/event-stream")
        self._buffer = bytearray()
        self.total: int | None = None

    def feed(self, chunk: bytes) -> None:
        if not self._sse:
            if len(self._buffer) + len(chunk) <= _MAX_SNIFF_JSON:
                self._buffer += chunk
            return
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if line.startswith(b"data:") and b'"usage"' in line:
                self._note(line[5:])

    def finish(self) -> int | None:
        if not self._sse:
            self._note(bytes(self._buffer))
        elif self._buffer.strip().startswith(b"data:"):
            self._note(bytes(self._buffer).strip()[5:])
        self._buffer.clear()
        return self.total

    def _note(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(data, dict):
            return
        usage = data.get("usage")
        if not isinstance(usage, dict) and isinstance(data.get("response"), dict):
            usage = data["response"].get("usage")  # /v1/responses stream: response.completed
        if isinstance(usage, dict):
            total = usage.get("total_tokens")
            if isinstance(total, int) and not isinstance(total, bool):
                self.total = total


class _MeteredStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Passes the body through unchanged; at close, charges the limiter the usage it saw."""

    def __init__(
        self,
        inner: httpx.SyncByteStream | httpx.AsyncByteStream,
        sniffer: _UsageSniffer,
        done: Callable[[int | None], None],
    ) -> None:
        self._inner = inner
        self._sniffer = sniffer
        self._done: Callable[[int | None], None] | None = done

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(self._sniffer.finish())

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._inner, httpx.SyncByteStream)
        for chunk in self._inner:
            self._sniffer.feed(chunk)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._inner, httpx.AsyncByteStream)
        async for chunk in self._inner:
            self._sniffer.feed(chunk)
            yield chunk

    def close(self) -> None:
        try:
            if isinstance(self._inner, httpx.SyncByteStream):
                self._inner.close()
        finally:
            self._finish()

    async def aclose(self) -> None:
        try:
            if isinstance(self._inner, httpx.AsyncByteStream):
                await self._inner.aclose()
        finally:
            self._finish()


class _Core:
    """What both transports share: the decisions, none of the I/O."""

    def __init__(
        self,
        limiter: RateLimiter | None,
        retry: RetryPolicy | None,
        estimate: Callable[[httpx.Request], int],
        rng: Callable[[], float],
    ) -> None:
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.estimate = estimate
        self.rng = rng

    def cost(self, request: httpx.Request) -> int:
        if self.limiter is None or not self.limiter.counts_tokens:
            return 0
        return self.estimate(request)

    def policy(self, request: httpx.Request) -> RetryPolicy:
        """The retry policy of ``request``: this transport's, or its :data:`RETRIES_HEADER`'s.

        The header is taken off the request either way: it is never sent. A value that is not
        a whole number from 0 up is ignored (the SDK's ``with_options`` refuses those first).
        """
        text = request.headers.pop(RETRIES_HEADER, None)
        if text is None:
            return self.retry
        try:
            count = int(text)
        except ValueError:
            return self.retry
        return replace(self.retry, max_retries=count) if count >= 0 else self.retry

    def after_connection_error(
        self, exc: httpx.TransportError, permit: Permit | None, attempt: int, policy: RetryPolicy
    ) -> float | None:
        """Seconds to wait before retrying after ``exc``, or ``None`` to raise it."""
        if permit is not None and self.limiter is not None:
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                self.limiter.cancel(permit)  # it never reached the server
            else:
                self.limiter.settle(permit, 0)
        if attempt >= policy.max_retries or not should_retry(None, {}):
            return None
        delay = retry_delay(attempt, None, policy, self.rng())
        log.info(
            "%s; retry %d/%d in %.2fs",
            type(exc).__name__,
            attempt + 1,
            policy.max_retries,
            delay or 0.0,
        )
        return delay

    def after_error_status(
        self,
        response: httpx.Response,
        body: bytes,
        permit: Permit | None,
        attempt: int,
        policy: RetryPolicy,
    ) -> float | None:
        """Seconds to wait before retrying an error answer, or ``None`` to return it."""
        status, headers = response.status_code, response.headers
        code = error_code(body)
        if self.limiter is not None:
            pause = None
            if status == 429 and code not in NEVER_RETRY_CODES:
                pause = parse_retry_after(headers)
            self.limiter.observe(headers, permit=permit, retry_after=pause)
            if permit is not None:
                self.limiter.settle(permit, 0)  # refused: the server charged no tokens
        if attempt >= policy.max_retries or not should_retry(status, headers, code):
            return None
        delay = retry_delay(attempt, headers, policy, self.rng())
        if delay is None:
            log.info("status %d, the server asks to wait too long: not retrying", status)
            return None
        log.info(
            "status %d (%s); retry %d/%d in %.2fs",
            status,
            code or "-",
            attempt + 1,
            policy.max_retries,
            delay,
        )
        return delay

    def success(self, response: httpx.Response, permit: Permit | None) -> httpx.Response:
        """Observe a good answer; meter its token usage as the body streams by."""
        limiter = self.limiter
        if limiter is None or permit is None:
            return response
        limiter.observe(response.headers, permit=permit)
        content_type = response.headers.get("content-type", "")
        if (
            not limiter.counts_tokens
            or response.headers.get("content-encoding", "identity") != "identity"
            or not content_type.startswith(("application/json", "text/event-stream"))
        ):
            return response  # nothing to meter: the headers alone keep the budget in step

        def done(total: int | None) -> None:
            if total is not None:
                limiter.settle(permit, total)

        sniffer = _UsageSniffer(content_type)
        stream = _MeteredStream(response.stream, sniffer, done)
        return _rebuilt(response, stream)


def _rebuilt(
    response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=response.extensions,
    )


def _with_body(response: httpx.Response, raw: bytes) -> tuple[httpx.Response, bytes]:
    """``response`` again, its raw body buffered; and the body decoded (gzip and the like)."""
    probe = httpx.Response(response.status_code, headers=response.headers, content=raw)
    try:
        decoded = probe.read()
    except httpx.DecodingError:
        decoded = b""
    return _rebuilt(response, httpx.ByteStream(raw)), decoded


class Transport(httpx.BaseTransport):
    """Rate limiting and retries around another sync transport (default: httpx's own).

    ``limiter=None`` turns limiting off (retries only); ``retry=RetryPolicy(max_retries=0)``
    turns retries off. ``estimate`` sizes a request in tokens for the token budget.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        limiter: RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        estimate: Callable[[httpx.Request], int] = estimate_tokens,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._inner = transport if transport is not None else httpx.HTTPTransport()
        self._core = _Core(limiter, retry, estimate, rng)
        self._sleep = sleep

    @property
    def limiter(self) -> RateLimiter | None:
        """The limiter this transport waits for (``None`` when limiting is off)."""
        return self._core.limiter

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` when the limiter allows, retrying per the policy."""
        core = self._core
        request.read()  # a body sent more than once must be in memory
        policy = core.policy(request)
        cost = core.cost(request)
        attempt = 0
        while True:
            permit = core.limiter.acquire(cost) if core.limiter is not None else None
            try:
                response = self._inner.handle_request(request)
            except httpx.TransportError as exc:
                delay = core.after_connection_error(exc, permit, attempt, policy)
                if delay is None:
                    raise
            else:
                if response.status_code < 400:
                    return core.success(response, permit)
                response, body = self._buffer(response)
                delay = core.after_error_status(response, body, permit, attempt, policy)
                if delay is None:
                    return response
            attempt += 1
            if delay > 0:
                self._sleep(delay)

    def _buffer(self, response: httpx.Response) -> tuple[httpx.Response, bytes]:
        assert isinstance(response.stream, httpx.SyncByteStream)
        try:
            raw = b"".join(_capped(iter(response.stream)))
        finally:
            response.stream.close()
        return _with_body(response, raw)

    def close(self) -> None:
        """Close the wrapped transport."""
        self._inner.close()


class AsyncTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`Transport`; one limiter may serve both kinds."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        limiter: RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        estimate: Callable[[httpx.Request], int] = estimate_tokens,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._core = _Core(limiter, retry, estimate, rng)

    @property
    def limiter(self) -> RateLimiter | None:
        """The limiter this transport waits for (``None`` when limiting is off)."""
        return self._core.limiter

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` when the limiter allows, retrying per the policy."""
        core = self._core
        await request.aread()
        policy = core.policy(request)
        cost = core.cost(request)
        attempt = 0
        while True:
            permit = await core.limiter.aacquire(cost) if core.limiter is not None else None
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as exc:
                delay = core.after_connection_error(exc, permit, attempt, policy)
                if delay is None:
                    raise
            except asyncio.CancelledError:
                if permit is not None and core.limiter is not None:
                    core.limiter.settle(permit, 0)
                raise
            else:
                if response.status_code < 400:
                    return core.success(response, permit)
                response, body = await self._buffer(response)
                delay = core.after_error_status(response, body, permit, attempt, policy)
                if delay is None:
                    return response
            attempt += 1
            if delay > 0:
                await asyncio.sleep(delay)

    async def _buffer(self, response: httpx.Response) -> tuple[httpx.Response, bytes]:
        assert isinstance(response.stream, httpx.AsyncByteStream)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.stream:
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_ERROR_BODY:
                    break
        finally:
            await response.stream.aclose()
        return _with_body(response, b"".join(chunks))

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._inner.aclose()


def _capped(chunks: Iterator[bytes]) -> Iterator[bytes]:
    size = 0
    for chunk in chunks:
        yield chunk
        size += len(chunk)
        if size > _MAX_ERROR_BODY:
            return
