"""Responses API streams: chat completion chunks in, Responses events out
(:class:`StreamTranslator`).

The events are those the official SDK parses: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``/``.done`` (``response.refusal.delta``/``.done`` for a refusal),
``response.content_part.done``,
``response.output_item.done``, ``response.function_call_arguments.delta``/``.done``, then
``response.completed``, ``response.incomplete`` or ``response.failed``. The items they carry
are built as :mod:`chatgate.sessions.responses` builds a non-streamed answer's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from chatgate.backends.base import Usage
from chatgate.ids import new_id
from chatgate.sessions.responses import content_logprobs, output_text

__all__ = ["StreamTranslator", "parse_chunks", "sse"]


def sse(event: Mapping[str, Any]) -> bytes:
    """One Responses event as SSE, with its ``event:`` line as OpenAI sends it."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def parse_chunks(event: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON payloads of one chat SSE event, and whether it was ``[DONE]``."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            chunks.append(data)
    return chunks, done


def first_choice(
    chunk: Mapping[str, Any],
) -> Iterator[tuple[Mapping[str, Any], Any, Mapping[str, Any]]]:
    """The delta and finish reason of a chat chunk's first choice (index 0; the others are
    not kept), and the choice; a part not shaped as the spec has it counts as absent."""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        yield (delta if isinstance(delta, Mapping) else {}), choice.get("finish_reason"), choice


def tool_calls(delta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A delta's tool-call deltas (objects only)."""
    calls = delta.get("tool_calls")
    return [c for c in calls if isinstance(c, Mapping)] if isinstance(calls, list) else []


def function_of(call: Mapping[str, Any]) -> Mapping[str, Any]:
    """A tool-call delta's ``function`` object (empty when it is missing or not an object)."""
    function = call.get("function")
    return function if isinstance(function, Mapping) else {}


class CallIndex:
    """Which tool call a streamed tool-call delta belongs to: its ``index``, as the spec has it;
    for a server that sends none (each call whole in one delta, as some Ollama and llama.cpp
    versions do), a new call for each new ``id``, and the last call for a delta without one."""

    __slots__ = ("_last", "_last_id")

    def __init__(self) -> None:
        self._last = -1
        self._last_id: object = None

    def of(self, call: Mapping[str, Any]) -> int:
        index = call.get("index")
        call_id = call.get("id")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            fresh = self._last < 0 or (call_id and call_id != self._last_id)
            index = self._last + 1 if fresh else self._last
        self._last = max(self._last, index)
        if call_id:
            self._last_id = call_id
        return index


@dataclass(slots=True)
class Call:
    """One tool call, as much of it as its deltas have brought."""

    call_id: str
    name: str = ""
    arguments: str = ""


class CallGatherer:
    """A stream's tool-call deltas gathered into whole calls, by one rule for both readers (the
    Responses stream and a conversation's stored turn). :class:`CallIndex` tells the calls
    apart. A call's id is its first delta's, or a new ``call_...`` when the server sends none
    (as for a whole answer); its name is the first one sent (some servers repeat it in every
    delta); its arguments are every delta's, joined."""

    __slots__ = ("_index", "calls")

    def __init__(self) -> None:
        self.calls: dict[int, Call] = {}
        self._index = CallIndex()

    def add(self, delta: Mapping[str, Any]) -> tuple[int, Call, str]:
        """The call a tool-call delta belongs to (its index, and the call so far), and the
        arguments this delta added."""
        index = self._index.of(delta)
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = Call(str(delta.get("id") or new_id("call")))
        function = function_of(delta)
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str) and not call.name:
            call.name = name
        added = arguments if isinstance(arguments, str) else ""
        call.arguments += added
        return index, call, added

    def chat_tool_calls(self) -> list[dict[str, Any]]:
        """The calls as a chat message's ``tool_calls``, in order."""
        return [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for _, call in sorted(self.calls.items())
        ]


class StreamTranslator:
    """Chat completion chunks in, Responses stream events out (each with its sequence number).

    Call :meth:`start`, then :meth:`feed` for every chunk, then :meth:`close` (closes the open
    output items; :attr:`output` is then final), then :meth:`completed` or :meth:`failed` with
    the final response object.
    """

    def __init__(self, response: Mapping[str, Any]) -> None:
        self._response = dict(response)
        self._seq = 0
        self.output: list[dict[str, Any]] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self._text: dict[str, Any] | None = None  # the open message item
        self._text_index = 0
        self._calls: dict[int, tuple[int, dict[str, Any]]] = {}  # chat index -> output index
        self._gathered = CallGatherer()

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        snapshot = {**self._response, "status": "in_progress", "output": [], "usage": None}
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The events for one ``chat.completion.chunk`` (or an ``{"error": ...}`` event)."""
        if isinstance(chunk.get("error"), Mapping):
            self.error = dict(chunk["error"])
            return []
        usage = Usage.from_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        events: list[dict[str, Any]] = []
        for delta, finish_reason, choice in first_choice(chunk):
            text, refusal = delta.get("content"), delta.get("refusal")
            if isinstance(text, str) and text:
                events += self._text_delta(text, logprobs=content_logprobs(choice))
            if isinstance(refusal, str) and refusal:  # a refusal part, as a whole answer's
                events += self._text_delta(refusal, refusal=True)
            for call in tool_calls(delta):
                events += self._call_delta(call)
            if finish_reason:
                self.finish_reason = str(finish_reason)
        return events

    def _text_delta(
        self, text: str, refusal: bool = False, logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Text (or, with ``refusal``, a refusal) of the message item, opened on first use;
        its one content part is of the kind its first delta was."""
        events = []
        if self._text is None:
            events += self._close_calls()
            item: dict[str, Any] = {
                "id": new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._text, self._text_index = item, len(self.output)
            self.output.append(item)
            events.append(
                self._event(
                    "response.output_item.added", output_index=self._text_index, item=dict(item)
                )
            )
            part = {"type": "refusal", "refusal": ""} if refusal else output_text("")
            item["content"] = [part]
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self._text_index,
                    content_index=0,
                    part=dict(part),
                )
            )
        part = self._text["content"][0]
        common = {"item_id": self._text["id"], "output_index": self._text_index, "content_index": 0}
        if part["type"] == "refusal":
            part["refusal"] += text
            events.append(self._event("response.refusal.delta", **common, delta=text))
        else:
            part["text"] += text
            if logprobs:
                part["logprobs"] = part["logprobs"] + logprobs  # the part's own list, not shared
            events.append(
                self._event(
                    "response.output_text.delta", **common, delta=text, logprobs=logprobs or []
                )
            )
        return events

    def _call_delta(self, delta: Mapping[str, Any]) -> list[dict[str, Any]]:
        events = []
        index, call, added = self._gathered.add(delta)
        if index not in self._calls:
            events += self._close_text()
            item: dict[str, Any] = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": "",
            }
            self._calls[index] = (len(self.output), item)
            self.output.append(item)
            events.append(
                self._event(
                    "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
                )
            )
        output_index, item = self._calls[index]
        item["name"] = call.name
        if added:
            item["arguments"] = call.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=output_index,
                    delta=added,
                )
            )
        return events

    def _status(self) -> str:
        # An item the upstream broke off is incomplete, as one cut at the output limit.
        if self.finish_reason == "length" or self.error is not None:
            return "incomplete"
        return "completed"

    def _close_text(self) -> list[dict[str, Any]]:
        item, self._text = self._text, None
        if item is None:
            return []
        part = item["content"][0]
        item["status"] = self._status()
        common = {"item_id": item["id"], "output_index": self._text_index, "content_index": 0}
        if part["type"] == "refusal":
            done = self._event("response.refusal.done", **common, refusal=part["refusal"])
        else:
            done = self._event(
                "response.output_text.done", **common, text=part["text"], logprobs=[]
            )
        return [
            done,
            self._event("response.content_part.done", **common, part=part),
            self._event("response.output_item.done", output_index=self._text_index, item=item),
        ]

    def _close_calls(self) -> list[dict[str, Any]]:
        events = []
        for output_index, item in sorted(self._calls.values(), key=lambda pair: pair[0]):
            if item["status"] != "in_progress":
                continue
            item["status"] = self._status()
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=output_index,
                    arguments=item["arguments"],
                )
            )
            events.append(
                self._event("response.output_item.done", output_index=output_index, item=item)
            )
        return events

    def close(self) -> list[dict[str, Any]]:
        """Close every open output item (an empty answer still gets its message)."""
        if not self.output and self.error is None:
            events = self._text_delta("")
            events[-1:] = []  # no empty delta event, just the opened item and part
            return events + self._close_text()
        return self._close_text() + self._close_calls()

    def completed(self, response: Mapping[str, Any]) -> dict[str, Any]:
        """``response.completed`` (or ``response.incomplete`` when cut at the output limit)."""
        kind = (
            "response.incomplete"
            if response.get("status") == "incomplete"
            else "response.completed"
        )
        return self._event(kind, response=dict(response))

    def failed(self, response: Mapping[str, Any]) -> dict[str, Any]:
        """``response.failed`` for an error after the stream started."""
        return self._event("response.failed", response=dict(response))
