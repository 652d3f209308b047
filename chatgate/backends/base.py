"""The Backend protocol: what the gateway needs from anything that serves a model.

A backend turns an OpenAI-shaped request body (a ``dict`` already validated by the API layer,
with ``model`` set to the *upstream* model name) into an OpenAI-shaped answer. Errors before the
first byte are raised as :mod:`chatgate.errors` classes (502/504/429...); errors after the first
byte of a stream end the stream with an SSE error event (see :class:`ChatStream`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from chatgate.errors import APIError
from chatgate.settings import ModelConfig

DONE_EVENT = b"data: [DONE]\n\n"

MAX_REPORTED_TOKENS = 2**31 - 1
"""The most tokens an upstream may report for one request: what the usage tables' ``INTEGER``
columns hold, and more than any context window."""


def reported_tokens(value: Any) -> int | None:
    """A token count as an upstream reported it, or ``None`` when it is not one: not an int
    (``true`` neither), negative, or beyond :data:`MAX_REPORTED_TOKENS`. A negative count would
    credit the account; one too big for the usage tables would make every batch of usage it
    is in fail for good."""
    if type(value) is int and 0 <= value <= MAX_REPORTED_TOKENS:
        return value
    return None


def _part(details: Any, name: str, whole: int) -> int:
    """``details[name]``, a part of ``whole`` tokens an upstream reported; 0 if it is not one."""
    value = reported_tokens(details.get(name)) if type(details) is dict else None
    return value if value is not None and value <= whole else 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request, as OpenAI reports it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, read from a cache upstream (priced apart)
    reasoning_tokens: int = 0  # of the completion's, a reasoning model's (shown, not recorded)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, data: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object; ``None`` when absent or malformed (then the gateway
        counts the tokens itself), a count :func:`reported_tokens` refuses included, and a
        ``total_tokens`` other than the sum of the two: the client was shown that total while
        the sum was billed (QA, an upstream saying 999 for 100 + 20)."""
        if not isinstance(data, dict):
            return None
        prompt = reported_tokens(data.get("prompt_tokens"))
        completion = reported_tokens(data.get("completion_tokens"))
        if prompt is None or completion is None:
            return None
        total = data.get("total_tokens", prompt + completion)
        if type(total) is not int or total != prompt + completion:
            return None
        details, more = data.get("prompt_tokens_details"), data.get("completion_tokens_details")
        if not details and not more:  # absent or null: most servers' usage, and the cheap one
            return cls(prompt, completion)
        # Parts of the prompt's and the completion's: more than the whole is not a count, only
        # ignored (the prompt is then priced whole, as from an upstream that reports no cache).
        return cls(
            prompt,
            completion,
            _part(details, "cached_tokens", prompt),
            _part(more, "reasoning_tokens", completion),
        )

    def to_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A complete (non-streamed) chat completion and its usage."""

    body: dict[str, Any]
    usage: Usage | None
    raw: bytes | None = None  # the upstream's bytes, forwarded as they are when present


class ChatStream(ABC):
    """An open stream of SSE events (``b"data: {...}\\n\\n"``), ending with ``data: [DONE]``.

    :meth:`batches` gives the bytes to send to the client, already filtered (the usage-only
    chunk is included only when the client asked for it), in lists of the events in hand at
    once (one read of the upstream), which a relay writes together: one system call, and one
    step of each layer between the backend and the client, for several events. Iterating the
    stream itself gives the same events one by one. After iteration, or after the client went
    away, ``usage`` holds the reported usage when there was one, and ``completion_text`` what was
    generated so far, so a cut-off stream can still be metered. ``first_byte_at`` is the
    ``time.perf_counter()`` of the first event.
    """

    usage: Usage | None = None
    first_byte_at: float | None = None
    failure: APIError | None = None  # what ended the stream in an error event, if anything

    def __init__(self) -> None:
        self._text: list[str] = []
        self._batches_gen: AsyncGenerator[list[bytes], None] | None = None

    @property
    def completion_text(self) -> str:
        """The text generated so far (content and tool-call arguments)."""
        return "".join(self._text)

    def envelope(self) -> dict[str, Any]:
        """The fields every chunk of this stream repeats (``id``, ``created``, ``model``...)."""
        return {"object": "chat.completion.chunk"}

    def usage_event(self, usage: Usage) -> bytes:
        """The usage-only chunk (``choices: []``) of this stream, for ``usage``: the last
        event before ``[DONE]`` when the client asked for usage (``stream_options``)."""
        chunk = {**self.envelope(), "choices": [], "usage": usage.to_openai()}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def batches(self) -> AsyncIterator[list[bytes]]:
        """The SSE events as bytes, each ending in a blank line, in lists (never empty) of
        those in hand at once; the same iterator on every call. Each list is the caller's: a
        layer may add an event to it."""
        if self._batches_gen is None:
            self._batches_gen = self._batches()
        return self._batches_gen

    @abstractmethod
    def _batches(self) -> AsyncGenerator[list[bytes], None]:
        """The generator :meth:`batches` makes once and hands out."""

    async def _close_batches(self) -> None:
        """Run the batches' cleanup now, when they were started (for :meth:`aclose`). A
        RuntimeError means another task is inside them: they end by themselves once what
        they read from is closed."""
        if self._batches_gen is not None:
            with contextlib.suppress(RuntimeError):
                await self._batches_gen.aclose()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for batch in self.batches():
            for event in batch:
                yield event

    @abstractmethod
    async def aclose(self) -> None:
        """Stop generating and free the connection or the model (idempotent)."""


class Backend(ABC):
    """Something that serves chat completions (and possibly embeddings)."""

    name: str = "backend"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open pools or load models; called once at server start."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything ``start`` opened."""

    @abstractmethod
    async def chat(self, model: ModelConfig, body: dict[str, Any]) -> ChatResult:
        """Answer a non-streamed chat completion request."""

    @abstractmethod
    async def chat_stream(
        self, model: ModelConfig, body: dict[str, Any], *, include_usage: bool
    ) -> ChatStream:
        """Open a streamed chat completion; raise before returning if it cannot start."""

    async def embeddings(self, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        """Answer an embeddings request; backends without embeddings raise ``InvalidRequest``."""
        from chatgate.errors import InvalidRequest

        raise InvalidRequest(
            f"The model `{model.name}` does not support embeddings.", param="model"
        )
