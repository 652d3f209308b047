"""``/openapi.json``, generated from the msgspec models in :mod:`chatgate.api.schemas`."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from chatgate import __version__
from chatgate.api import leaks, manage, openapi_extra, schemas

_MODELS = (
    schemas.ChatCompletionRequest,
    schemas.ChatCompletion,
    schemas.EmbeddingRequest,
    schemas.Model,
    schemas.ModelList,
    schemas.ErrorResponse,
)
_REF = "#/components/schemas/{name}"


# A stream's events (openapi_extra.SSE_EVENT): ``data`` is a ``chat.completion.chunk`` as JSON,
# an ``{"error": ...}`` after a failure, or ``[DONE]`` last.
_SSE_EVENT = openapi_extra.SSE_EVENT


def _ref(model: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=model.__name__)}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": "Error",
            "content": {"application/json": {"schema": _ref(schemas.ErrorResponse)}},
        }
        for status in statuses
    }


def _json(model: type, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API (built once)."""
    _, components = msgspec.json.schema_components(
        _MODELS + openapi_extra.MODELS, ref_template=_REF
    )
    secured: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "chatgate", "version": __version__},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _ref(schemas.ChatCompletionRequest)}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "A completion, or an SSE stream when `stream` is true",
                            "content": {
                                "application/json": {"schema": _ref(schemas.ChatCompletion)},
                                "text/event-stream": {"schema": _SSE_EVENT},
                            },
                        },
                        **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                    },
                }
            },
            "/v1/embeddings": {
                "post": {
                    "operationId": "createEmbedding",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(schemas.EmbeddingRequest)}},
                    },
                    "responses": {
                        "200": {"description": "Embeddings", "content": {"application/json": {}}},
                        **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "security": secured,
                    "responses": {"200": _json(schemas.ModelList), **_errors(401)},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "operationId": "retrieveModel",
                    "security": secured,
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": _json(schemas.Model), **_errors(401, 404)},
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {"200": {"description": "The process is up"}},
                }
            },
        },
    }
    # The management API (/api/*) documents its own paths.
    document["paths"].update(manage.openapi_paths())
    document["paths"].update(leaks.openapi_paths())
    document["paths"].update(openapi_extra.paths())
    document["components"]["securitySchemes"].update(manage.openapi_security_schemes())
    return document
