"""Fit a stored history into the model's context window, by counted tokens.

The budget for the prompt is ``ModelConfig.context_window`` minus the output reserved for the
answer: the requested ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` when
given and smaller than the window, else ``min(settings.default_max_tokens,
context_window // 4)`` (an output limit no answer can reach is no limit, as the local model,
which writes at most the room left, reads it). Tokens are counted offline with
:mod:`chatgate.tokens` (the model's own encoding and chat template, the tool definitions),
each candidate prompt whole, as it will be sent.

Some messages are *pinned* and never dropped: every system/developer message (and the
Responses ``instructions``) and every message of the current request. The rest is grouped into
turns (a user message and the assistant/tool messages that follow it), so a tool call is never
separated from its result; a request that brings a tool result keeps the turn holding its call.

The policy is the setting ``context_trim`` (``CHATGATE_CONTEXT_TRIM``):

- ``drop_oldest`` (default): keep the most of the newest whole turns that fit.
- ``error``: never drop; a history that does not fit is a 400 ``context_length_exceeded``.

A Responses request can choose per request with ``truncation``: ``auto`` is ``drop_oldest``,
``disabled`` is ``error``. Pinned messages that do not fit beside the output reserved but do
fit the window are sent without history, and the answer has the room left (as the same
messages without a conversation would); pinned messages that do not fit the window are a 400
``context_length_exceeded`` under either policy (nothing is sent that would overflow it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatgate import errors, tokens
from chatgate.settings import CONTEXT_TRIMS, ContextTrim, ModelConfig, Settings

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Policy",
    "Trimmed",
    "output_reserve",
    "policy_from_settings",
    "prompt_budget",
    "trim_messages",
]

Policy = ContextTrim
POLICIES: tuple[Policy, ...] = CONTEXT_TRIMS  # the setting's choices, checked when it is read
DEFAULT_POLICY: Policy = "drop_oldest"
PINNED_ROLES = ("system", "developer")  # a tuple: a role may be any JSON value (unhashable)
FALLBACK_DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Trimmed:
    """The messages to send, their counted prompt tokens, and how many were left out."""

    messages: list[dict[str, Any]]
    prompt_tokens: int
    dropped: int


def policy_from_settings(settings: Settings) -> Policy:
    """The configured policy; ``ValueError`` for an unknown name (checked at start-up)."""
    value = str(settings.context_trim).strip().lower()
    for policy in POLICIES:
        if value == policy:
            return policy
    raise ValueError(f"unknown context_trim policy {value!r}; use one of: {', '.join(POLICIES)}")


def output_reserve(model: ModelConfig, requested: int | None, settings: Settings) -> int:
    """Tokens kept free for the answer: the output requested, or the default.

    An output limit the window cannot hold at all is no limit, as the local model reads it
    (it writes at most the room left): the default is kept free, not the whole window.
    """
    if requested is not None and requested < model.context_window:
        return requested
    default = int(settings.default_max_tokens)
    return max(0, min(default, model.context_window // 4))


def prompt_budget(model: ModelConfig, requested: int | None, settings: Settings) -> int:
    """Tokens the history may bring the prompt to: the window less :func:`output_reserve`.

    The request's own messages may go past it (:func:`trim_messages`): no history is kept
    then, and the answer has the room left, as without a conversation.
    """
    return model.context_window - output_reserve(model, requested, settings)


def _too_long(
    model: ModelConfig, used: int | None, budget: int, param: str
) -> errors.ContextTooLong:
    """The 400; ``used`` is ``None`` for a text too long to count."""
    count = f"more than {model.context_window}" if used is None else str(used)
    reserved = model.context_window - budget
    beside = f", and {reserved} are reserved for the output" if reserved > 0 else ""
    return errors.ContextTooLong(
        f"This model's maximum context length is {model.context_window} tokens. However, your "
        f"messages resulted in {count} tokens{beside}. Please reduce the length of the "
        "messages.",
        param=param,
    )


def _turns(pinned: Sequence[bool], messages: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Indices of the droppable messages, grouped into turns (each opens at a user message)."""
    turns: list[list[int]] = []
    for index, message in enumerate(messages):
        if pinned[index]:
            continue
        if not turns or message.get("role") == "user":
            turns.append([])
        turns[-1].append(index)
    return turns


def _most_kept(fits: Callable[[int], bool], known_not: int) -> int:
    """The largest ``k`` below ``known_not`` with ``fits(k)``, ``fits(0)`` being known true.

    Galloping from the newest (1, 2, 4... turns) and then halving, the counts stay about the
    size of what fits: a long history is never counted whole more than once.
    """
    low, high = 0, known_not
    probe = 1
    while probe < high and fits(probe):
        low, probe = probe, probe * 2
    high = min(high, probe)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def trim_messages(
    messages: Sequence[Mapping[str, Any]],
    pinned: Sequence[bool],
    *,
    model: ModelConfig,
    budget: int,
    policy: Policy = DEFAULT_POLICY,
    tools: Sequence[Mapping[str, Any]] | None = None,
    param: str = "messages",
) -> Trimmed:
    """Keep the pinned messages and the most of the newest turns that fit in ``budget``.

    ``pinned[i]`` marks ``messages[i]`` as never dropped. Order is preserved. ``param`` names
    the request's field in the 400 when they do not fit.

    Each candidate is counted whole, exactly as it will be sent: a chat template need not
    cost a message the same alone as among others (SmolLM2's adds its default system prompt
    to a prompt that has none, and a message priced alone paid for it every time). How many
    of the newest turns to keep is searched for (:func:`_most_kept`), a few counts. A text
    too long for the counter even to read (:class:`~chatgate.errors.ContextTooLong`) does
    not fit: old history that long is dropped like any other.

    Pinned messages that do not fit ``budget`` but do fit the window are sent alone: the
    answer then has the room left, as when the same messages come without a conversation.
    """
    if len(pinned) != len(messages):
        raise ValueError("pinned must mark every message")
    counting = model.upstream_model or model.name  # the same name the limiter counts with
    pinned = [p or messages[i].get("role") in PINNED_ROLES for i, p in enumerate(pinned)]
    counter = tokens.counter_for(counting)
    turns = _turns(pinned, messages)
    # A tool result of the request answers a call in the history's turn just before it:
    # that turn stays (or the request is a 400), as an orphaned result is refused upstream.
    answered = {
        max((n for n, turn in enumerate(turns) if turn[0] < index), default=-1)
        for index, message in enumerate(messages)
        if pinned[index] and message.get("role") == "tool"
    }
    turns = [turn for n, turn in enumerate(turns) if n not in answered]
    counts: dict[int, int | None] = {}  # newest turns kept -> the prompt's tokens

    def kept(keep: int) -> list[dict[str, Any]]:
        dropped = {index for turn in turns[: len(turns) - keep] for index in turn}
        return [dict(m) for i, m in enumerate(messages) if i not in dropped]

    def count(keep: int) -> int | None:
        if keep not in counts:
            try:
                counts[keep] = counter.count_messages(kept(keep), tools)
            except errors.ContextTooLong:  # too long to count: it cannot fit
                counts[keep] = None
        return counts[keep]

    def fits(keep: int, limit: int = budget) -> bool:
        used = count(keep)
        return used is not None and used <= limit

    keep = len(turns)
    if not fits(keep):
        if policy == "error" and turns:
            raise _too_long(model, count(keep), budget, param)
        # Every turn may go; what stays must fit the window, with a token left to answer.
        if not fits(0, max(budget, model.context_window - 1)):
            raise _too_long(model, count(0), model.context_window, param)
        keep = _most_kept(fits, keep) if fits(0) else 0
    messages_kept = kept(keep)
    used = count(keep)
    assert used is not None  # it fits
    return Trimmed(messages_kept, used, len(messages) - len(messages_kept))
