"""Session context for a turn: load a history, trim it to the model, and store the new turn.

Used by ``POST /v1/responses`` and by chatgate's ``conversation`` extension of
``/v1/chat/completions``::

    session = await prepare_chat(state, principal, route, body)   # 404: not this account's
    upstream["messages"] = session.messages                        # history + new turn, trimmed
    ...                                                            # call the backend
    await session.commit(result.body)                              # non-streamed, or:
    async for batch in session.relay(stream.batches()): ...        # commits before [DONE]

The model always comes from the request (checked against the key by the caller's
``route_for``); nothing stored in a conversation can choose or change it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatgate import errors
from chatgate.auth import Principal
from chatgate.backends.router import Route
from chatgate.sessions.response_stream import CallGatherer, first_choice, parse_chunks, tool_calls
from chatgate.sessions.responses import chat_message_to_items, items_to_messages
from chatgate.sessions.store import SessionStore
from chatgate.sessions.trim import (
    PINNED_ROLES,
    Policy,
    Trimmed,
    policy_from_settings,
    prompt_budget,
    trim_messages,
)
from chatgate.settings import ModelConfig, Settings
from chatgate.state import State

__all__ = ["ChatSession", "build_context", "prepare_chat", "sessions_store"]

log = logging.getLogger(__name__)
_STORE_KEY = "sessions.store"


def sessions_store(state: State) -> SessionStore:
    """The process's :class:`SessionStore` (one per engine, kept in ``state.extras``)."""
    store = state.extras.get(_STORE_KEY)
    if not isinstance(store, SessionStore):
        store = SessionStore(state.engine)
        state.extras[_STORE_KEY] = store
    return store


def build_context(
    *,
    head: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    model: ModelConfig,
    settings: Settings,
    requested_output: int | None,
    policy: Policy | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    param: str = "messages",
) -> Trimmed:
    """``head`` (system/instructions) + ``history`` + ``new``, trimmed to the model's window.

    ``head`` and ``new`` are never dropped, nor are system/developer messages of the history.
    ``param`` names the request's field of the messages, for a 400.
    """
    messages = [*head, *history, *new]
    pinned = [True] * len(head) + [False] * len(history) + [True] * len(new)
    return trim_messages(
        messages,
        pinned,
        model=model,
        budget=prompt_budget(model, requested_output, settings),
        policy=policy or policy_from_settings(settings),
        tools=tools,
        param=param,
    )


def _conversation_id(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise errors.InvalidRequest(
            "Invalid 'conversation': expected a conversation id.", param="conversation"
        )
    return value


@dataclass(slots=True)
class ChatSession:
    """One chat turn in a stored conversation: what to send, and how to store the outcome."""

    conversation_id: str
    messages: list[dict[str, Any]]
    """The messages to send upstream: the stored history (trimmed) and the request's."""
    prompt_tokens: int
    """The counted prompt tokens of :attr:`messages` (history included)."""
    dropped: int
    """How many stored messages were left out to fit the context window."""
    store: SessionStore
    account_id: str
    new_items: list[dict[str, Any]]
    _text: list[str] = field(default_factory=list)
    _refusal: list[str] = field(default_factory=list)
    _calls: CallGatherer = field(default_factory=CallGatherer)
    _finished: bool = False
    _failed: bool = False
    committed: bool = False

    async def commit(self, answer: Mapping[str, Any]) -> None:
        """Append the new turn and the answer to the conversation (after a success).

        ``answer`` is the assistant message, or a whole ``chat.completion`` body (its first
        choice is taken). Never raises: the answer has been paid for and is going out; a
        conversation deleted meanwhile, or a database error, is logged.
        """
        choices = answer.get("choices")
        if isinstance(choices, list):
            first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
            answer = first.get("message") or {}
        outputs = chat_message_to_items({**answer, "role": "assistant"})
        try:
            await self.store.append_turn(
                self.account_id, self.conversation_id, self.new_items, outputs
            )
            self.committed = True
        except errors.NotFound:
            log.warning("conversation %s was deleted during a turn", self.conversation_id)
        except Exception:
            log.exception("could not store a turn of conversation %s", self.conversation_id)

    def _observe(self, event: bytes) -> bool:
        """Collect the answer from one chat SSE event; True when it is ``[DONE]``."""
        chunks, done = parse_chunks(event)
        for chunk in chunks:
            if "error" in chunk:
                self._failed = True
            for delta, finish_reason, _ in first_choice(chunk):
                if isinstance(delta.get("content"), str):
                    self._text.append(delta["content"])
                if isinstance(delta.get("refusal"), str):
                    self._refusal.append(delta["refusal"])
                for call in tool_calls(delta):
                    self._calls.add(call)
                if finish_reason:
                    self._finished = True
        return done

    async def relay(self, batches: AsyncIterable[list[bytes]]) -> AsyncIterator[list[bytes]]:
        """Pass a chat stream's batches of events through (see
        :meth:`~chatgate.backends.base.ChatStream.batches`), storing the turn just before
        the one holding ``[DONE]``.

        Stored only when the stream finished normally (a finish reason, no error event), and
        before the client sees the end, so its next turn already finds this one. A stream the
        backend ends without ``[DONE]`` (some servers do) is stored when it ends.
        """
        done = False
        async for batch in batches:
            for event in batch:
                if self._observe(event):
                    done = True
                    await self._commit_answer()
            yield batch
        if not done:
            await self._commit_answer()

    async def _commit_answer(self) -> None:
        """Store the streamed answer, if the stream finished normally."""
        if not self._finished or self._failed:
            return
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._text)}
        refusal = "".join(self._refusal)
        if refusal:  # kept as a whole answer's is (an empty text beside it would hide it)
            message["refusal"] = refusal
            message["content"] = message["content"] or None
        if self._calls.calls:  # the calls alone, as a whole answer's (no empty text before)
            message["tool_calls"] = self._calls.chat_tool_calls()
            message["content"] = message["content"] or None
        await self.commit(message)


async def prepare_chat(
    state: State, principal: Principal, route: Route, body: Mapping[str, Any]
) -> ChatSession:
    """Load the conversation named by ``body["conversation"]``, and fit it to the model.

    The request's leading system/developer messages come first, then the stored history, then
    the rest of the request (the new turn). System/developer messages of a request are not
    stored (like ``instructions`` in the Responses API); its other messages are, by
    :meth:`ChatSession.commit`. 404 for a conversation of another account; 400
    ``context_length_exceeded`` when even the pinned messages do not fit.
    """
    conversation_id = _conversation_id(body.get("conversation"))
    store = sessions_store(state)
    items = await store.conversation_items(principal.account_id, conversation_id)
    messages = [m for m in body.get("messages") or () if isinstance(m, Mapping)]
    split = 0
    while split < len(messages) and messages[split].get("role") in PINNED_ROLES:
        split += 1
    head, new = messages[:split], messages[split:]
    new_items: list[dict[str, Any]] = []
    for index, message in enumerate(new, start=split):
        if message.get("role") not in PINNED_ROLES:
            new_items += chat_message_to_items(message, f"messages[{index}]")
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    tools = body.get("tools")
    trimmed = build_context(
        head=head,
        history=items_to_messages(item.data for item in items),
        new=new,
        model=route.model,
        settings=state.settings,
        requested_output=requested if isinstance(requested, int) else None,
        tools=tools if isinstance(tools, list) else None,
    )
    return ChatSession(
        conversation_id=conversation_id,
        messages=trimmed.messages,
        prompt_tokens=trimmed.prompt_tokens,
        dropped=trimmed.dropped,
        store=store,
        account_id=principal.account_id,
        new_items=new_items,
    )
