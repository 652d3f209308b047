"""``/v1/conversations``: OpenAI's Conversations API (conversations and their items).

Every route authenticates, then reads or writes only the caller's account's rows: another
account's conversation is a 404, exactly like one that does not exist. The writes that add
or change content (create, update, add items) count against the key's and the account's
request rates (rpm, rpd) once their body is valid; reads and deletions do not. Each write is
a request of the account's usage (endpoint ``conversations``, no model, no tokens), recorded
whatever its outcome as a chat request is: what counts against a limit shows in the usage,
and a restart seeds the per-day limits with it.

Also started here (in the app's cleanup context): the retention task, which every hour deletes
conversations idle for longer than ``session_retention_days`` and stored responses older
than that (``0`` keeps everything), and the start-up check of the ``context_trim`` policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from aiohttp import web

from chatgate import meter as metering
from chatgate.api.bodies import body_bytes
from chatgate.api.openai import admit_request, authenticate, json_response, read_body
from chatgate.api.responses import list_page, page_params
from chatgate.api.schemas import decode_json, validate
from chatgate.auth import Principal
from chatgate.ids import new_id
from chatgate.sessions.chat import sessions_store
from chatgate.sessions.responses import Metadata, normalize_items
from chatgate.sessions.store import MAX_ITEMS_PER_REQUEST, SessionStore
from chatgate.sessions.trim import policy_from_settings
from chatgate.state import STATE, State

__all__ = ["DEFAULT_RETENTION_DAYS", "prune_once", "setup"]

log = logging.getLogger(__name__)
DEFAULT_RETENTION_DAYS = 30
RETENTION_INTERVAL = 3600.0
LIMITED = "conversations"  # what a rate-limit refusal of a write names, where a model would be

Items = Annotated[list[Any], msgspec.Meta(max_length=MAX_ITEMS_PER_REQUEST)]


class ConversationCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/conversations``."""

    items: Items | None = None
    metadata: Metadata | None = None


class ConversationUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/conversations/{id}``."""

    metadata: Metadata


class ItemsCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/conversations/{id}/items``."""

    items: Annotated[list[Any], msgspec.Meta(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


async def _body_or_empty(request: web.Request) -> dict[str, Any]:
    """The JSON body; an empty body counts as ``{}`` (``conversations.create()``)."""
    raw = await body_bytes(request)
    return decode_json(raw) if raw.strip() else {}


async def _write(
    request: web.Request, conversation_id: str | None = None
) -> tuple[State, Principal, metering.Meter]:
    """The start of a write: metered first (a refusal is recorded too), then authenticated;
    a write to a conversation the account does not have is its 404 here, before it can count
    against a rate limit (chat and responses load a conversation before admission too)."""
    meter = metering.start(request, LIMITED)
    meter.conversation_id = conversation_id
    state, principal = await authenticate(request)
    meter.identify(principal)
    if conversation_id is not None:
        await sessions_store(state).get_conversation(principal.account_id, conversation_id)
    return state, principal, meter


async def create_conversation(request: web.Request) -> web.Response:
    state, principal, meter = await _write(request)
    req = validate(await _body_or_empty(request), ConversationCreate)
    items = normalize_items(req.items or [], "items")
    headers = await admit_request(state, principal, LIMITED, meter)
    meter.conversation_id = new_id("conv")
    conversation, _ = await sessions_store(state).create_conversation(
        principal.account_id, meter.conversation_id, metadata=req.metadata, items=items
    )
    return json_response(conversation.to_openai(), headers=headers)


async def get_conversation(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    conversation = await sessions_store(state).get_conversation(
        principal.account_id, request.match_info["conversation_id"]
    )
    return json_response(conversation.to_openai())


async def update_conversation(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    state, principal, meter = await _write(request, conversation_id)
    req = validate(await read_body(request), ConversationUpdate)
    headers = await admit_request(state, principal, LIMITED, meter)
    conversation = await sessions_store(state).update_conversation(
        principal.account_id, conversation_id, req.metadata
    )
    return json_response(conversation.to_openai(), headers=headers)


async def delete_conversation(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    conversation_id = request.match_info["conversation_id"]
    await sessions_store(state).delete_conversation(principal.account_id, conversation_id)
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    after, limit, order = page_params(request)
    page = await sessions_store(state).list_items(
        principal.account_id,
        request.match_info["conversation_id"],
        after=after,
        limit=limit,
        order=order,
    )
    return json_response(list_page(page))


async def add_items(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    state, principal, meter = await _write(request, conversation_id)
    req = validate(await read_body(request), ItemsCreate)
    items = normalize_items(req.items, "items")
    headers = await admit_request(state, principal, LIMITED, meter)
    added = await sessions_store(state).add_items(principal.account_id, conversation_id, items)
    data = [item.to_openai() for item in added]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
            "has_more": False,
        },
        headers=headers,
    )


async def get_item(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    item = await sessions_store(state).get_item(
        principal.account_id, request.match_info["conversation_id"], request.match_info["item_id"]
    )
    return json_response(item.to_openai())


async def delete_item(request: web.Request) -> web.Response:
    state, principal = await authenticate(request)
    conversation = await sessions_store(state).delete_item(
        principal.account_id, request.match_info["conversation_id"], request.match_info["item_id"]
    )
    return json_response(conversation.to_openai())


# -- retention -----------------------------------------------------------------------------


async def prune_once(store: SessionStore, retention_days: int) -> None:
    """One retention pass; logs what it removed, never raises."""
    if retention_days <= 0:
        return
    try:
        pruned = await store.prune(int(time.time()) - retention_days * 86400)
    except Exception:
        log.warning("session retention: pruning failed", exc_info=True)
        return
    if pruned.conversations or pruned.responses:
        log.info(
            "session retention: removed %d conversations, %d responses, %d items",
            pruned.conversations,
            pruned.responses,
            pruned.items,
        )


async def _retention(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    policy_from_settings(state.settings)  # an unknown context_trim policy stops the start
    days = int(state.settings.session_retention_days)
    store = sessions_store(state)

    async def loop() -> None:
        while True:
            await prune_once(store, days)
            await asyncio.sleep(RETENTION_INTERVAL)

    task = asyncio.create_task(loop(), name="session-retention") if days > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def setup(app: web.Application) -> None:
    """Register the ``/v1/conversations`` routes and the retention task."""
    app.cleanup_ctx.append(_retention)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}", get_conversation)
    app.router.add_post("/v1/conversations/{conversation_id}", update_conversation)
    app.router.add_delete("/v1/conversations/{conversation_id}", delete_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}/items", list_items)
    app.router.add_post("/v1/conversations/{conversation_id}/items", add_items)
    app.router.add_get("/v1/conversations/{conversation_id}/items/{item_id}", get_item)
    app.router.add_delete("/v1/conversations/{conversation_id}/items/{item_id}", delete_item)
