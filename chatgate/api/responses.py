"""``/v1/responses``: OpenAI's Responses API, served by any chat backend.

``POST /v1/responses`` reads top to bottom in :func:`create_response`: authenticate -> validate
-> route (the key's model check) -> load the history (``previous_response_id`` or
``conversation``; 404 when not this account's) -> trim it to the model's window -> limits
(tokens reserved for the whole prompt, history included) -> call the backend's chat completion
-> translate the answer (JSON, or Responses stream events) -> store the turn -> answer.
The history read is the one database round trip a session request adds before the call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Literal

from aiohttp import web

from chatgate import errors, tokens
from chatgate import meter as metering
from chatgate.api.openai import SSE_HEADERS, authenticate, begin, json_response, message_text
from chatgate.backends.base import ChatStream, Usage
from chatgate.backends.router import Route
from chatgate.ids import new_id
from chatgate.sessions.chat import build_context, sessions_store
from chatgate.sessions.response_stream import StreamTranslator, parse_chunks, sse
from chatgate.sessions.responses import (
    ResponsesRequest,
    chat_body,
    content_logprobs,
    items_to_messages,
    normalize_input,
    output_items,
    response_object,
)
from chatgate.sessions.store import ItemPage, SessionStore
from chatgate.sessions.trim import Policy, policy_from_settings
from chatgate.state import REQUEST_ID

__all__ = ["list_page", "page_params", "setup"]

log = logging.getLogger(__name__)
TRUNCATION: dict[str, Policy] = {"auto": "drop_oldest", "disabled": "error"}


async def create_response(request: web.Request) -> web.StreamResponse:
    call = await begin(request, "responses", ResponsesRequest)
    state, req, route = call.state, call.req, call.route  # the model is the request's, always
    conversation_id = req.conversation_id
    if conversation_id is not None and req.previous_response_id is not None:
        raise errors.InvalidRequest(
            "'previous_response_id' cannot be used together with 'conversation'.",
            param="conversation",
        )
    call.meter.conversation_id = conversation_id
    store = sessions_store(state)
    account = call.principal.account_id

    # The history: one query for a conversation, two for a chain of responses.
    new_items = normalize_input(req.input)
    if req.previous_response_id is not None:
        history = await store.response_history(account, req.previous_response_id)
    elif conversation_id is not None:
        history = await store.conversation_items(account, conversation_id)
    else:
        history = []
    if not new_items and not history:
        raise errors.InvalidRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    policy = TRUNCATION[req.truncation] if req.truncation else policy_from_settings(state.settings)
    upstream = chat_body(req, [], route.model.upstream_model)  # 400s for unsupported tools
    context = build_context(
        head=[{"role": "system", "content": req.instructions}] if req.instructions else [],
        history=items_to_messages(item.data for item in history),
        new=items_to_messages(new_items),
        model=route.model,
        settings=state.settings,
        requested_output=req.max_output_tokens,
        policy=policy,
        tools=upstream.get("tools"),
        param="input",
    )
    upstream["messages"] = context.messages
    admission = await call.admit(
        lambda: context.prompt_tokens,
        req.max_output_tokens or state.settings.default_max_tokens,
        req.max_output_tokens is not None,
    )
    turn = _Turn(
        store=store,
        account_id=account,
        req=req,
        route=route,
        response_id=new_id("resp"),
        created_at=int(time.time()),
        truncation="auto" if policy == "drop_oldest" else "disabled",
        inputs=new_items,
        prompt_tokens=context.prompt_tokens,
    )
    try:
        if not req.stream:
            result = await route.chat(upstream)
            choices = result.body.get("choices") or [{}]
            message = choices[0].get("message") or {}
            usage = result.usage or turn.counted(message_text(message))
            call.meter.add_usage(usage, route.model)
            incomplete = choices[0].get("finish_reason") == "length"
            outputs = output_items(
                message, incomplete=incomplete, logprobs=content_logprobs(choices[0])
            )
            response = turn.response("incomplete" if incomplete else "completed", outputs, usage)
            stored = await turn.saved(response, outputs, usage)
            # Settled (below) before it leaves: its headers give back what was not used.
            settled = admission.settled_headers(call.meter.total_tokens)
            return json_response(stored, headers=settled)
        stream = await route.chat_stream(upstream, include_usage=True)
        return await _relay(request, turn, stream, admission.headers, call.meter)
    except errors.InvalidRequest as exc:
        if exc.param != "response_format":
            raise
        # A backend refuses the chat field this request's text.format became: named as sent.
        raise errors.InvalidRequest(
            exc.message.replace("'response_format'", "'text.format'"),
            param="text.format",
            code=exc.code,
        ) from exc
    finally:
        await call.settle(admission)


class _Turn:
    """The parts of one Responses turn the answer paths share."""

    def __init__(
        self,
        *,
        store: SessionStore,
        account_id: str,
        req: ResponsesRequest,
        route: Route,
        response_id: str,
        created_at: int,
        truncation: str,
        inputs: list[dict[str, Any]],
        prompt_tokens: int,
    ) -> None:
        self.store = store
        self.account_id = account_id
        self.req = req
        self.route = route
        self.response_id = response_id
        self.created_at = created_at
        self.truncation = truncation
        self.inputs = inputs
        self.prompt_tokens = prompt_tokens

    def counted(self, text: str) -> Usage:
        """Usage by counting, for upstreams that report none (the prompt was counted once)."""
        return Usage(self.prompt_tokens, tokens.count_text(text, self.route.model.upstream_model))

    def response(
        self,
        status: str,
        output: list[dict[str, Any]] | None = None,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            response_id=self.response_id,
            created_at=self.created_at,
            req=self.req,
            model=self.route.model.name,
            truncation=self.truncation,
            status=status,
            output=output,
            usage=usage,
            error=error,
        )

    async def save(
        self, response: dict[str, Any], outputs: list[dict[str, Any]], *, failed: bool = False
    ) -> None:
        """Store the turn. A conversation deleted while it ran does not fail it: the answer
        has been paid for and goes out (as chat's), and the response is kept on its own.
        A ``failed`` turn (the upstream broke off) is kept on its own too, retrievable with
        what it wrote, but adds nothing to its conversation, as a failed chat turn: half an
        answer is no history to show the model as its own words."""
        kept = await self.store.save_response(
            self.account_id,
            response,
            inputs=self.inputs,
            outputs=outputs,
            previous_response_id=self.req.previous_response_id,
            conversation_id=None if failed else self.req.conversation_id,
            store=self.req.store,
        )
        if not kept:
            log.warning("conversation %s was deleted during a turn", self.req.conversation_id)

    async def saved(
        self, response: dict[str, Any], outputs: list[dict[str, Any]], usage: Usage
    ) -> dict[str, Any]:
        """``response`` once stored; if it could not be (the database failed), the same
        response as ``failed`` with the output it was paid for: the client gets the answer,
        and learns that no later turn can refer to it."""
        try:
            await self.save(response, outputs)
        except Exception:
            log.exception("could not store response %s", self.response_id)
            return self.response(
                "failed",
                outputs,
                usage,
                {"code": "server_error", "message": "The response could not be stored."},
            )
        return response


async def _relay(
    request: web.Request,
    turn: _Turn,
    stream: ChatStream,
    headers: dict[str, str],
    meter: metering.Meter,
) -> web.StreamResponse:
    """Translate the chat stream into Responses events; store the turn before the last one."""
    translator = StreamTranslator(turn.response("in_progress"))
    resp = web.StreamResponse(
        headers={**SSE_HEADERS, **headers, "x-request-id": request[REQUEST_ID]}
    )
    usage: Usage | None = None
    try:
        await resp.prepare(request)
        meter.status = resp.status  # sent: a cancel from here on does not change it
        await resp.write(b"".join(sse(e) for e in translator.start()))
        async for batch in stream.batches():  # events in hand together leave together
            out: list[dict[str, Any]] = []
            for event in batch:
                chunks, _ = parse_chunks(event)
                out += [e for chunk in chunks for e in translator.feed(chunk)]
                if translator.error is not None:
                    break
            if out:
                await resp.write(b"".join(sse(e) for e in out))
            if translator.error is not None:
                break
        closing = translator.close()
        text = "".join(
            str(item.get("arguments") or "")
            if item["type"] == "function_call"
            else "".join(p.get("text") or p.get("refusal") or "" for p in item.get("content") or ())
            for item in translator.output
        )
        usage = translator.usage or stream.usage or turn.counted(text)
        meter.add_usage(usage, turn.route.model)
        if translator.error is None:
            status = "incomplete" if translator.finish_reason == "length" else "completed"
            response = turn.response(status, translator.output, usage)
            stored = await turn.saved(response, translator.output, usage)
            last = translator.completed(stored) if stored is response else translator.failed(stored)
        else:
            message = str(translator.error.get("message") or "The upstream failed.")
            meter.broken(stream.failure or errors.UpstreamError(message))
            response = turn.response(
                "failed", translator.output, usage, {"code": "server_error", "message": message}
            )
            try:  # announced by response.created: retrievable, as failed, with what it wrote
                await turn.save(response, translator.output, failed=True)
            except Exception:
                log.exception("could not store failed response %s", turn.response_id)
            last = translator.failed(response)
        await resp.write(b"".join(sse(e) for e in [*closing, last]))
    except ConnectionResetError:
        meter.error_code = "client_disconnected"  # stop the backend below; still metered
    finally:
        try:
            await stream.aclose()
        finally:  # metered also when a second cancel cuts the close short (as chat's relay)
            meter.first_byte_at = stream.first_byte_at
            if usage is None:  # cut off: meter what the model produced so far
                u = stream.usage or turn.counted(stream.completion_text)
                meter.add_usage(u, turn.route.model)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def get_response(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    stored = await sessions_store(state).get_response(
        principal.account_id, request.match_info["response_id"]
    )
    return json_response(stored.body)


async def delete_response(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    response_id = request.match_info["response_id"]
    await sessions_store(state).delete_response(principal.account_id, response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


def page_params(request: web.Request) -> tuple[str | None, int, Literal["asc", "desc"]]:
    """``after``, ``limit`` (1-100, default 20) and ``order`` (default ``desc``) of a listing."""
    query = request.query
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise errors.InvalidRequest(
            "Invalid 'limit': expected an integer from 1 to 100.", param="limit"
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.InvalidRequest("Invalid 'order': expected 'asc' or 'desc'.", param="order")
    return query.get("after") or None, limit, "asc" if order == "asc" else "desc"


def list_page(page: ItemPage) -> dict[str, Any]:
    """A page of items in OpenAI's list shape."""
    data = [item.to_openai() for item in page.items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }


async def list_input_items(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    after, limit, order = page_params(request)
    response_id = request.match_info["response_id"]
    page = await sessions_store(state).response_input_items(
        principal.account_id, response_id, after=after, limit=limit, order=order
    )
    return json_response(list_page(page))


def setup(app: web.Application) -> None:
    """Register the ``/v1/responses`` routes."""
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
