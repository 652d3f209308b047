"""The OpenAI-compatible ``/v1`` endpoints.

The request path of ``/v1/chat/completions`` reads top to bottom in :func:`chat_completions`:
authenticate (in-process cache, no database) -> validate -> route -> call the backend
-> answer (JSON, or SSE relayed event by event).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson
from aiohttp import web

from chatgate import errors, tokens
from chatgate import meter as metering
from chatgate.api.bodies import body_bytes
from chatgate.api.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    decode_json,
    validate,
)
from chatgate.auth import Principal
from chatgate.backends.base import DONE_EVENT, ChatStream, Usage, reported_tokens
from chatgate.backends.local_embed import b64_floats
from chatgate.backends.router import ERROR_EVENT, Route
from chatgate.limits import Admission, budget_checks_for, checks_for, request_checks_for
from chatgate.sessions import ChatSession, prepare_chat
from chatgate.state import PRINCIPAL, REQUEST_ID, STATE, State
from chatgate.usage.tables import NANOS_PER_USD, to_nanos

R = TypeVar("R", bound="_ForModel")

JSON = "application/json"
#: Text an embeddings request may have for its tokens to be counted on the event loop (the
#: local model's tokenizer reads ~1 MB/s: ~50 ms); a longer one is counted in a thread.
INLINE_COUNT_CHARS = 64 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def read_body(request: web.Request) -> dict[str, Any]:
    """The JSON object body; 413 beyond ``max_body_bytes``, 400 when not JSON (and the
    errors of :func:`.bodies.body_bytes`)."""
    return decode_json(await body_bytes(request))


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


async def authenticate(request: web.Request) -> tuple[State, Principal]:
    state = request.app[STATE]
    principal = await state.auth.authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = principal
    return state, principal


async def admit_request(
    state: State, principal: Principal, label: str, meter: metering.Meter
) -> dict[str, str]:
    """Count one request against the key's and the account's request rates (rpm, rpd), or
    raise their 429; returns the ``x-ratelimit-*`` headers for the answer.

    For calls that use no model (session writes): they hold no slot and no tokens while they
    run, so the admission is settled at once. ``label`` stands where a refusal names a model.
    The meter notes the admission, as :meth:`Call.admit` does (a restart seeds the daily
    limits with it) and keeps the headers for an answer that fails after.
    """
    admission = await state.limits.admit(request_checks_for(principal), 0, label)
    await state.limits.settle_soon(admission, 0)
    meter.admitted = True
    meter.limit_headers = admission.headers
    return admission.headers


def route_for(state: State, principal: Principal, model: str) -> Route:
    """The route for ``model``, if this key may use it.

    A model the key may not use is the 404 of a model that does not exist, as ``GET
    /v1/models/{model}`` and OpenAI answer both: a key limited to some models does not learn
    which others the server has (it was a 403 ``model_not_allowed``: QA).
    """
    route = state.router.resolve(model)
    if not principal.allows_model(model):
        raise errors.ModelNotFound(model)
    return route


class _ForModel(Protocol):
    model: str


@dataclass(slots=True)
class Call(Generic[R]):
    """An API request past its prelude: metered, authenticated, validated and routed.

    Chat completions, embeddings and responses begin the same way (:func:`begin`) and take
    and settle their limits the same way (:meth:`admit`, :meth:`settle`); what differs is
    only how each counts the tokens it reserves.
    """

    state: State
    principal: Principal
    meter: metering.Meter
    body: dict[str, Any]
    req: R
    route: Route

    async def admit(
        self, prompt: Callable[[], int], output: int = 0, named: bool = True
    ) -> Admission:
        """Take the key's and the account's limits (one atomic call), or raise the 429.

        The tokens to hold are the prompt's plus ``output``, the most the answer may write;
        ``prompt`` counts them, and runs only when a check charges tokens, so a plan with
        request limits only never counts. The usage record notes the admission: a restart
        seeds the daily request limits with the requests admitted, not those refused before.

        ``named``: whether the client named ``output`` (``max_tokens``). One it did not name,
        the server's default (4,096), is held only as far as the tightest tokens-per-minute
        limit allows: a plan of 200 tokens a minute would refuse every such request as too
        large, for tokens the client never asked for. The answer's real tokens are charged
        when it ends (owed past the limit, if it wrote more).
        """
        principal = self.principal
        checks = principal.limit_checks or checks_for(principal)  # built once per key
        cost = prompt() + output if principal.limit_tokens else 0
        if not named and cost:
            ceiling = principal.token_ceiling
            if ceiling is not None and cost > ceiling:
                cost = max(ceiling, prompt())
        budgets = principal.budget_checks
        if budgets is None:
            budgets = budget_checks_for(principal)
        if not budgets:
            admission = await self.state.limits.admit(checks, cost, self.req.model)
        else:
            # A budget holds the prompt at the input price and the output at its own price.
            nanos = math.ceil(self.route.model.cost(prompt(), output) * NANOS_PER_USD)
            admission = await self.state.limits.admit_with_budget(
                checks, cost, budgets, nanos, self.req.model
            )
        meter = self.meter
        meter.admitted = True
        meter.limit_headers = admission.headers
        return admission

    async def settle(self, admission: Admission) -> None:
        """Charge the tokens really used and free the slot (in a ``finally``: always once).

        Never waits on Redis: the settlement is queued and rides on this process's next
        admission (see :meth:`Limits.settle_soon`), so neither the answer nor the next
        request on this connection waits for it.
        """
        self.meter.backend = self.route.backend_name  # a fallback may have answered
        await self.state.limits.settle_soon(admission, self.meter.total_tokens)
        if admission.budget is not None:  # what the answer cost, in nano-dollars
            await self.state.limits.settle_soon(admission.budget, to_nanos(self.meter.cost))


class _Once:
    """A token count made on first use and kept: the reservation and the meter share it.

    What ``functools.cache`` on a function of the request would do, without building a
    wrapper per request (``update_wrapper``: ~135 Python steps, 2-3% of a whole request).
    """

    __slots__ = ("_count", "_value")

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count
        self._value = -1  # not counted yet (a count is never negative)

    def __call__(self) -> int:
        if self._value < 0:
            self._value = self._count()
        return self._value

    async def count_in_thread(self) -> None:
        """Count now, in a thread: for text long enough that counting it would hold the event
        loop (and every other request) for a while."""
        if self._value < 0:
            self._value = await asyncio.to_thread(self._count)


async def begin(request: web.Request, endpoint: str, schema: type[R]) -> Call[R]:
    """Meter -> authenticate (in-process cache) -> read and validate the body -> route.

    The meter starts first, so a request refused at any step is still recorded (with the key
    and model once they are known).
    """
    meter = metering.start(request, endpoint)
    state, principal = await authenticate(request)
    meter.identify(principal)
    body = await read_body(request)
    req = validate(body, schema)
    meter.model, meter.streamed = req.model, bool(getattr(req, "stream", False))
    route = route_for(state, principal, req.model)
    meter.backend = route.backend_name
    return Call(state, principal, meter, body, req, route)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    call = await begin(request, "chat.completions", ChatCompletionRequest)
    state, chat, route, meter = call.state, call.req, call.route, call.meter
    upstream = dict(call.body)  # the router puts each deployment's upstream model name in
    upstream.pop("conversation", None)
    # Sessions: `conversation` prepends the stored history, trimmed to the model's window.
    session: ChatSession | None = None
    if chat.conversation is not None:
        # 404 when not this account's
        session = await prepare_chat(state, call.principal, route, call.body)
        upstream["messages"] = session.messages
        meter.conversation_id = session.conversation_id

    counting_model = route.model.upstream_model
    # Counted once: the reservation and, without upstream usage, the meter.
    prompt_tokens = _Once(
        lambda: tokens.count_messages(upstream["messages"], counting_model, chat.tools)
    )
    # Each of the ``n`` choices may write the whole output budget.
    named = chat.output_limit
    admission = await call.admit(
        prompt_tokens,
        (chat.n or 1) * (named or state.settings.default_max_tokens),
        named is not None,
    )
    headers = admission.headers
    try:
        if not chat.stream:
            result = await route.chat(upstream)
            usage = result.usage or _counted(prompt_tokens, counting_model, _text_of(result.body))
            meter.add_usage(usage, route.model)
            if session is not None:  # store the new turn and the answer
                await session.commit(result.body)
            # Settled (below) before it leaves: its headers give back what was not used.
            headers = admission.settled_headers(meter.total_tokens)
            if result.usage is None:  # the client sees the count it is billed for
                return json_response({**result.body, "usage": usage.to_openai()}, headers=headers)
            if result.raw is not None:
                return web.Response(body=result.raw, content_type=JSON, headers=headers)
            return json_response(result.body, headers=headers)
        return await _relay_stream(
            request, route, upstream, chat, prompt_tokens, headers, meter, session
        )
    finally:  # before the answer leaves (JSON), after it has (a stream), or on a failure
        await call.settle(admission)


async def _relay_stream(
    request: web.Request,
    route: Route,
    upstream: dict[str, Any],
    chat: ChatCompletionRequest,
    prompt_tokens: Callable[[], int],
    headers: dict[str, str],
    meter: metering.Meter,
    session: ChatSession | None = None,
) -> web.StreamResponse:
    """Relay the backend's SSE events as they come; meter what was sent, even if cut off.

    A backend that reports no usage (or one refused, see :func:`reported_tokens`) is metered by
    the gateway's own count, and a client that asked for usage gets that count in the usage
    chunk before ``[DONE]``: what it is shown is what it is billed for.
    """
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    stream = await route.chat_stream(upstream, include_usage=include_usage)

    def counted() -> Usage:
        return _counted(prompt_tokens, route.model.upstream_model, stream.completion_text)

    batches = stream.batches() if session is None else session.relay(stream.batches())
    if include_usage:
        batches = _usage_before_done(batches, stream, counted)
    resp = web.StreamResponse(
        headers={**SSE_HEADERS, **headers, "x-request-id": request[REQUEST_ID]}
    )
    try:
        await resp.prepare(request)
        meter.status = resp.status  # sent: a cancel from here on does not change it
        # With a session, relay() stores the turn just before [DONE] reaches the client.
        # Events that arrived together leave together: one write (a system call), which for
        # the batch holding [DONE] also ends the body. Nothing may follow [DONE]: the rest
        # is read (so the upstream connection is kept) but not sent.
        ended = False
        async for batch in batches:
            if ended:
                continue
            if DONE_EVENT in batch:
                ended = True
                del batch[batch.index(DONE_EVENT) + 1 :]
                await resp.write_eof(b"".join(batch))
            else:
                await resp.write(batch[0] if len(batch) == 1 else b"".join(batch))
    except ConnectionResetError:
        meter.error_code = "client_disconnected"  # stop the backend below; still metered
    finally:
        try:
            await stream.aclose()
        finally:  # metered also when a second cancel (a stop, then its closed connection) cuts
            meter.first_byte_at = stream.first_byte_at  # the close short
            meter.add_usage(stream.usage or counted(), route.model)
            if stream.failure is not None:
                meter.broken(stream.failure)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def _usage_before_done(
    batches: AsyncIterable[list[bytes]], stream: ChatStream, counted: Callable[[], Usage]
) -> AsyncIterator[list[bytes]]:
    """``batches``, with the gateway's own usage chunk just before ``[DONE]`` when the backend
    sent none (or a refused one, which it dropped); the count becomes the stream's usage.

    A stream the backend ends without ``[DONE]`` (some servers do) gets the chunk last; one
    that ends in an error event (broken off, timed out) gets none after the error.
    """
    last = b""
    async for batch in batches:
        if stream.usage is None and DONE_EVENT in batch:
            stream.usage = counted()
            batch.insert(batch.index(DONE_EVENT), stream.usage_event(stream.usage))
        last = batch[-1]
        yield batch
    if stream.usage is None and not last.startswith(ERROR_EVENT):
        stream.usage = counted()
        yield [stream.usage_event(stream.usage)]


def _counted(prompt_tokens: Callable[[], int], model: str, completion: str) -> Usage:
    """Usage by counting (the prompt sent, ``completion`` generated), for upstreams that do not
    report it or report a count chatgate refuses; whole answers and streams alike."""
    return Usage(prompt_tokens(), tokens.count_text(completion, model))


def message_text(message: Any) -> str:
    """The generated text of one answer message: its content and tool-call arguments (what
    an upstream sent in another shape counts no text, as in a stream: .backends.sse)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    parts = [content] if isinstance(content, str) else []
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if arguments is not None:
            parts.append(str(arguments))
    return "".join(parts)


def _text_of(answer: dict[str, Any]) -> str:
    """The generated text of a whole answer, all its choices."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return ""
    return "".join(message_text(c.get("message")) for c in choices if isinstance(c, dict))


async def embeddings(request: web.Request) -> web.Response:
    call = await begin(request, "embeddings", EmbeddingRequest)
    req, route = call.req, call.route
    upstream_model = route.model.upstream_model

    texts = [req.input] if isinstance(req.input, str) else req.input

    def count() -> int:
        return sum(
            tokens.count_input(t, upstream_model)
            if isinstance(t, str)
            else len(t)
            if isinstance(t, list)
            else 1
            for t in texts
        )

    reserve = _Once(count)  # counted once: the admission and the metering share it
    if sum(len(t) for t in texts if isinstance(t, str)) > INLINE_COUNT_CHARS:
        await reserve.count_in_thread()
    admission = await call.admit(reserve)
    try:
        body = dict(call.body)
        if "encoding_format" in body and body["encoding_format"] is None:
            del body["encoding_format"]  # null: the default, as dimensions' null is (QA)
        answer = await route.embeddings(body)
        usage = answer.get("usage") or {}
        prompt = reported_tokens(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        used = reserve() if prompt is None else prompt
        call.meter.add_usage(Usage(used, 0), route.model)
        if prompt is None:  # the client sees the count it is billed for
            answer = {**answer, "usage": {"prompt_tokens": used, "total_tokens": used}}
        if req.encoding_format == "base64":
            answer = _as_base64(answer)
        return json_response(answer, headers=admission.headers)
    finally:
        await call.settle(admission)


def _as_base64(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` with its vectors in OpenAI's base64 (little-endian float32), as the client
    asked: an upstream that ignores ``encoding_format`` (many servers do) sent lists of
    numbers, and a raw HTTP client that asked for base64 got them (QA). Anything else as sent."""
    data = answer.get("data")
    if not isinstance(data, list):
        return answer
    items = []
    for item in data:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list) and all(type(v) is float or type(v) is int for v in vector):
            item = {**item, "embedding": b64_floats(vector)}
        items.append(item)
    return {**answer, "data": items}


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


__all__ = [
    "Call",
    "authenticate",
    "begin",
    "json_response",
    "message_text",
    "read_body",
    "route_for",
    "setup",
]
