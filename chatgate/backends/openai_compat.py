"""Backend for any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp server).

One backend instance per deployment (the router makes them), each with its own pooled
``aiohttp.ClientSession`` and :class:`~chatgate.backends.deployment.Timeouts`:

* ``connect``: aiohttp's connect timeout;
* ``first_byte``: an ``asyncio`` deadline around sending the request and reading the headers
  (for a stream, the watchdog below extends it to the first event);
* ``idle`` and ``total``: for a non-streamed answer, one deadline on reading the body; for a
  stream, one watchdog timer per stream that re-arms itself lazily (at most once per idle
  period, never per chunk) and closes the upstream response when a limit passes, which ends the
  relay with an SSE ``upstream_timeout`` error event.

Streams are passed through event by event, never buffered whole; ``stream_options.include_usage``
is always asked of the upstream so usage can be metered, and the usage-only chunk is dropped when
the client did not ask for it. Upstream HTTP errors map to the error tree
(:func:`upstream_status_error`); every message names the public model, never a URL or a key.

Error classes added here (subclasses of the tree in :mod:`chatgate.errors`, same status/code)::

    UpstreamError (502)
    ├── UpstreamUnreachable       connect refused/reset, DNS, TLS
    └── UpstreamStatusError       an unexpected upstream status (5xx, 401, 403, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Literal

import aiohttp
import orjson

from chatgate import errors
from chatgate.backends import http1
from chatgate.backends.base import Backend, ChatResult, ChatStream, Usage
from chatgate.backends.deployment import ProbeResult, Timeouts
from chatgate.settings import ModelConfig, Settings

DONE_EVENT = b"data: [DONE]\n\n"
_UNPARSED_MAX = 256  # events held before their text is extracted anyway
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_CRLF = re.compile(rb"\r\n|\r")


def split_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events in ``data`` (each ending in a blank line), and the rest.

    Events come out normalised to ``\n`` line ends and one ``\n\n`` at the end; blank
    lines between events are skipped.
    """
    hold = b""
    if b"\r" in data:
        if data.endswith(b"\r"):  # maybe half of a \r\n: decide with the next read
            data, hold = data[:-1], b"\r"
        data = _CRLF.sub(b"\n", data)
    parts = data.split(b"\n\n")
    rest = parts.pop()
    events = [part.lstrip(b"\n") + b"\n\n" for part in parts if part.strip(b"\n")]
    return events, (rest if rest.strip(b"\n") else b"") + hold


_SLACK = 0.001  # timer handles may fire up to the loop's clock resolution early

Phase = Literal["connect", "first_byte", "idle", "total"]


class UpstreamUnreachable(errors.UpstreamError):
    """No connection to the upstream (refused, reset, DNS, TLS): 502, retried elsewhere."""


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


class OpenAICompatBackend(Backend):
    """Forwards requests to ``ModelConfig.base_url`` with the key named by ``api_key_env``."""

    name = "openai_compat"

    def __init__(self, settings: Settings, timeouts: Timeouts | None = None) -> None:
        self._settings = settings
        self.timeouts = timeouts or Timeouts.defaults(settings)
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # streams and probes
        self._pools: dict[str, http1.Pool] = {}  # whole answers (see chatgate.backends.http1)
        # The connection cap of each upstream, shared by its streams and its whole answers.
        self._caps: dict[str, asyncio.Semaphore] = {}
        self._heads: dict[tuple[str, str, str | None], bytes] = {}
        # Only the connect phase is left to aiohttp; the others are deadlines of our own.
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeouts.connect, sock_connect=self.timeouts.connect
        )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _session(self, base_url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base_url)
        if session is None:
            # No cap of aiohttp's own: streams take a slot of ``_cap`` for their lifetime.
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                # No cookie jar: an upstream's Set-Cookie would otherwise be sent back on every
                # later request to it, whoever's (state shared across accounts).
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._client_timeout,
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[base_url] = session
        return session

    def _headers(self, model: ModelConfig) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if model.api_key_env:
            secret = self._settings.upstream_keys.get(model.api_key_env)
            if secret:
                headers["Authorization"] = "Bearer " + secret.reveal()
        return headers

    def _cap(self, base_url: str) -> asyncio.Semaphore | None:
        """At most ``upstream_max_connections`` to this upstream at once (0: no cap), streams
        and whole answers together; waiting for a slot counts in the connect timeout."""
        limit = self._settings.upstream_max_connections
        if limit <= 0:
            return None
        cap = self._caps.get(base_url)
        if cap is None:
            cap = self._caps[base_url] = asyncio.Semaphore(limit)
        return cap

    async def _open(
        self, model: ModelConfig, path: str, body: dict[str, Any], started: float
    ) -> aiohttp.ClientResponse:
        """POST and wait for a 2xx's headers within the first-byte deadline; map failures.

        The body is left to the caller (a stream), and with it the connection-cap slot this
        takes (the stream frees it when it ends).
        """
        t = self.timeouts
        cap = self._cap(model.base_url)
        if cap is not None:
            try:
                async with asyncio.timeout(t.connect):
                    await cap.acquire()
            except TimeoutError as exc:
                raise timeout_error(model, "connect", t.connect) from exc
        try:
            return await self._post_for_stream(model, path, body, started)
        except BaseException:
            if cap is not None:
                cap.release()
            raise

    async def _post_for_stream(
        self, model: ModelConfig, path: str, body: dict[str, Any], started: float
    ) -> aiohttp.ClientResponse:
        """:meth:`_open`'s request. An error's body is read within ``total`` under the same
        timer, rescheduled (one timer per request, not one per phase)."""
        t = self.timeouts
        session = self._session(model.base_url)
        phase: Phase = "first_byte"
        try:
            async with asyncio.timeout_at(started + min(t.first_byte, t.total)) as deadline:
                resp = await session.post(
                    model.base_url + path, data=orjson.dumps(body), headers=self._headers(model)
                )
                if resp.status < 400:
                    return resp
                deadline.reschedule(started + t.total)
                phase = "total"
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
        except aiohttp.ConnectionTimeoutError as exc:
            raise timeout_error(model, "connect", t.connect) from exc
        except TimeoutError as exc:
            limit = t.total if phase == "total" else min(t.first_byte, t.total)
            raise timeout_error(model, phase, limit) from exc
        except aiohttp.ClientError as exc:
            happened = "could not be reached" if phase == "first_byte" else "broke the connection"
            raise UpstreamUnreachable(f"The upstream for model `{model.name}` {happened}.") from exc
        raise self._status_error(model, resp.status, raw, resp.headers)

    def _status_error(
        self, model: ModelConfig, status: int, raw: bytes, headers: Any
    ) -> errors.APIError:
        secret = self._settings.upstream_keys.get(model.api_key_env or "")
        return upstream_status_error(
            model, status, raw, headers, secret.reveal() if secret else None
        )

    def _pool(self, base_url: str) -> http1.Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = http1.Pool(
                base_url, slots=self._cap(base_url), connect_timeout=self.timeouts.connect
            )
        return pool

    def _head(self, model: ModelConfig, path: str) -> bytes:
        """The request head of ``path`` for ``model`` (its upstream key), built once."""
        key = (model.base_url, path, model.api_key_env)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._pool(model.base_url).head(path, self._headers(model))
        return head

    async def _json(self, model: ModelConfig, path: str, body: dict[str, Any]) -> tuple[Any, bytes]:
        """A non-streamed call: the decoded answer and its raw bytes.

        The answer's status line must arrive within the first-byte deadline, the whole answer
        within ``total`` (deadlines the pool keeps on the connection: see :mod:`.http1`).
        """
        t = self.timeouts
        pool, head = self._pool(model.base_url), self._head(model, path)
        started = asyncio.get_running_loop().time()
        first_byte_limit = min(t.first_byte, t.total)
        try:
            answer = await pool.post(
                head, orjson.dumps(body), started + first_byte_limit, started + t.total
            )
        except http1.ConnectTimeout as exc:
            raise timeout_error(model, "connect", t.connect) from exc
        except http1.AnswerTimeout as exc:
            limit = t.total if exc.phase == "total" else first_byte_limit
            raise timeout_error(model, exc.phase, limit) from exc
        except http1.UpstreamConnectionError as exc:
            happened = "broke the connection" if exc.answered else "could not be reached"
            raise UpstreamUnreachable(f"The upstream for model `{model.name}` {happened}.") from exc
        raw = answer.body
        if answer.status >= 400:
            raise self._status_error(model, answer.status, raw, answer.headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            ) from exc
        if not isinstance(data, dict):
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            )
        return data, raw

    async def chat(self, model: ModelConfig, body: dict[str, Any]) -> ChatResult:
        data, raw = await self._json(model, "/chat/completions", body)
        return ChatResult(data, Usage.from_openai(data.get("usage")), raw)

    async def chat_stream(
        self, model: ModelConfig, body: dict[str, Any], *, include_usage: bool
    ) -> ChatStream:
        body = dict(body)
        body["stream"] = True
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
        started = asyncio.get_running_loop().time()
        resp = await self._open(model, "/chat/completions", body, started)
        cap = self._cap(model.base_url)
        return SSEPassThrough(
            resp,
            model,
            include_usage=include_usage,
            timeouts=self.timeouts,
            started=started,
            on_done=None if cap is None else cap.release,
        )

    async def embeddings(self, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        data, _ = await self._json(model, "/embeddings", body)
        result: dict[str, Any] = data
        return result

    async def probe(self, model: ModelConfig) -> ProbeResult:
        """``GET /models`` within the connect and first-byte limits: reachable, key accepted?"""
        t = self.timeouts
        session = self._session(model.base_url)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(min(t.first_byte, t.total)):
                async with session.get(
                    model.base_url + "/models", headers=self._headers(model)
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
        except TimeoutError:
            return ProbeResult(False, "timed out")
        except aiohttp.ClientError:
            return ProbeResult(False, "unreachable")
        latency = round((time.perf_counter() - began) * 1000, 1)
        if status in (401, 403):
            return ProbeResult(False, f"key rejected ({status})", latency, status)
        if status >= 500:
            return ProbeResult(False, f"upstream error ({status})", latency, status)
        if status != 200:
            return ProbeResult(True, f"reachable ({status} on /models)", latency, status)
        listed = None
        try:
            data = orjson.loads(raw).get("data")
            if isinstance(data, list):
                ids = {m.get("id") for m in data if isinstance(m, dict)}
                listed = model.upstream_model in ids
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return ProbeResult(True, "ok", latency, status, listed)


class SSEPassThrough(ChatStream):
    """Relays an upstream SSE response event by event, noting usage and generated text.

    A transport failure or a passed time limit ends the relay with one
    ``data: {"error": ...}`` event; ``failure`` then holds that error (the router uses it to
    retry when nothing has reached the client yet).
    """

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        model: ModelConfig,
        *,
        include_usage: bool,
        timeouts: Timeouts | None = None,
        started: float | None = None,
        on_done: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        self._resp = resp
        self._on_done = on_done  # called once, when the response is let go
        self._model = model
        self._include_usage = include_usage
        self.failure: errors.APIError | None = None
        self._iterator: AsyncGenerator[bytes, None] | None = None
        self._ready: deque[bytes] = deque()  # events split from the last read, not yet relayed
        self._unparsed: list[bytes] = []  # events whose text is not extracted yet
        self._loop = asyncio.get_running_loop()
        self._timeouts = timeouts
        self._reading_since: float | None = None  # loop time a read of the upstream began
        self._expired: Phase | None = None
        self._timer: asyncio.TimerHandle | None = None
        if timeouts is not None:
            begin = self._loop.time() if started is None else started
            self._first_at = begin + min(timeouts.first_byte, timeouts.total)
            self._total_at = begin + timeouts.total
            self._timer = self._loop.call_at(self._deadline()[0], self._check)

    # -- the watchdog: one timer per stream, re-armed lazily ------------------------------------

    def _deadline(self) -> tuple[float, Phase]:
        """The next instant a limit may pass, and which limit that is."""
        assert self._timeouts is not None
        phase: Phase
        if self.first_byte_at is None:
            when, phase = self._first_at, "first_byte"
        elif self._reading_since is not None:
            when, phase = self._reading_since + self._timeouts.idle, "idle"
        else:  # the client is slow to take events: that is not the upstream's idleness
            when, phase = self._loop.time() + self._timeouts.idle, "idle"
        if self._total_at <= when:
            return self._total_at, "total"
        return when, phase

    def _check(self) -> None:
        self._timer = None
        when, phase = self._deadline()
        if self._loop.time() + _SLACK >= when:
            self._expired = phase
            self._resp.close()  # the pending read raises ClientConnectionError
        else:
            self._timer = self._loop.call_at(when, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> errors.UpstreamTimeout:
        assert self._timeouts is not None and self._expired is not None
        limits = {
            "first_byte": min(self._timeouts.first_byte, self._timeouts.total),
            "idle": self._timeouts.idle,
            "total": self._timeouts.total,
            "connect": self._timeouts.connect,
        }
        return timeout_error(self._model, self._expired, limits[self._expired])

    # -- relaying ---------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    @property
    def buffered(self) -> bool:
        """True when the next event is already in hand (the relay may batch its writes)."""
        return bool(self._ready)

    async def _events(self) -> AsyncGenerator[bytes, None]:
        # The upstream is read in whatever chunks arrive (not line by line): one read often
        # holds many events, which are split here and handed out one at a time from
        # ``_ready``, so the relay can write them to the client together (``buffered``).
        rest = b""
        ready = self._ready
        read = self._resp.content.readany
        clock = self._loop.time
        try:
            while True:
                # Idle time counts only while we wait for the upstream, not for the client.
                self._reading_since = clock()
                chunk = await read()
                self._reading_since = None
                if not chunk:
                    break
                events, rest = split_events(rest + chunk if rest else chunk)
                for event in events:
                    if self._keep(event):
                        ready.append(event)
                while ready:
                    if self.first_byte_at is None:
                        self.first_byte_at = time.perf_counter()
                    yield ready.popleft()
            if rest.strip():
                event = rest if rest.endswith(b"\n") else rest + b"\n"
                if self._keep(event + b"\n"):
                    yield event + b"\n"
        except (TimeoutError, aiohttp.ClientError):
            if self._expired is not None:
                self.failure = self._timeout()
            else:
                self.failure = errors.UpstreamError(
                    f"The upstream for model `{self._model.name}` broke off the stream."
                )
            ready.clear()
            yield b"data: " + self.failure.body() + b"\n\n"
        finally:
            self._reading_since = None
            self._stop_timer()
            self._resp.release()
            self._done()

    def _keep(self, event: bytes) -> bool:
        """Note usage and text of one event; False for a usage-only chunk nobody asked for.

        Only an event that carries a usage object is parsed here; the others are kept as
        they are and parsed for their text only if it is ever asked for (a stream cut off
        before its usage came: :attr:`completion_text`), so a normal stream parses one
        event, not every one.
        """
        if not event.startswith(b"data: {"):
            return True
        if len(self._unparsed) >= _UNPARSED_MAX:
            self._parse_text()  # a long stream: keep memory flat, parse what is held
        self._unparsed.append(event)
        if b'"usage"' not in event or _NULL_USAGE.search(event):
            return True
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        usage = Usage.from_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        if chunk.get("choices"):
            return True
        if usage is not None and not self._include_usage:
            self._unparsed.pop()  # dropped: nothing in it to count
            return False
        return True

    @property
    def completion_text(self) -> str:
        """The text generated so far (content and tool-call arguments)."""
        self._parse_text()
        return "".join(self._text)

    def _parse_text(self) -> None:
        for event in self._unparsed:
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if not choices or not isinstance(choices[0], dict):
                continue
            delta = choices[0].get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                self._text.append(content)
            for call in delta.get("tool_calls") or ():
                args = (call.get("function") or {}).get("arguments")
                if isinstance(args, str):
                    self._text.append(args)
        self._unparsed.clear()

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    async def aclose(self) -> None:
        self._stop_timer()
        self._resp.close()
        self._done()
        if self._iterator is not None:
            # Runs the relay's cleanup now; a RuntimeError means another task is inside it,
            # and it ends by itself since the response is closed.
            with contextlib.suppress(RuntimeError):
                await self._iterator.aclose()


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
    except ValueError:
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
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = data["error"].get("message")
    except orjson.JSONDecodeError:
        pass
    if status == 429:
        hint = _retry_hint(headers)
        when = " Please try again later."
        if "retry-after-ms" in hint:  # a number of seconds, not an HTTP date
            when = f" Please try again in {hint['retry-after']}s."
        return errors.RateLimited(
            f"The upstream for model `{model.name}` is rate limited.{when}",
            headers=hint,
            type="requests",
        )
    if status in (400, 404, 422) and isinstance(message, str):
        safe = scrub_upstream_text(message[:500], secret)
        return errors.InvalidRequest(f"Upstream rejected the request: {safe}")
    if status == 408:
        return errors.UpstreamTimeout(f"The upstream for model `{model.name}` timed out.")
    return UpstreamStatusError(
        f"The upstream for model `{model.name}` answered with status {status}.",
        upstream_status=status,
    )


__all__ = [
    "OpenAICompatBackend",
    "SSEPassThrough",
    "UpstreamStatusError",
    "UpstreamUnreachable",
    "scrub_upstream_text",
    "timeout_error",
    "upstream_status_error",
]
