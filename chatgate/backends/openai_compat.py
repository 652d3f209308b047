"""Backend for any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp server).

One backend instance per deployment (the router makes them), each with its own
:class:`~chatgate.backends.deployment.Timeouts` and, per upstream base URL:

* chat completions (whole and streamed) and embeddings: a :class:`~chatgate.backends.http1.Pool`
  of keep-alive connections; the first-byte and total deadlines are one timer on the
  connection until the answer's headers, and a stream's body is then timed by its watchdog
  (:mod:`.sse`: first event, idle, total);
* probes (``GET /models``, rare): a pooled ``aiohttp.ClientSession``;
* the connection cap (``upstream_max_connections``): the pool's slots, held by a request
  until its answer is in, or by a stream until it ends.

Upstream HTTP errors map to the error tree (:mod:`.upstream_errors`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from chatgate import errors
from chatgate.backends import http1
from chatgate.backends.base import Backend, ChatResult, ChatStream, Usage
from chatgate.backends.deployment import ProbeResult, Timeouts
from chatgate.backends.sse import SSEPassThrough
from chatgate.backends.upstream_errors import (
    UpstreamUnreachable,
    timeout_error,
    upstream_status_error,
)
from chatgate.settings import ModelConfig, Settings


class OpenAICompatBackend(Backend):
    """Forwards requests to ``ModelConfig.base_url`` with the key named by ``api_key_env``."""

    name = "openai_compat"

    def __init__(
        self,
        settings: Settings,
        timeouts: Timeouts | None = None,
        caps: dict[str, asyncio.Semaphore] | None = None,
    ) -> None:
        self._settings = settings
        self.timeouts = timeouts or Timeouts.defaults(settings)
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # probes
        self._pools: dict[str, http1.Pool] = {}  # answers and streams (chatgate.backends.http1)
        # The connection cap of each upstream: its pool's slots, held by answers and streams;
        # ``caps`` shares them with the other backends (deployments) of the process.
        self._caps: dict[str, asyncio.Semaphore] = {} if caps is None else caps
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
            # No cap: a probe (rare, an admin's) takes no slot of ``_cap``.
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
                base_url,
                slots=self._cap(base_url),
                connect_timeout=self.timeouts.connect,
                max_answer=self._settings.upstream_max_answer_bytes,
            )
        return pool

    def _head(self, model: ModelConfig, path: str) -> bytes:
        """The request head of ``path`` for ``model`` (its upstream key), built once."""
        key = (model.base_url, path, model.api_key_env)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._pool(model.base_url).head(path, self._headers(model))
        return head

    async def _send(
        self, model: ModelConfig, path: str, body: dict[str, Any], started: float, stream: bool
    ) -> http1.Answer | http1.StreamBody:
        """POST ``body``: the whole answer, or (``stream``) a 2xx's body as it arrives; a
        failure to reach the upstream or a passed deadline as chatgate's error.

        The status line must arrive within the first-byte deadline, a whole answer within
        ``total`` (deadlines the pool keeps on the connection: see :mod:`.http1`; a stream's
        body is then timed by its watchdog, :mod:`.sse`). An error status comes whole,
        also for a stream.
        """
        t = self.timeouts
        pool, head = self._pool(model.base_url), self._head(model, path)
        first_byte_limit = min(t.first_byte, t.total)
        send = pool.open if stream else pool.post
        try:
            return await send(
                head, orjson.dumps(body), started + first_byte_limit, started + t.total
            )
        except http1.ConnectTimeout as exc:
            raise timeout_error(model, "connect", t.connect) from exc
        except http1.AnswerTimeout as exc:
            limit = t.total if exc.phase == "total" else first_byte_limit
            raise timeout_error(model, exc.phase, limit) from exc
        except http1.AnswerTooLarge as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an answer larger than chatgate "
                f"relays ({exc.limit:,} bytes)."
            ) from exc
        except http1.UpstreamConnectionError as exc:
            if exc.answered:
                happened = "broke the connection"
            elif exc.sent:
                happened = "closed the connection before answering"
            else:
                happened = "could not be reached"
            raise UpstreamUnreachable(
                f"The upstream for model `{model.name}` {happened}.",
                reason="broken" if exc.sent else "connect",
            ) from exc

    async def _json(
        self, model: ModelConfig, path: str, body: dict[str, Any], listed: str
    ) -> tuple[Any, bytes]:
        """A non-streamed call: the decoded answer and its raw bytes. An answer is a JSON
        object with a list in its field ``listed`` (``choices``, ``data``); anything else is
        not relayed as if it were one."""
        started = asyncio.get_running_loop().time()
        answer = await self._send(model, path, body, started, False)
        assert isinstance(answer, http1.Answer)
        raw = answer.body
        if answer.status >= 300:  # an error, or a redirect (not followed: a POST)
            raise self._status_error(model, answer.status, raw, answer.headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            ) from exc
        if isinstance(data, dict) and data.get("error"):
            # An error with a 200 (some servers and proxies): no answer.
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` answered with an error."
            )
        if not isinstance(data, dict) or not isinstance(data.get(listed), list):
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            )
        return data, raw

    async def chat(self, model: ModelConfig, body: dict[str, Any]) -> ChatResult:
        data, raw = await self._json(model, "/chat/completions", body, "choices")
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
        answer = await self._send(model, "/chat/completions", body, started, True)
        if isinstance(answer, http1.Answer):  # an error status: it came whole
            raise self._status_error(model, answer.status, answer.body, answer.headers)
        if answer.headers.get("content-type", "").startswith("application/json"):
            # No stream (``stream`` ignored, or an error with a 200): nothing to relay.
            answer.close()
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` did not answer with a stream."
            )
        return SSEPassThrough(
            answer, model, include_usage=include_usage, timeouts=self.timeouts, started=started
        )

    async def embeddings(self, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        data, _ = await self._json(model, "/embeddings", body, "data")
        result: dict[str, Any] = data
        return result

    async def probe(self, model: ModelConfig) -> ProbeResult:
        """``GET /models`` within the connect and first-byte limits: reachable, key accepted?"""
        t = self.timeouts
        session = self._session(model.base_url)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(min(t.first_byte, t.total)):
                # Not followed, as the chat calls do not follow one (a POST): a redirect here
                # is a deployment no call reaches.
                async with session.get(
                    model.base_url + "/models", headers=self._headers(model), allow_redirects=False
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
        if 300 <= status < 400:
            return ProbeResult(False, f"redirected ({status}): calls are not", latency, status)
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


__all__ = ["OpenAICompatBackend"]
