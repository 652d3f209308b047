"""Request parameters of the embedded local model: sampling, output budget, stop sequences.

OpenAI's body fields checked and clamped for SmolLM2 (llama.cpp), and the stop-sequence splitter
that holds back text which could still become a stop sequence. No model is needed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatgate import errors

# SmolLM2's model card recommends temperature 0.2 and top_p 0.9; OpenAI's defaults (1.0, 1.0)
# make a 135M model ramble, so these apply when the request (or the model options) say nothing.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
# llama.cpp's own default. Without it (1.0) the model falls into a loop of one token now and
# then, even at those settings, and runs to the end of its context: 5 of 20 seeds of "Say
# hello", each 4,064 tokens of one emoji and two minutes of the model's only worker; with it,
# 0 of the same 20. OpenAI's frequency and presence penalties still apply on top of it.
DEFAULT_REPEAT_PENALTY = 1.1
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters of one request, already validated."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True, slots=True)
class Params:
    """The generation parameters of one request."""

    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise errors.InvalidRequest(
            f"Invalid value for '{key}': expected a number from {low:g} to {high:g}.", param=key
        )
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise errors.InvalidRequest(
            f"Invalid value for '{key}': expected an integer of at least {low}.", param=key
        )
    return value


def parse_params(body: Mapping[str, Any]) -> Params:
    """Validate the OpenAI sampling fields this backend supports; 400 for what it cannot do."""
    n = body.get("n")
    if n is not None and n != 1:
        raise errors.InvalidRequest("The local model supports only n=1.", param="n")
    if body.get("logprobs"):
        raise errors.InvalidRequest("The local model does not return logprobs.", param="logprobs")
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        raise errors.InvalidRequest(
            "The local model cannot call tools: its answer is text, so 'tool_choice' may be "
            "'auto' or 'none' only. A model served by an upstream can call them.",
            param="tool_choice",
        )
    wanted = body.get("response_format")
    if isinstance(wanted, Mapping) and wanted.get("type") in ("json_object", "json_schema"):
        raise errors.InvalidRequest(
            "The local model cannot hold its answer to JSON: 'response_format' may be "
            "{'type': 'text'} only. A model served by an upstream can answer in JSON.",
            param="response_format",
        )
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stop_value = body.get("stop")
    if stop_value is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_value, str):
        stop = (stop_value,)
    elif (
        isinstance(stop_value, list)
        and len(stop_value) <= MAX_STOP_SEQUENCES
        and all(isinstance(s, str) for s in stop_value)
    ):
        stop = tuple(stop_value)
    else:
        raise errors.InvalidRequest(
            "Invalid value for 'stop': expected a string or up to 4 strings.", param="stop"
        )
    stop = tuple(s for s in stop if s)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise errors.InvalidRequest("Invalid value for 'seed': expected an integer.", param="seed")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    sampling = Sampling(
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=DEFAULT_TOP_P if top_p is None else top_p,
        seed=None if seed is None else seed & 0xFFFFFFFF,  # llama.cpp seeds are 32-bit
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
    )
    return Params(max_tokens, sampling, stop)


def split_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split decoded text into (safe to emit, held back, stopped).

    Text that could be the start of a stop sequence is held back until the next token decides;
    on a match, everything from the stop sequence on is dropped, as OpenAI does.
    """
    if not stops:
        return text, "", False
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], text[len(text) - hold :], False
