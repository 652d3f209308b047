"""Offline token counting: exact OpenAI encodings, chosen per model, and per-model overrides.

Used on the request path (rate-limit reservations), for context trimming, and for usage when an
upstream does not report any. It never touches the network: the cl100k_base and o200k_base
tables ship inside the ``bpe-openai`` wheel (bindings to GitHub's Rust ``bpe`` crate, ~0.2 ms
per 10 KB). Plain ``tiktoken`` would download its tables at run time, which fails offline.

Which encoding a model uses is a prefix table (:data:`ENCODING_PREFIXES`, longest prefix wins);
unknown names fall back to :data:`DEFAULT_ENCODING` (``o200k_base``: every current OpenAI model
uses it, so an unknown name is most likely a newer one). A backend that knows better, such as
the embedded local model, registers its own :class:`TokenCounter` under its public model name
with :func:`register_counter`; registered counters take precedence over the table.

Chat messages follow OpenAI's documented rule (the "How to count tokens with tiktoken" cookbook):
3 tokens per message, 1 more when it has a ``name``, the text of every string field, and 3 for
the primer of the reply (``<|start|>assistant<|message|>``).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODING_PREFIXES",
    "BPECounter",
    "CounterRegistry",
    "InputCounter",
    "TokenCounter",
    "count_input",
    "count_messages",
    "count_text",
    "counter_for",
    "encode",
    "encoding_for_model",
    "flatten_content",
    "message_texts",
    "preload",
    "register_counter",
    "registry",
    "unregister_counter",
]

O200K = "o200k_base"
CL100K = "cl100k_base"
DEFAULT_ENCODING = O200K

#: Model-name prefixes and their encodings; the longest matching prefix wins, so ``gpt-4o``
#: beats ``gpt-4``. Names are compared lower-cased, without a ``provider/`` prefix.
ENCODING_PREFIXES: Mapping[str, str] = {
    "gpt-4o": O200K,
    "chatgpt-4o": O200K,
    "gpt-4.1": O200K,
    "gpt-4.5": O200K,
    "gpt-5": O200K,
    "gpt-oss": O200K,
    "o1": O200K,
    "o3": O200K,
    "o4": O200K,
    "gpt-4": CL100K,
    "gpt-3.5": CL100K,
    "gpt-35": CL100K,  # Azure's spelling
    "text-embedding-3": CL100K,
    "text-embedding-ada-002": CL100K,
}

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER = 3
#: An image part is billed by its size and detail, which a counter cannot see without fetching
#: it; 85 is OpenAI's cost of a low-detail image, a floor rather than an exact figure.
IMAGE_PART_TOKENS = 85

# Per-tool overheads measured by OpenAI's cookbook ("Counting tokens for chat completions with
# tool calls"), for the cl100k and o200k families. Tool schemas are formatted server side, so
# this is the documented approximation, exact on the cookbook's examples.
_TOOL_OVERHEAD = {
    CL100K: {"func_init": 10, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3},
    O200K: {"func_init": 7, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3},
}
_TOOLS_END = 12


class TokenCounter(Protocol):
    """Counts tokens the way one model does."""

    def count_text(self, text: str) -> int:
        """Tokens of plain text, with no chat framing."""
        ...

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Prompt tokens of a chat request: messages, their framing, the reply primer, tools."""
        ...


@runtime_checkable
class InputCounter(Protocol):
    """An optional capability of a :class:`TokenCounter`: how an embedding model bills one
    input, when that is not all of its text (the local embedders truncate long inputs)."""

    def count_input(self, text: str) -> int:
        """Tokens an embedding of ``text`` is billed for, at most."""
        ...


class _RustTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def count(self, text: str) -> int: ...


def _load_bindings() -> Any:
    """Load the ``bpe_openai._bindings`` extension without running ``bpe_openai/__init__``.

    The package's ``__init__`` builds a pure-Python copy of every merge table at import time
    (~0.45 s and ~75 MB per process) that only its tiktoken-compatible wrapper needs; counting
    needs only the Rust tokenizers. Falls back to a normal import if the layout ever changes.
    """
    spec = importlib.util.find_spec("bpe_openai")
    locations = spec.submodule_search_locations if spec is not None else None
    if locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(locations[0], "_bindings" + suffix)
            if os.path.isfile(path):
                loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", path)
                ext_spec = importlib.util.spec_from_file_location(
                    "bpe_openai._bindings", path, loader=loader
                )
                if ext_spec is not None:
                    module = importlib.util.module_from_spec(ext_spec)
                    loader.exec_module(module)
                    return module
    import bpe_openai._bindings as bindings  # pragma: no cover - fallback

    return bindings  # pragma: no cover


class _Encodings:
    """Rust tokenizers, each built once on first use (20-50 ms) and shared by all threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bindings: Any = None
        self._tokenizers: dict[str, _RustTokenizer] = {}

    def get(self, name: str) -> _RustTokenizer:
        tokenizer = self._tokenizers.get(name)
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            tokenizer = self._tokenizers.get(name)
            if tokenizer is None:
                if name not in (O200K, CL100K):
                    raise ValueError(f"unknown encoding {name!r}")
                if self._bindings is None:
                    self._bindings = _load_bindings()
                tokenizer = self._bindings.tokenizer_for_encoding(name)
                self._tokenizers[name] = tokenizer
            return tokenizer


_ENCODINGS = _Encodings()


def _clean(text: str) -> str:
    """Replace lone surrogates (valid in a JSON string, not in UTF-8) so Rust can take it."""
    if text.isascii():  # O(1) for a str, and most text is: no copy to find out
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def encode(text: str, encoding: str = DEFAULT_ENCODING) -> list[int]:
    """Token ids of ``text`` in ``encoding``; special-token text is encoded as ordinary text."""
    return _ENCODINGS.get(encoding).encode(_clean(text))


@functools.lru_cache(maxsize=1024)  # on the request path; model names come from the config
def encoding_for_model(model: str) -> str:
    """The encoding name for an OpenAI model name, :data:`DEFAULT_ENCODING` when unknown."""
    name = model.rsplit("/", 1)[-1].lower()
    best = ""
    for prefix in ENCODING_PREFIXES:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return ENCODING_PREFIXES[best] if best else DEFAULT_ENCODING


def message_texts(message: Mapping[str, Any]) -> tuple[list[str], int]:
    """The texts of one message that count as tokens, and the fixed extra tokens it carries.

    String fields count whole (role, content, name, refusal, tool_call_id...). Content parts
    count their text; image parts count :data:`IMAGE_PART_TOKENS`. Tool calls count their
    function name and arguments.
    """
    texts: list[str] = []
    extra = 0
    for key, value in message.items():
        if isinstance(value, str):
            texts.append(value)
            if key == "name":
                extra += TOKENS_PER_NAME
        elif key == "content" and isinstance(value, list):
            for part in value:
                if not isinstance(part, Mapping):
                    continue
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
                elif part.get("type") in ("image_url", "input_image"):
                    extra += IMAGE_PART_TOKENS
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    for field in ("name", "arguments"):
                        if isinstance(function.get(field), str):
                            texts.append(function[field])
    return texts, extra


def flatten_content(content: Any) -> str:
    """Message content as plain text: a string as is, the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


_ROLES_KEPT = 32
"""Distinct role texts a counter remembers the count of (a client may send any role)."""


class BPECounter:
    """A :class:`TokenCounter` for one OpenAI encoding, with OpenAI's message overhead rule."""

    def __init__(self, encoding: str = DEFAULT_ENCODING) -> None:
        if encoding not in _TOOL_OVERHEAD:
            raise ValueError(f"unknown encoding {encoding!r}")
        self.encoding = encoding
        self._roles: dict[str, int] = {}  # a message's role, counted once (a few distinct)

    def __repr__(self) -> str:
        return f"BPECounter({self.encoding!r})"

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        return _ENCODINGS.get(self.encoding).count(_clean(text))

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        tokenizer = _ENCODINGS.get(self.encoding)
        roles = self._roles
        total = REPLY_PRIMER
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if len(message) == 2 and type(role) is str and type(content) is str:
                # The usual message, counted as message_texts would, without its loops.
                total += TOKENS_PER_MESSAGE
                known = roles.get(role)
                if known is None:
                    known = tokenizer.count(_clean(role)) if role else 0
                    if len(roles) < _ROLES_KEPT:
                        roles[role] = known
                total += known
                if content:
                    total += tokenizer.count(_clean(content))
                continue
            texts, extra = message_texts(message)
            total += TOKENS_PER_MESSAGE + extra
            for text in texts:
                if text:
                    total += tokenizer.count(_clean(text))
        if tools:
            total += self._count_tools(tools)
        return total

    def _count_tools(self, tools: Sequence[Mapping[str, Any]]) -> int:
        """Tool definitions, by the cookbook's rule (name:description, then one line a property)."""
        cost = _TOOL_OVERHEAD[self.encoding]
        total = 0
        for tool in tools:
            function = tool.get("function")
            if not isinstance(function, Mapping):
                continue
            total += cost["func_init"]
            description = str(function.get("description") or "").removesuffix(".")
            total += self.count_text(f"{function.get('name', '')}:{description}")
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
            if isinstance(properties, Mapping) and properties:
                total += cost["prop_init"]
                for key, prop in properties.items():
                    total += cost["prop_key"]
                    prop = prop if isinstance(prop, Mapping) else {}
                    enum = prop.get("enum")
                    if isinstance(enum, list):
                        total += cost["enum_init"]
                        for item in enum:
                            total += cost["enum_item"] + self.count_text(str(item))
                    p_desc = str(prop.get("description") or "").removesuffix(".")
                    total += self.count_text(f"{key}:{prop.get('type', '')}:{p_desc}")
        return total + _TOOLS_END if total else 0


class CounterRegistry:
    """Chooses the counter for a model name: a registered one first, then the prefix table."""

    def __init__(self) -> None:
        self._registered: dict[str, TokenCounter] = {}
        self._by_encoding = {name: BPECounter(name) for name in _TOOL_OVERHEAD}

    def register(self, model: str, counter: TokenCounter) -> None:
        """Use ``counter`` for the (public) model name ``model`` from now on."""
        self._registered[model] = counter

    def unregister(self, model: str, counter: TokenCounter | None = None) -> None:
        """Forget the counter of ``model`` (only if it is still ``counter``, when given)."""
        if counter is None or self._registered.get(model) is counter:
            self._registered.pop(model, None)

    def counter_for(self, model: str) -> TokenCounter:
        """The counter for ``model``."""
        counter = self._registered.get(model)
        if counter is not None:
            return counter
        return self._by_encoding[encoding_for_model(model)]


#: The process-wide registry the gateway uses; tests may build their own.
registry = CounterRegistry()


def register_counter(model: str, counter: TokenCounter) -> None:
    """Register ``counter`` for ``model`` in the process-wide registry."""
    registry.register(model, counter)


def unregister_counter(model: str, counter: TokenCounter | None = None) -> None:
    """Remove the counter registered for ``model`` (see :meth:`CounterRegistry.unregister`)."""
    registry.unregister(model, counter)


def counter_for(model: str) -> TokenCounter:
    """The counter the process-wide registry picks for ``model``."""
    return registry.counter_for(model)


def count_text(text: str, model: str) -> int:
    """Tokens of ``text`` as ``model`` counts them."""
    return registry.counter_for(model).count_text(text)


def count_input(text: str, model: str) -> int:
    """Tokens ``model`` bills for embedding ``text``: its counter's own rule when it has one
    (:class:`InputCounter`), else every token of the text."""
    counter = registry.counter_for(model)
    if isinstance(counter, InputCounter):
        return counter.count_input(text)
    return counter.count_text(text)


def count_messages(
    messages: Sequence[Mapping[str, Any]],
    model: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Prompt tokens of a chat request to ``model`` (messages, framing, reply primer, tools)."""
    return registry.counter_for(model).count_messages(messages, tools)


def preload(encodings: Iterable[str] = (O200K, CL100K)) -> None:
    """Build the tokenizers now (at server start) so the first request does not pay for it."""
    for name in encodings:
        _ENCODINGS.get(name)
