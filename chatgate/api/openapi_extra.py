"""OpenAPI paths of the session, usage and operations endpoints (merged by :mod:`.openapi`).

Request bodies point at the msgspec models the handlers validate with; answers are described
as JSON objects (OpenAI's shapes), errors as the shared error schema.
"""

from __future__ import annotations

from typing import Any

from chatgate.api.conversations import ConversationCreate, ConversationUpdate, ItemsCreate
from chatgate.sessions.responses import ResponsesRequest

MODELS: tuple[type, ...] = (ResponsesRequest, ConversationCreate, ConversationUpdate, ItemsCreate)
_REF = "#/components/schemas/{name}"
_OBJECT: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
_ERROR: dict[str, Any] = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorResponse")}}},
}
_SECURED: list[dict[str, list[str]]] = [{"bearerAuth": []}]
# One event of a stream (before OpenAPI 3.2 a stream's ``schema`` describes each of its events).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def _op(
    op_id: str,
    *errors: int,
    body: type | None = None,
    params: tuple[str, ...] = (),
    query: tuple[tuple[str, dict[str, Any]], ...] = (),
    secured: bool = True,
    streams: bool = False,
) -> dict[str, Any]:
    """An operation; ``streams``: its 200 may be an SSE stream too (``stream: true``)."""
    ok = {**_OBJECT, "text/event-stream": {"schema": SSE_EVENT}} if streams else _OBJECT
    operation: dict[str, Any] = {
        "operationId": op_id,
        "responses": {
            "200": {"description": "OK", "content": ok},
            **{str(status): _ERROR for status in errors},
        },
    }
    if secured:
        operation["security"] = _SECURED
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ] + [
        {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in query
    ]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=body.__name__)}}},
        }
    return operation


_USAGE_QUERY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("start_time", {"type": "integer"}),
    ("end_time", {"type": "integer"}),
    ("bucket_width", {"type": "string", "enum": ["1m", "1h", "1d"]}),
    ("group_by", {"type": "string"}),
    ("api_key_ids", {"type": "string"}),
    ("models", {"type": "string"}),
    ("limit", {"type": "integer"}),
    ("page", {"type": "string"}),
)
_CONV = ("conversation_id",)
_ITEM = ("conversation_id", "item_id")


def paths() -> dict[str, Any]:
    """The paths this module documents."""
    return {
        "/v1/responses": {
            "post": _op(
                "createResponse",
                *(400, 401, 403, 404, 413, 429, 502, 503, 504),
                body=ResponsesRequest,
                streams=True,
            )
        },
        "/v1/responses/{response_id}": {
            "get": _op("retrieveResponse", 401, 404, params=("response_id",)),
            "delete": _op("deleteResponse", 401, 404, params=("response_id",)),
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _op("listInputItems", 400, 401, 404, params=("response_id",)),
        },
        "/v1/conversations": {
            "post": _op("createConversation", 400, 401, 413, 429, 503, body=ConversationCreate)
        },
        "/v1/conversations/{conversation_id}": {
            "get": _op("retrieveConversation", 401, 404, params=_CONV),
            "post": _op(
                "updateConversation",
                *(400, 401, 404, 429, 503),
                body=ConversationUpdate,
                params=_CONV,
            ),
            "delete": _op("deleteConversation", 401, 404, params=_CONV),
        },
        "/v1/conversations/{conversation_id}/items": {
            "get": _op("listConversationItems", 400, 401, 404, params=_CONV),
            "post": _op(
                "createConversationItems",
                *(400, 401, 404, 413, 429, 503),
                body=ItemsCreate,
                params=_CONV,
            ),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": _op("retrieveConversationItem", 401, 404, params=_ITEM),
            "delete": _op("deleteConversationItem", 401, 404, params=_ITEM),
        },
        "/v1/organization/usage/completions": {
            "get": _op("usageCompletions", 400, 401, query=_USAGE_QUERY)
        },
        "/v1/organization/usage/embeddings": {
            "get": _op("usageEmbeddings", 400, 401, query=_USAGE_QUERY)
        },
        "/api/usage": {
            "get": _op(
                "dashboardUsage",
                400,
                401,
                403,
                query=(
                    ("since", {"type": "string", "examples": ["30d"]}),
                    ("start_time", {"type": "integer", "minimum": 0}),
                    ("end_time", {"type": "integer", "minimum": 0}),
                    ("api_key_id", {"type": "string"}),
                    ("model", {"type": "string"}),
                    ("account_id", {"type": "string"}),
                ),
            )
        },
        "/api/admin/backends": {"get": _op("adminBackends", 401, 404)},
        "/readyz": {"get": _op("ready", 503, secured=False)},
    }
