"""Backend for any OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp server).

One pooled ``aiohttp.ClientSession`` per upstream base URL. Streams are passed through event
by event, never buffered whole; ``stream_options.include_usage`` is always asked of the upstream
so usage can be metered, and the usage-only chunk is dropped when the client did not ask for it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from chatgate import errors
from chatgate.backends.base import Backend, ChatResult, ChatStream, Usage
from chatgate.settings import ModelConfig, Settings

DONE_EVENT = b"data: [DONE]\n\n"


class OpenAICompatBackend(Backend):
    """Forwards requests to ``ModelConfig.base_url`` with the key named by ``api_key_env``."""

    name = "openai_compat"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=settings.upstream_timeout, sock_connect=settings.upstream_connect_timeout
        )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    def _session(self, base_url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base_url)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
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

    async def _post(
        self, model: ModelConfig, path: str, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        session = self._session(model.base_url)
        try:
            resp = await session.post(
                model.base_url + path, data=orjson.dumps(body), headers=self._headers(model)
            )
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(
                f"The upstream for model `{model.name}` timed out."
            ) from exc
        except aiohttp.ClientError as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` could not be reached."
            ) from exc
        if resp.status >= 400:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            raise upstream_status_error(model, resp.status, raw, resp.headers)
        return resp

    async def chat(self, model: ModelConfig, body: dict[str, Any]) -> ChatResult:
        resp = await self._post(model, "/chat/completions", body)
        try:
            raw = await resp.read()
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(
                f"The upstream for model `{model.name}` timed out."
            ) from exc
        except aiohttp.ClientError as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` broke the connection."
            ) from exc
        finally:
            resp.release()
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
        return ChatResult(data, Usage.from_openai(data.get("usage")), raw)

    async def chat_stream(
        self, model: ModelConfig, body: dict[str, Any], *, include_usage: bool
    ) -> ChatStream:
        body = dict(body)
        body["stream"] = True
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
        resp = await self._post(model, "/chat/completions", body)
        return SSEPassThrough(resp, model, include_usage=include_usage)

    async def embeddings(self, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self._post(model, "/embeddings", body)
        try:
            data = orjson.loads(await resp.read())
        except (orjson.JSONDecodeError, aiohttp.ClientError) as exc:
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            ) from exc
        finally:
            resp.release()
        if not isinstance(data, dict):
            raise errors.UpstreamError(
                f"The upstream for model `{model.name}` sent an invalid answer."
            )
        return data


class SSEPassThrough(ChatStream):
    """Relays an upstream SSE response event by event, noting usage and generated text."""

    def __init__(
        self, resp: aiohttp.ClientResponse, model: ModelConfig, *, include_usage: bool
    ) -> None:
        super().__init__()
        self._resp = resp
        self._model = model
        self._include_usage = include_usage

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        pending: list[bytes] = []
        try:
            async for line in self._resp.content:
                if line in (b"\n", b"\r\n"):
                    if pending:
                        event = b"".join(pending) + b"\n"
                        pending.clear()
                        if self._keep(event):
                            if self.first_byte_at is None:
                                self.first_byte_at = time.perf_counter()
                            yield event
                    continue
                pending.append(line if line.endswith(b"\n") else line + b"\n")
            if pending:
                event = b"".join(pending) + b"\n"
                if self._keep(event):
                    yield event
        except (TimeoutError, aiohttp.ClientError):
            err = errors.UpstreamError(
                f"The upstream for model `{self._model.name}` broke off the stream."
            )
            yield b"data: " + err.body() + b"\n\n"
        finally:
            self._resp.release()

    def _keep(self, event: bytes) -> bool:
        """Note usage and text of one event; False for a usage-only chunk nobody asked for."""
        if not event.startswith(b"data: {"):
            return True
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return True
        usage = Usage.from_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        if choices:
            delta = choices[0].get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                self._text.append(content)
            for call in delta.get("tool_calls") or ():
                args = (call.get("function") or {}).get("arguments")
                if isinstance(args, str):
                    self._text.append(args)
            return True
        return usage is None or self._include_usage

    async def aclose(self) -> None:
        self._resp.close()


def upstream_status_error(
    model: ModelConfig, status: int, raw: bytes, headers: Any
) -> errors.APIError:
    """Map an upstream HTTP error to ours: 429 stays 429, client errors pass, the rest is 502."""
    message = None
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = data["error"].get("message")
    except orjson.JSONDecodeError:
        pass
    if status == 429:
        retry = headers.get("retry-after")
        hint = {"retry-after": retry} if retry else {}
        return errors.RateLimited(
            f"The upstream for model `{model.name}` is rate limited. Please try again later.",
            headers=hint,
            type="requests",
        )
    if status in (400, 404, 422) and isinstance(message, str):
        return errors.InvalidRequest(f"Upstream rejected the request: {message[:500]}")
    if status == 408:
        return errors.UpstreamTimeout(f"The upstream for model `{model.name}` timed out.")
    return errors.UpstreamError(
        f"The upstream for model `{model.name}` answered with status {status}."
    )
