"""Translation between OpenAI's Responses API and chat completions, so it works on any backend.

- Requests: :class:`ResponsesRequest` validates ``POST /v1/responses``; :func:`normalize_input`
  turns ``input`` into stored items; :func:`items_to_messages` turns items into chat messages;
  :func:`chat_body` builds the chat completion request for the backend.
- Answers: :func:`output_items` turns a chat completion message into output items, and
  :func:`response_object` builds the ``response`` object.
- Streams: :mod:`chatgate.sessions.response_stream` (:class:`StreamTranslator`) turns
  ``chat.completion.chunk`` events into the Responses events the official SDK parses.

Supported item types: ``message`` (roles user, assistant, system, developer; text and image-URL
parts), ``function_call`` and ``function_call_output``; supported tools: ``function``.
Anything else is a 400 naming the field, rather than being silently dropped. ``developer``
messages are sent as ``system``, which every chat backend understands.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from chatgate import errors
from chatgate.backends.base import Usage
from chatgate.ids import new_id

__all__ = [
    "ConversationRef",
    "Metadata",
    "ResponsesRequest",
    "chat_body",
    "chat_message_to_items",
    "items_to_messages",
    "normalize_input",
    "normalize_items",
    "output_items",
    "output_text",
    "response_object",
    "responses_usage",
]

MetadataKey = Annotated[str, msgspec.Meta(max_length=64)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
# Tuples, not sets: a client's role or type may be any JSON value, and a list or an object
# is unhashable (a set's `in` raised TypeError, a 500); a tuple's compares by equality.
INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
CHAT_PARTS = ("text", "image_url", "refusal")  # chat parts a conversation stores


class ConversationRef(msgspec.Struct, kw_only=True):
    """``conversation: {"id": ...}`` (the SDK also accepts a bare id string)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Reasoning(msgspec.Struct, kw_only=True):
    """``reasoning``: its ``effort`` becomes the chat request's ``reasoning_effort``."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the older name of ``summary``


LOGPROBS = "message.output_text.logprobs"
"""The ``include`` value that asks for the output text's token log probabilities."""


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/responses`` (the fields that matter on a chat backend)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    metadata: Metadata | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    # Passed on to the chat upstream as its own fields (see chat_body).
    reasoning: Reasoning | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None

    @property
    def conversation_id(self) -> str | None:
        """The conversation's id, whichever form it was given in."""
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation


# -- input items -------------------------------------------------------------------------


def _invalid(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param, code="invalid_value")


def output_text(text: str) -> dict[str, Any]:
    """One ``output_text`` content part, as OpenAI shapes it."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _content_parts(content: Any, role: str, param: str) -> list[dict[str, Any]]:
    """Message content as canonical parts (``input_text``/``output_text``, images by URL)."""
    assistant = role == "assistant"
    if isinstance(content, str):
        return [output_text(content) if assistant else {"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _invalid("Invalid content: expected a string or an array of parts.", param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, Mapping):
            raise _invalid("Invalid content part: expected an object.", where)
        kind = part.get("type")
        if kind in TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid("Invalid content part: 'text' must be a string.", f"{where}.text")
            parts.append(output_text(text) if assistant else {"type": "input_text", "text": text})
        elif kind == "refusal" and assistant and isinstance(part.get("refusal"), str):
            parts.append({"type": "refusal", "refusal": part["refusal"]})
        elif kind == "input_image" and not assistant:
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _invalid(
                    "Only images given by 'image_url' are supported by this server.",
                    f"{where}.image_url",
                )
            parts.append(
                {"type": "input_image", "image_url": url, "detail": part.get("detail") or "auto"}
            )
        else:
            raise _invalid(
                f"Content part type '{str(kind)[:40]}' is not supported by this server.",
                f"{where}.type",
            )
    return parts


def normalize_items(items: Sequence[Any], param: str = "input") -> list[dict[str, Any]]:
    """Validate input items and give each a fresh id (ids are never taken from the client)."""
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        if not isinstance(item, Mapping):
            raise _invalid("Invalid input item: expected an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in INPUT_ROLES:
                raise _invalid(
                    "Invalid 'role': expected one of user, assistant, system, developer.",
                    f"{where}.role",
                )
            out.append(
                {
                    "id": new_id("msg"),
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": _content_parts(item.get("content"), role, f"{where}.content"),
                }
            )
        elif kind == "function_call":
            fields = {k: item.get(k) for k in ("call_id", "name", "arguments")}
            for name, value in fields.items():
                if not isinstance(value, str):
                    raise _invalid(f"'{name}' must be a string.", f"{where}.{name}")
            out.append(
                {"id": new_id("fc"), "type": "function_call", "status": "completed", **fields}
            )
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _invalid("'call_id' must be a string.", f"{where}.call_id")
            if not isinstance(output, str):
                output = _flatten(
                    _content_parts(output, "tool", f"{where}.output") if output is not None else []
                )
            out.append(
                {
                    "id": new_id("fco"),
                    "type": "function_call_output",
                    "status": "completed",
                    "call_id": call_id,
                    "output": output,
                }
            )
        else:
            raise _invalid(
                f"Input item type '{str(kind)[:40]}' is not supported by this server.",
                f"{where}.type",
            )
    return out


def normalize_input(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """``input`` (a string or a list of items) as stored items."""
    if value is None:
        return []
    if isinstance(value, str):
        return normalize_items([{"role": "user", "content": value}])
    return normalize_items(value)


def _flatten(parts: Iterable[Mapping[str, Any]]) -> str:
    return "".join(p["text"] for p in parts if isinstance(p.get("text"), str))


def _chat_content(parts: Sequence[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """Parts as chat content: a plain string when it is one text, else chat parts."""
    if all(p.get("type") in TEXT_PARTS for p in parts):
        if len(parts) == 1:
            return str(parts[0]["text"])
        return [{"type": "text", "text": str(p["text"])} for p in parts]
    chat: list[dict[str, Any]] = []
    for part in parts:
        if part.get("type") in TEXT_PARTS:
            chat.append({"type": "text", "text": str(part["text"])})
        elif part.get("type") == "input_image":
            chat.append(
                {
                    "type": "image_url",
                    "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")},
                }
            )
    return chat


def items_to_messages(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored items as chat messages; consecutive function calls join one assistant message."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = "system" if item.get("role") == "developer" else str(item.get("role"))
            parts = [p for p in item.get("content") or () if isinstance(p, Mapping)]
            refusal = "".join(str(p["refusal"]) for p in parts if p.get("type") == "refusal")
            parts = [p for p in parts if p.get("type") != "refusal"]
            message: dict[str, Any] = {"role": role, "content": _chat_content(parts)}
            if refusal and not parts:
                message["content"] = refusal  # a refusal is what the model said
            messages.append(message)
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if (
                last is not None
                and last["role"] == "assistant"
                and ("tool_calls" in last or not last.get("content"))
            ):
                last.setdefault("tool_calls", []).append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else "",
                }
            )
    return messages


def _chat_parts(content: Any) -> list[dict[str, Any]]:
    """Chat content as Responses-style parts (for storing a chat turn)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, Mapping):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if isinstance(url, str):
                detail = image.get("detail") if isinstance(image, Mapping) else None
                parts.append({"type": "input_image", "image_url": url, "detail": detail})
        elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "refusal", "refusal": part["refusal"]})
    return parts


def chat_message_to_items(
    message: Mapping[str, Any], param: str = "messages"
) -> list[dict[str, Any]]:
    """One chat message as stored items (the chat ``conversation`` extension stores turns so).

    A content part that cannot be stored (audio, a file) is a 400 naming it, rather than being
    dropped: the message would be stored without it, and replayed so in every later turn.
    """
    role = message.get("role")
    content = message.get("content")
    for index, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in CHAT_PARTS:
            raise _invalid(
                f"Content part type '{str(kind)[:40]}' cannot be stored in a conversation.",
                f"{param}.content[{index}].type",
            )
    if role == "tool":
        output = content if isinstance(content, str) else _flatten(_chat_parts(content))
        return [
            {
                "id": new_id("fco"),
                "type": "function_call_output",
                "status": "completed",
                "call_id": str(message.get("tool_call_id") or ""),
                "output": output,
            }
        ]
    if role not in INPUT_ROLES:
        raise _invalid(
            f"Messages with role '{str(role)[:20]}' cannot be stored in a conversation.", param
        )
    items: list[dict[str, Any]] = []
    parts = _chat_parts(message.get("content"))
    refusal = message.get("refusal")
    if role == "assistant" and isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    calls = message.get("tool_calls") or []
    if parts or not calls:
        items.extend(normalize_items([{"type": "message", "role": role, "content": parts}], param))
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        items.append(
            {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "completed",
                "call_id": str(call.get("id") or new_id("call")),  # as a stream's (CallGatherer)
                "name": str(function.get("name") or ""),
                "arguments": str(function.get("arguments") or ""),
            }
        )
    return items


# -- the chat request ----------------------------------------------------------------------


def _chat_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise _invalid(
                f"Tool type '{str(tool.get('type'))[:40]}' is not supported by this server; "
                "only 'function' tools are.",
                f"tools[{index}].type",
            )
        if not isinstance(tool.get("name"), str):
            raise _invalid("'name' must be a string.", f"tools[{index}].name")
        function = {
            k: tool[k]
            for k in ("name", "description", "parameters", "strict")
            if tool.get(k) is not None
        }
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: str | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _invalid("Invalid 'tool_choice'.", "tool_choice")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _invalid("Only function tool choices are supported by this server.", "tool_choice")


def _response_format(text: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = text.get("format")
    if not isinstance(fmt, Mapping) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise _invalid("Unsupported 'text.format.type'.", "text.format.type")


PASSED_ON = ("service_tier", "prompt_cache_key", "safety_identifier")
"""Fields a Responses request and a chat request share, passed on as they are."""


def chat_body(
    req: ResponsesRequest, messages: list[dict[str, Any]], upstream_model: str
) -> dict[str, Any]:
    """The chat completion request a Responses request becomes."""
    body: dict[str, Any] = {"model": upstream_model, "messages": messages}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user", *PASSED_ON):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    if req.include and LOGPROBS in req.include:
        body["logprobs"] = True
        if req.top_logprobs is not None:
            body["top_logprobs"] = req.top_logprobs
    # A chat upstream refuses parallel_tool_calls, and a tool_choice, without tools; the
    # Responses API takes them (its response object always carries parallel_tool_calls).
    if req.tools:
        body["tools"] = _chat_tools(req.tools)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tool_choice is not None:
        choice = _chat_tool_choice(req.tool_choice)
        if req.tools or choice not in ("auto", "none"):  # without tools, those two say nothing
            body["tool_choice"] = choice
    if req.text:
        fmt = _response_format(req.text)
        if fmt is not None:
            body["response_format"] = fmt
    return body


# -- answers -------------------------------------------------------------------------------


def content_logprobs(choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's token log probabilities (``logprobs.content``): the objects a Responses
    text part holds (token, logprob, bytes, top_logprobs); none when not asked for or not sent."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def output_items(
    message: Mapping[str, Any],
    *,
    incomplete: bool = False,
    logprobs: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A chat completion's message as Responses output items (a message, function calls)."""
    status = "incomplete" if incomplete else "completed"
    content = message.get("content")
    text = content if isinstance(content, str) else _flatten(_chat_parts(content))
    refusal = message.get("refusal")
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, Mapping)]
    items: list[dict[str, Any]] = []
    if text or refusal or not calls:
        parts: list[dict[str, Any]] = []
        if text or not refusal:
            parts.append(output_text(text))
            if logprobs:
                parts[-1]["logprobs"] = logprobs
        if isinstance(refusal, str) and refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        items.append(
            {
                "id": new_id("msg"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": parts,
            }
        )
    for call in calls:
        function = call.get("function") or {}
        items.append(
            {
                "id": new_id("fc"),
                "type": "function_call",
                "status": status,
                "call_id": str(call.get("id") or new_id("call")),
                "name": str(function.get("name") or ""),
                "arguments": str(function.get("arguments") or ""),
            }
        )
    return items


def responses_usage(usage: Usage) -> dict[str, Any]:
    """Chat usage in the Responses shape."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def response_object(
    *,
    response_id: str,
    created_at: int,
    req: ResponsesRequest,
    model: str,
    truncation: str,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    usage: Usage | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object, as OpenAI returns it."""
    conversation_id = req.conversation_id
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "store": req.store,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_logprobs": req.top_logprobs,
        "reasoning": {
            "effort": req.reasoning.effort if req.reasoning else None,
            "summary": req.reasoning.summary if req.reasoning else None,
        },
        "service_tier": req.service_tier,
        "prompt_cache_key": req.prompt_cache_key,
        "safety_identifier": req.safety_identifier,
        "text": req.text or {"format": {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "truncation": truncation,
        "usage": responses_usage(usage) if usage is not None else None,
        "user": req.user,
        "metadata": req.metadata or {},
    }
