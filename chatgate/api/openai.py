"""The OpenAI-compatible ``/v1`` endpoints.

The request path of ``/v1/chat/completions`` reads top to bottom in :func:`chat_completions`:
authenticate (in-process cache, no database) -> validate -> route -> call the backend
-> answer (JSON, or SSE relayed event by event).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from aiohttp import web

from chatgate import errors
from chatgate.api.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    decode_json,
    validate,
)
from chatgate.auth import Principal
from chatgate.backends.router import Route
from chatgate.state import PRINCIPAL, REQUEST_ID, STATE, State

JSON = "application/json"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def read_body(request: web.Request) -> dict[str, Any]:
    """The JSON object body; 413 beyond ``max_body_bytes``, 400 when not JSON."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise errors.BodyTooLarge(
            f"The request body is larger than the limit of "
            f"{request.app[STATE].settings.max_body_bytes} bytes."
        ) from exc
    return decode_json(raw)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


async def authenticate(request: web.Request) -> tuple[State, Principal]:
    state = request.app[STATE]
    principal = await state.auth.authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = principal
    return state, principal


def route_for(state: State, principal: Principal, model: str) -> Route:
    """The route for ``model``, if this key may use it (404 unknown, 403 not allowed)."""
    route = state.router.resolve(model)
    if not principal.allows_model(model):
        raise errors.ModelNotAllowed(model)
    state.auth.mark_used(principal)
    return route


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state, principal = await authenticate(request)
    body = await read_body(request)
    chat = validate(body, ChatCompletionRequest)
    route = route_for(state, principal, chat.model)
    upstream = dict(body)
    upstream["model"] = route.model.upstream_model
    upstream.pop("conversation", None)
    if not chat.stream:
        result = await route.backend.chat(route.model, upstream)
        if result.raw is not None:
            return web.Response(body=result.raw, content_type=JSON)
        return json_response(result.body)

    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    stream = await route.backend.chat_stream(route.model, upstream, include_usage=include_usage)
    resp = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": request[REQUEST_ID]})
    try:
        await resp.prepare(request)
        async for event in stream:
            await resp.write(event)
    except ConnectionResetError:
        pass  # the client went away: stop the backend below; what was sent is metered
    finally:
        await stream.aclose()
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    body = await read_body(request)
    req = validate(body, EmbeddingRequest)
    route = route_for(state, principal, req.model)
    upstream = dict(body)
    upstream["model"] = route.model.upstream_model
    return json_response(await route.backend.embeddings(route.model, upstream))


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "chatgate"}


async def list_models(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    created = int(state.started_at)
    data = [
        _model_object(m.name, created)
        for m in state.router.models()
        if principal.allows_model(m.name)
    ]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    name = request.match_info["model"]
    route = state.router.resolve(name)
    if not principal.allows_model(name):
        raise errors.ModelNotFound(name)
    return json_response(_model_object(route.model.name, int(state.started_at)))


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)


__all__ = ["authenticate", "json_response", "read_body", "route_for", "setup"]
