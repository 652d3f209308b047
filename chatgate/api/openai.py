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

from chatgate import errors, tokens
from chatgate import meter as metering
from chatgate.api.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    decode_json,
    validate,
)
from chatgate.auth import Principal
from chatgate.backends.base import Usage
from chatgate.backends.router import Route
from chatgate.limits import Admission, checks_for, needs_tokens
from chatgate.sessions import ChatSession, prepare_chat
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
    meter = metering.start(request, "chat.completions")
    state, principal = await authenticate(request)
    meter.identify(principal)
    body = await read_body(request)
    chat = validate(body, ChatCompletionRequest)
    meter.model, meter.streamed = chat.model, chat.stream
    route = route_for(state, principal, chat.model)
    meter.backend = route.backend_name
    upstream = dict(body)  # the router puts each deployment's upstream model name in
    upstream.pop("conversation", None)
    # Sessions: `conversation` prepends the stored history, trimmed to the model's window.
    session: ChatSession | None = None
    if chat.conversation is not None:
        session = await prepare_chat(state, principal, route, body)  # 404: not this account's
        upstream["messages"] = session.messages
        meter.conversation_id = session.conversation_id

    # Limits: key then account, all taken in one atomic call; tokens reserved up front.
    checks = checks_for(principal)
    counting_model = route.model.upstream_model
    reserve = 0
    if needs_tokens(checks):
        prompt = tokens.count_messages(upstream["messages"], counting_model, chat.tools)
        reserve = prompt + (chat.output_limit or state.settings.default_max_tokens)
    admitted = await state.limits.admit(checks, reserve, chat.model)
    headers = admitted.headers
    admission: Admission | None = admitted  # None once settled
    try:
        if not chat.stream:
            result = await route.chat(upstream)
            usage = result.usage or _counted(upstream, counting_model, chat, result.body)
            meter.add_usage(usage, route.model)
            if session is not None:  # store the new turn and the answer
                await session.commit(result.body)
            # The answer is complete: settle now, without waiting on Redis to send it.
            meter.backend = route.backend_name
            await state.limits.settle_soon(admission, meter.total_tokens)
            admission = None
            if result.raw is not None:
                return web.Response(body=result.raw, content_type=JSON, headers=headers)
            return json_response(result.body, headers=headers)
        return await _relay_stream(request, route, upstream, chat, headers, meter, session)
    finally:
        if admission is not None:  # a stream (sent already), or a failure
            meter.backend = route.backend_name
            await state.limits.settle(admission, meter.total_tokens)


async def _relay_stream(
    request: web.Request,
    route: Route,
    upstream: dict[str, Any],
    chat: ChatCompletionRequest,
    headers: dict[str, str],
    meter: metering.Meter,
    session: ChatSession | None = None,
) -> web.StreamResponse:
    """Relay the backend's SSE events as they come; meter what was sent, even if cut off."""
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    stream = await route.chat_stream(upstream, include_usage=include_usage)
    resp = web.StreamResponse(
        headers={**SSE_HEADERS, **headers, "x-request-id": request[REQUEST_ID]}
    )
    held: list[bytes] = []
    try:
        await resp.prepare(request)
        # With a session, relay() stores the turn just before [DONE] reaches the client.
        # Events that arrived together leave together: one write (a system call) for all
        # those already in hand, never holding one back to wait for the upstream.
        async for event in stream if session is None else session.relay(stream):
            held.append(event)
            if not stream.buffered:
                await resp.write(held[0] if len(held) == 1 else b"".join(held))
                held.clear()
        if held:
            await resp.write(b"".join(held))
    except ConnectionResetError:
        meter.error_code = "client_disconnected"  # stop the backend below; still metered
    finally:
        await stream.aclose()
        meter.first_byte_at = stream.first_byte_at
        usage = stream.usage
        if usage is None:
            model = route.model.upstream_model
            usage = Usage(
                tokens.count_messages(upstream["messages"], model, chat.tools),
                tokens.count_text(stream.completion_text, model),
            )
        meter.add_usage(usage, route.model)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def _counted(
    upstream: dict[str, Any], model: str, chat: ChatCompletionRequest, answer: dict[str, Any]
) -> Usage:
    """Usage by counting, for upstreams that do not report it."""
    text = []
    for choice in answer.get("choices") or ():
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            text.append(message["content"])
        for call in message.get("tool_calls") or ():
            text.append(str((call.get("function") or {}).get("arguments", "")))
    return Usage(
        tokens.count_messages(upstream["messages"], model, chat.tools),
        tokens.count_text("".join(text), model),
    )


async def embeddings(request: web.Request) -> web.Response:
    meter = metering.start(request, "embeddings")
    state, principal = await authenticate(request)
    meter.identify(principal)
    body = await read_body(request)
    req = validate(body, EmbeddingRequest)
    meter.model = req.model
    route = route_for(state, principal, req.model)
    meter.backend = route.backend_name
    upstream = dict(body)
    checks = checks_for(principal)
    reserve = 0
    if needs_tokens(checks):
        texts = [req.input] if isinstance(req.input, str) else req.input
        reserve = sum(
            tokens.count_text(t, route.model.upstream_model)
            if isinstance(t, str)
            else len(t)
            if isinstance(t, list)
            else 1
            for t in texts
        )
    admission = await state.limits.admit(checks, reserve, req.model)
    try:
        answer = await route.embeddings(upstream)
        usage = answer.get("usage") or {}
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        meter.add_usage(Usage(prompt if isinstance(prompt, int) else reserve, 0), route.model)
        return json_response(answer, headers=admission.headers)
    finally:
        meter.backend = route.backend_name
        await state.limits.settle(admission, meter.total_tokens)


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
