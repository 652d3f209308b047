"""The API keys pages: list, create (shown once), rotate (shown once), revoke.

A new or rotated key is rendered in the answer to the POST that made it, never put in the
session or a redirect, so it exists in exactly one HTTP response (``Cache-Control: no-store``).
Another account's key id answers 404, like an id that does not exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from chatgate import errors
from chatgate.dashboard import services
from chatgate.dashboard.auth import User, api_base_url, with_session
from chatgate.dashboard.render import (
    ONCE_FIELD,
    PREFIX,
    field,
    flash,
    once_token,
    page,
    page_response,
    read_form,
    redirect,
    state,
    take_once,
)
from chatgate.keys.store import IssuedKey, Once, OnceTaken
from chatgate.timefmt import now


async def _list_context(request: web.Request, user: User) -> dict[str, object]:
    st = state(request)
    keys = [st.auth.seen(k) for k in await st.keys.list(user.account.id)]
    keys.sort(key=lambda k: (k.status != "active", -k.created_at))
    return {
        "title": "API keys",
        "keys": keys,
        "models": services.model_names(st),
        "expiry_choices": services.EXPIRY_CHOICES,
        "form": {"name": "", "expires_in": "", "models": []},
        "once": await once_token(request),
    }


@page()
async def keys_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/keys."""
    return await page_response(request, user, "keys.html", await _list_context(request, user))


def _issued(request: web.Request, user: User, issued: IssuedKey, action: str) -> dict[str, object]:
    base = api_base_url(request)
    return {"title": "Your new API key", "issued": issued, "action": action, "base_url": base}


@page()
async def create_key(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/keys: the full key is shown on this page only."""
    form = await read_form(request)
    models = [m for m in form.getall("models", []) if isinstance(m, str)]
    st = state(request)
    # Whole (a 400 page beyond these), so the checks below judge what was typed.
    name, expires_in = field(form, "name", 1000), field(form, "expires_in", 100)
    try:
        wanted = services.key_request(st, name=name, expires_in=expires_in, models=models)
    except errors.InvalidRequest as exc:
        context = await _list_context(request, user)
        context["error"] = exc.message
        context["form"] = {"name": name, "expires_in": expires_in, "models": models}
        return await page_response(request, user, "keys.html", context, status=400)
    issued = await _issue_once(
        request,
        user,
        form,
        "created",
        lambda once: services.create_key(st, user.account, wanted, once=once),
    )
    if not isinstance(issued, IssuedKey):
        return issued
    return await page_response(
        request, user, "key_issued.html", _issued(request, user, issued, "created"), status=201
    )


SENT_BEFORE = {
    "created": "This form was sent before: the key it made was shown once, in the answer to "
    "that first send, and is not made or shown again. If that answer did not reach you (a "
    "second click, a lost connection), the key is in the list by its name: rotate it for a "
    "secret you can see, or revoke it.",
    "rotated": "This form was sent before: the key was rotated then, and its new secret shown "
    "once, in the answer to that first send. If that answer did not reach you, rotate the "
    "key again.",
}
NOT_ISSUED = (
    "This form can no longer be sent: it was opened before your last login, or longer ago "
    "than a login lasts, or not on this site. Nothing was changed. Use the form on this page."
)


async def _issue_once(
    request: web.Request,
    user: User,
    form: MultiDictProxy[str | bytes | bytearray | FileField],
    action: str,
    issue: Callable[[Once], Awaitable[IssuedKey]],
) -> IssuedKey | web.StreamResponse:
    """``issue`` under the form's once token, or the keys page saying why nothing was
    issued: a form sent before (409), or one this session does not know (409)."""
    once = await take_once(request, form)
    if once is None:
        return await _not_issued(request, user, form.get(ONCE_FIELD), action)
    try:
        return await issue(once)
    except OnceTaken:
        return await _sent_before(request, user, action)


async def _sent_before(request: web.Request, user: User, action: str) -> web.StreamResponse:
    """The keys page for a form sent again (a reload of the page that showed a new key, a
    double submit, a replay): 409, nothing made."""
    context = await _list_context(request, user)
    context["notice"] = SENT_BEFORE[action]
    return await page_response(request, user, "keys.html", context, status=409)


async def _not_issued(
    request: web.Request, user: User, token: object, action: str
) -> web.StreamResponse:
    """The keys page for a form whose once token this session does not hold: sent before
    (taken from the session by the first send) when the database has it, else a form this
    session no longer knows, which made nothing."""
    if isinstance(token, str) and token and await state(request).keys.once_taken(token):
        return await _sent_before(request, user, action)
    context = await _list_context(request, user)
    context["notice"] = NOT_ISSUED
    return await page_response(request, user, "keys.html", context, status=409)


@page()
async def rotate_form(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/keys/{id}/rotate: choose the grace period."""
    key = await state(request).keys.get(request.match_info["id"], account_id=user.account.id)
    context = {"title": "Rotate key", "key": key, "grace_choices": services.GRACE_CHOICES}
    if key.status == "active":
        context["once"] = await once_token(request)
    running = key.prev_valid_until is not None and key.prev_valid_until > now()
    context["grace_running"] = key.prev_valid_until if running else None
    return await page_response(request, user, "key_rotate.html", context)


@page()
async def rotate(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/keys/{id}/rotate: the new secret is shown on this page only."""
    form = await read_form(request)
    st = state(request)
    grace = services.parse_grace(field(form, "grace", 100), st.settings.rotation_grace)
    await st.keys.get(request.match_info["id"], account_id=user.account.id)  # else 404
    key_id = request.match_info["id"]
    issued = await _issue_once(
        request,
        user,
        form,
        "rotated",
        lambda once: services.rotate_key(st, user.account, key_id, grace, once=once),
    )
    if not isinstance(issued, IssuedKey):
        return issued
    context = _issued(request, user, issued, "rotated")
    context["grace"] = grace
    return await page_response(request, user, "key_issued.html", context)


@page()
async def revoke_form(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/keys/{id}/revoke: confirm."""
    key = await state(request).keys.get(request.match_info["id"], account_id=user.account.id)
    return await page_response(
        request, user, "key_revoke.html", {"title": "Revoke key", "key": key}
    )


@page()
async def revoke(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/keys/{id}/revoke."""
    key = await services.revoke_key(state(request), user.account, request.match_info["id"])
    await flash(request, f"Key “{key.name or key.hint}” revoked. It stops working within a second.")
    raise redirect(PREFIX + "/keys")


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/keys", with_session(keys_page))
    app.router.add_post(PREFIX + "/keys", with_session(create_key))
    app.router.add_get(PREFIX + "/keys/{id}/rotate", with_session(rotate_form))
    app.router.add_post(PREFIX + "/keys/{id}/rotate", with_session(rotate))
    app.router.add_get(PREFIX + "/keys/{id}/revoke", with_session(revoke_form))
    app.router.add_post(PREFIX + "/keys/{id}/revoke", with_session(revoke))
