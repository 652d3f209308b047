"""Request and response models (msgspec), used to validate bodies and to build /openapi.json.

Validation keeps OpenAI's leniency where the body goes to a model: unknown fields are accepted
and forwarded to the backend. The bodies chatgate keeps itself (conversations, keys) refuse
them, as OpenAI's do. Known fields are type- and range-checked, and an error names the
offending ``param``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson

from chatgate import errors

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        # What OpenAI refuses too (msgspec names the message: messages[i]).
        if self.content is None and self.role in ("system", "developer", "user", "tool"):
            raise ValueError(f"a {self.role} message needs its `content`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the `tool_call_id` it answers")


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions``. ``conversation`` is chatgate's session extension."""

    model: Name
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None  # as OpenAI
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    conversation: str | None = None

    def __post_init__(self) -> None:
        if self.tools is not None or self.tool_choice is not None:
            check_tools(self.tools, self.tool_choice)
        # What OpenAI refuses, and an upstream would take and ignore.
        if self.stream_options is not None and not self.stream:
            raise errors.InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise errors.InvalidRequest(
                "Invalid value for 'top_logprobs': 'logprobs' must be true to use it.",
                param="top_logprobs",
                code="invalid_value",
            )
        if self.response_format is not None:
            check_response_format(self.response_format)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def check_tools(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None) -> None:
    """Tools as OpenAI takes them: each with a ``type`` (a function's with its ``name``), and a
    ``tool_choice`` other than ``none``/``auto`` only beside tools; a 400 naming the field."""
    for i, tool in enumerate(tools or ()):
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise errors.InvalidRequest(
                f"Missing required parameter: 'tools[{i}].type'.",
                param=f"tools[{i}].type",
                code="missing_required_parameter",
            )
        function = tool.get("function")
        if kind == "function" and not (
            isinstance(function, dict) and isinstance(function.get("name"), str)
        ):
            raise errors.InvalidRequest(
                f"Missing required parameter: 'tools[{i}].function.name'.",
                param=f"tools[{i}].function",
                code="missing_required_parameter",
            )
    if choice not in (None, "none", "auto") and not tools:
        raise errors.InvalidRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
            code="invalid_value",
        )
    if isinstance(choice, dict) and not isinstance(choice.get("type"), str):
        raise errors.InvalidRequest(
            "Missing required parameter: 'tool_choice.type'.",
            param="tool_choice.type",
            code="missing_required_parameter",
        )


def check_response_format(value: dict[str, Any]) -> None:
    """``{"type": "text" | "json_object" | "json_schema"}``, a schema's with its ``name``."""
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise errors.InvalidRequest(
            "Invalid value for 'response_format.type': expected one of 'text', 'json_object' "
            "or 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    schema = value.get("json_schema")
    if kind == "json_schema" and not (
        isinstance(schema, dict) and isinstance(schema.get("name"), str)
    ):
        raise errors.InvalidRequest(
            "Missing required parameter: 'response_format.json_schema.name'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``."""

    model: Name
    # A string, a list of strings, or token arrays; element types are checked by the backend
    # (msgspec unions allow one array-like type).
    input: str | Annotated[list[Any], msgspec.Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] | None = "float"  # null: the default
    dimensions: PositiveInt | None = None
    user: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(msgspec.Struct):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(.*)`$")
_AT_KEY = re.compile(r" - at `key` in `\$\.?(.*)`$")  # a key of the object at that path
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")


# orjson reads up to 1,024 levels of arrays and objects but writes at most 254, so a body
# nested deeper than that parsed and then failed where it was forwarded or stored (a 500).
MAX_DEPTH = 254
# The fewest bytes a body nested MAX_DEPTH + 1 deep can have: that many "[" and "]".
_DEEP_BYTES = 2 * (MAX_DEPTH + 1)


def decode_json(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body; 400 for anything else, or nested beyond :data:`MAX_DEPTH`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if exc.msg == "depth limit exceeded":
            raise _too_deep() from exc
        if "surrogate" in exc.msg:  # valid JSON text Python cannot hold (QA: the HINT misled)
            raise errors.InvalidRequest(
                "The JSON body has a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                "its pair, as a string cut in the middle of an emoji leaves): no text may hold "
                f"one ({exc.msg}).",
                code="invalid_json",
            ) from exc
        raise errors.InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from exc
    if not isinstance(data, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if len(body) >= _DEEP_BYTES:
        # Only a body this long can be too deep. Writing it is the check (orjson fails where
        # the forwarding would): 0.7 us for 3 kB, 8 us for 100 kB, a fifth to a quarter of
        # the parse; counting its brackets (bytes.count) would cost more than that.
        try:
            orjson.dumps(data)
        except TypeError as exc:  # orjson.JSONEncodeError: only depth, for what loads made
            raise _too_deep() from exc
    return data


def _too_deep() -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"The JSON body of your request is nested too deeply: at most {MAX_DEPTH} levels of "
        "arrays and objects are accepted.",
        code="invalid_json",
    )


def validate(data: dict[str, Any], model: type[T]) -> T:
    """Check ``data`` against ``model``; a 400 naming the ``param`` when it does not fit."""
    try:
        return msgspec.convert(data, model)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from exc


def unknown_parameter(name: str) -> errors.InvalidRequest:
    """OpenAI's 400 for a field a body does not have (its name cut short: it is the caller's)."""
    name = name[:40]
    return errors.InvalidRequest(
        f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
    )


def validation_error(text: str) -> errors.InvalidRequest:
    """Turn msgspec's message into OpenAI's wording and ``param`` (``messages[0].role``)."""
    param = None
    key = _AT_KEY.search(text)
    if key:  # the object is the param; the message says it is one of its keys
        param = key.group(1) or None
        where = f" in '{param}'" if param else ""
        return errors.InvalidRequest(
            f"Invalid key{where}: {_AT_KEY.sub('', text)}.", param=param, code="invalid_value"
        )
    at = _AT.search(text)
    detail = _AT.sub("", text)
    if at:
        param = at.group(1) or None
    missing = _MISSING.search(detail)
    if missing:
        field = missing.group(1)
        param = f"{param}.{field}" if param else field
        return errors.InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    unknown = _UNKNOWN.search(detail)
    if unknown:  # a struct that forbids unknown fields
        field = unknown.group(1)
        return unknown_parameter(f"{param}.{field}" if param else field)
    where = f" for '{param}'" if param else ""
    return errors.InvalidRequest(
        f"Invalid value{where}: {detail}.", param=param, code="invalid_value"
    )
