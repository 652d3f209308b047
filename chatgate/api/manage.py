"""The JSON management API under ``/api/*``: the dashboard's actions for programs.

Who is calling: an ``Authorization: Bearer`` key (its account; a key of an admin account for
``/api/admin/*``), or else the dashboard's session cookie. With the cookie, every request that
changes something must echo the session's CSRF token in ``X-CSRF-Token`` (``GET /api/me``
returns it), so another site cannot drive the API through a logged-in browser.

A key limited to some models, one that expires, or one with limits of its own (``rpm``,
``monthly_budget_cents``...) may list and revoke keys but not create or rotate them:
otherwise a narrow key could mint (or take over) a broader, longer-lived one. For its limits
"no looser than the caller's" is not enough: a key of 1 cent a month making keys of 1 cent
each spends what it likes.
The secret a rotation replaced, still accepted in its grace period, calls the API (``/v1``)
but none of these routes (403 ``current_key_required``): whoever holds a leaked old secret must
not rotate the key away from its owner, mint keys or revoke them.
Keys of other accounts answer 404 like keys that do not exist; ``/api/admin/*`` answers a
non-admin with the same 404 as an unknown URL. Errors are OpenAI-shaped (the API middleware).
The handlers call the same services as the pages (:mod:`chatgate.dashboard.services`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS, Account
from chatgate.api.openai import json_response, read_body
from chatgate.api.schemas import unknown_parameter
from chatgate.dashboard import auth as dashboard_auth
from chatgate.dashboard import services
from chatgate.dashboard.auth import with_session
from chatgate.dashboard.passwords import LISTED
from chatgate.state import STATE, State

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_NEEDED = (
    "You need to be logged in to the dashboard, or to provide an API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
CURRENT_KEY_NEEDED = (
    "This API key has been rotated: its previous secret works for API calls until its grace "
    "period ends, but managing keys and the account needs the key's current secret (or the "
    "dashboard)."
)


@dataclass(frozen=True, slots=True)
class Caller:
    """The account behind a management request, and how it proved it."""

    account: Account
    via: Literal["key", "session"]
    key_id: str | None = None
    csrf: str | None = None


async def caller(request: web.Request, *, admin: bool = False) -> tuple[State, Caller]:
    """Authenticate by bearer key, else by session cookie (+ CSRF header on changes)."""
    state = request.app[STATE]
    header = request.headers.get("Authorization")
    if header:
        principal = await state.auth.authenticate(header)
        if principal.previous_secret:
            raise errors.PermissionDenied(CURRENT_KEY_NEEDED, code="current_key_required")
        who = Caller(await state.accounts.get(principal.account_id), "key", principal.key_id)
    else:
        user = await dashboard_auth.current_user(request)
        if user is None:
            raise errors.AuthenticationError(LOGIN_NEEDED)
        if admin and not user.account.is_admin:  # before the CSRF check: its 403 says "exists"
            raise errors.unknown_url()
        if request.method not in SAFE_METHODS and not await dashboard_auth.csrf_ok(
            request, request.headers.get(dashboard_auth.CSRF_HEADER)
        ):
            raise errors.PermissionDenied(
                "Missing or wrong X-CSRF-Token header (GET /api/me returns the token).",
                code="csrf_failed",
            )
        who = Caller(user.account, "session", csrf=user.csrf)
    if admin and not who.account.is_admin:
        raise errors.unknown_url()
    return state, who


NARROW_KEY = (
    "This API key is limited (to some models, by an expiry, or by limits of its own such as "
    "rpm or a monthly budget), so it cannot create or rotate keys: a key it made would not be "
    "held by its limits. Use an unrestricted key or the dashboard."
)


async def _may_issue(state: State, who: Caller) -> None:
    """403 when a key limited by models, expiry or limits of its own tries to create or rotate
    keys (each route that hands out a secret calls this first)."""
    if who.via != "key" or who.key_id is None:
        return
    record = await state.keys.get(who.key_id)
    own = any(getattr(record, f) is not None for f in LIMIT_FIELDS)
    if record.models or record.expires_at is not None or own:
        raise errors.PermissionDenied(NARROW_KEY)


async def _body(request: web.Request, known: Collection[str] = ()) -> dict[str, Any]:
    """The JSON object body, no other field than ``known`` (another is a misspelling: ``rmp``
    made a key without the limit it meant, ``{"disable": false}`` disabled an account); an
    empty body reads as ``{}``."""
    if not request.body_exists:
        return {}
    body = await read_body(request)
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise unknown_parameter(unknown[0])
    return body


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.InvalidRequest(f"`{name}` must be a string.", param=name)
    return value


def _names(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.InvalidRequest(f"`{name}` must be a list of strings.", param=name)
    return value


KEY_FIELDS = frozenset({"name", "expires_in", "models", *LIMIT_FIELDS})
"""What ``POST /api/keys`` takes: another field is a misspelling (``rmp``), which made a key
without the limit it meant."""


def _limits(body: dict[str, Any]) -> dict[str, object]:
    """The limits in a JSON body, as JSON types them: a whole number or ``null``. (The form
    parser read ``"10"`` as 10 and ``""`` or ``"unlimited"`` as no limit.)"""
    limits = {f: body[f] for f in LIMIT_FIELDS if f in body}
    for field, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise errors.InvalidRequest(
                f"The limit `{field}` must be a whole number or null (no limit).", param=field
            )
    return limits  # their ranges: the stores' check


def _list(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data}


# -- the caller's own account -------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    """GET /api/me: the account, its plan, and (with a session) the CSRF token."""
    state, who = await caller(request)
    plan = await state.plans.get(who.account.plan)
    out: dict[str, Any] = {
        "object": "account",
        **who.account.to_dict(),
        "plan_limits": plan.to_dict(),
        "auth": who.via,
    }
    if who.csrf is not None:
        out["csrf_token"] = who.csrf
    return json_response(out)


async def list_keys(request: web.Request) -> web.Response:
    """GET /api/keys: the caller's keys (hints only)."""
    state, who = await caller(request)
    keys = await state.keys.list(who.account.id)
    return json_response(_list([state.auth.seen(k).to_dict() for k in keys]))


async def create_key(request: web.Request) -> web.Response:
    """POST /api/keys ``{"name", "expires_in": "30d", "models": [...], "rpm": 10, ...}``: the
    key, once; ``rpm``, ``tpm``, ``rpd``, ``concurrency``, ``monthly_tokens``: its own limits."""
    state, who = await caller(request)
    await _may_issue(state, who)
    body = await _body(request, KEY_FIELDS)
    wanted = services.key_request(
        state,
        name=_text(body, "name") or "",
        expires_in=_text(body, "expires_in"),
        models=_names(body, "models"),
        limits=_limits(body),
    )
    issued = await services.create_key(state, who.account, wanted)
    return json_response(issued.to_dict(), status=201, headers={"Cache-Control": "no-store"})


async def get_key(request: web.Request) -> web.Response:
    """GET /api/keys/{id}."""
    state, who = await caller(request)
    record = await state.keys.get(request.match_info["id"], account_id=who.account.id)
    return json_response(state.auth.seen(record).to_dict())


async def rotate_key(request: web.Request) -> web.Response:
    """POST /api/keys/{id}/rotate ``{"grace": "24h"}``: the new secret, once."""
    state, who = await caller(request)
    await _may_issue(state, who)
    body = await _body(request, ("grace", "grace_seconds"))
    raw = body.get("grace", body.get("grace_seconds"))
    if raw is not None and not isinstance(raw, str | int):
        raise errors.InvalidRequest("`grace` must be a duration such as 24h, or 0.", param="grace")
    grace = services.parse_grace(raw, state.settings.rotation_grace)
    issued = await services.rotate_key(state, who.account, request.match_info["id"], grace)
    return json_response(issued.to_dict(), headers={"Cache-Control": "no-store"})


async def revoke_key(request: web.Request) -> web.Response:
    """POST /api/keys/{id}/revoke."""
    state, who = await caller(request)
    record = await services.revoke_key(state, who.account, request.match_info["id"])
    return json_response(record.to_dict())


async def list_plans(request: web.Request) -> web.Response:
    """GET /api/plans: every plan's limits (``null`` = unlimited)."""
    state, _ = await caller(request)
    return json_response(_list([p.to_dict() for p in await state.plans.list()]))


# -- admin ------------------------------------------------------------------------------


async def admin_accounts(request: web.Request) -> web.Response:
    """GET /api/admin/accounts?q=text: the newest 100 accounts whose email contains ``q``
    (``has_more`` when more do)."""
    await caller(request, admin=True)
    query = request.query.get("q", "")[:200]
    found = await dashboard_auth.passwords(request).search(query, limit=LISTED + 1)
    return json_response(
        {**_list([a.to_dict() for a in found[:LISTED]]), "has_more": len(found) > LISTED}
    )


async def admin_set_plan(request: web.Request) -> web.Response:
    """POST /api/admin/accounts/{id}/plan ``{"plan": "pro"}``."""
    state, _ = await caller(request, admin=True)
    plan = _text(await _body(request, ("plan",)), "plan")
    if not plan:
        raise errors.InvalidRequest("`plan` is required.", param="plan")
    account = await state.accounts.set_plan(request.match_info["id"], plan)
    return json_response(account.to_dict())


async def admin_disable(request: web.Request) -> web.Response:
    """POST /api/admin/accounts/{id}/disable ``{"disabled": true}`` (false re-enables)."""
    state, who = await caller(request, admin=True)
    disabled = (await _body(request, ("disabled",))).get("disabled", True)
    if not isinstance(disabled, bool):
        raise errors.InvalidRequest("`disabled` must be true or false.", param="disabled")
    account_id = request.match_info["id"]
    if disabled and account_id == who.account.id:
        raise errors.InvalidRequest("You cannot disable your own account.", param="id")
    account = await state.accounts.set_disabled(account_id, disabled)
    return json_response(account.to_dict())


async def admin_update_plan(request: web.Request) -> web.Response:
    """PATCH /api/admin/plans/{name} ``{"rpm": 60, "monthly_tokens": null}``."""
    state, _ = await caller(request, admin=True)
    limits = services.parse_limits(_limits(await _body(request, LIMIT_FIELDS)))
    plan = await services.set_plan_limits(state, request.match_info["name"], limits)
    return json_response(plan.to_dict())


def setup(app: web.Application) -> None:
    """Add the ``/api/*`` routes, each in the dashboard's session (:func:`with_session`)."""
    app.router.add_get("/api/me", with_session(me))
    app.router.add_get("/api/keys", with_session(list_keys))
    app.router.add_post("/api/keys", with_session(create_key))
    app.router.add_get("/api/keys/{id}", with_session(get_key))
    app.router.add_post("/api/keys/{id}/rotate", with_session(rotate_key))
    app.router.add_post("/api/keys/{id}/revoke", with_session(revoke_key))
    app.router.add_get("/api/plans", with_session(list_plans))
    app.router.add_get("/api/admin/accounts", with_session(admin_accounts))
    app.router.add_post("/api/admin/accounts/{id}/plan", with_session(admin_set_plan))
    app.router.add_post("/api/admin/accounts/{id}/disable", with_session(admin_disable))
    app.router.add_patch("/api/admin/plans/{name}", with_session(admin_update_plan))
    for path in (
        "/api/admin/accounts",
        "/api/admin/accounts/{id}/plan",
        "/api/admin/accounts/{id}/disable",
        "/api/admin/plans/{name}",
    ):
        app.router.add_route("*", path, with_session(admin_wrong_method))


async def admin_wrong_method(request: web.Request) -> web.Response:
    """Another method on an admin URL: the caller first (401 without credentials, the unknown
    URL's 404 for anyone but an admin, as for the right method), so that only an admin learns
    from a 405 that the route exists."""
    await caller(request, admin=True)
    here = request.match_info.route.resource
    path = here.canonical if here is not None else ""
    raise errors.method_not_allowed(  # the methods of the other routes of this URL
        route.method
        for resource in request.app.router.resources()
        if resource.canonical == path
        for route in resource
    )


# -- /openapi.json ----------------------------------------------------------------------

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_ANY = {"type": "object", "additionalProperties": True}
_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"sessionCookie": []}]
_LIMIT = {"type": ["integer", "null"], "minimum": 0, "description": "null = unlimited"}
_KEY_RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "account_id": {"type": "string"},
        "name": {"type": "string"},
        "hint": {"type": "string", "examples": ["sk-cg-Ab3d…9xYz"]},
        "models": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "created_at": {"type": "integer"},
        "rotated_at": {"type": ["integer", "null"]},
        "last_used_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
        "revoked_at": {"type": ["integer", "null"]},
        "prev_valid_until": {"type": ["integer", "null"]},
        "status": {"enum": ["active", "expired", "revoked"]},
        "rotation_period": {
            "type": ["integer", "null"],
            "description": "Seconds between scheduled rotations; null: none.",
        },
        "rotation_due_at": {"type": ["integer", "null"]},
        "rotation_due": {"type": "boolean"},
        **{f: _LIMIT for f in LIMIT_FIELDS},
    },
}
_ISSUED = {
    "allOf": [
        _KEY_RECORD,
        {
            "type": "object",
            "properties": {
                "key": {"type": "string", "description": "Shown once."},
                "grace_cut_short": {
                    "type": ["integer", "null"],
                    "description": "A rotation made while an earlier one's grace was running "
                    "stops the secret that one replaced (one previous secret is kept): when its "
                    "grace was to end. null: no grace was running (and on creation).",
                },
            },
        },
    ]
}
_ACCOUNT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "email": {"type": "string"},
        "plan": {"type": "string"},
        "is_admin": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "created_at": {"type": "integer"},
    },
}
_PLAN = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        **{f: _LIMIT for f in LIMIT_FIELDS},
    },
}


def _list_of(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": schema}},
    }


def _op(
    operation_id: str,
    summary: str,
    schema: dict[str, Any],
    *,
    status: int = 200,
    errors_: tuple[int, ...] = (401, 403),
    body: dict[str, Any] | None = None,
    params: tuple[str, ...] = (),
    query: tuple[str, ...] = (),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["management"],
        "security": _SECURITY,
        "responses": {
            str(status): {"description": "OK", "content": {"application/json": {"schema": schema}}},
            **{
                str(s): {
                    "description": "Error",
                    "content": {"application/json": {"schema": _ERROR}},
                }
                for s in errors_
            },
        },
    }
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ] + [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": body}},
        }
    return op


def _accounts_page() -> dict[str, Any]:
    schema = _list_of(_ACCOUNT)
    schema["properties"]["has_more"] = {
        "type": "boolean",
        "description": "More accounts match than the 100 listed: narrow the search.",
    }
    return schema


def openapi_paths() -> dict[str, Any]:
    """The ``/api/*`` part of ``/openapi.json`` (paths; security schemes in
    :func:`openapi_security_schemes`)."""
    key_body = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 200},
            "expires_in": {"type": ["string", "null"], "examples": ["30d", "12h"]},
            "models": {"type": ["array", "null"], "items": {"type": "string"}},
            **{f: _LIMIT for f in LIMIT_FIELDS},
        },
    }
    grace_body = {
        "type": "object",
        "properties": {
            "grace": {
                "type": ["string", "integer"],
                "description": "How long the old secret keeps working: 0, 1h, 24h (default)",
            }
        },
    }
    me_schema = {
        "allOf": [
            _ACCOUNT,
            {
                "type": "object",
                "properties": {
                    "plan_limits": _PLAN,
                    "auth": {"enum": ["key", "session"]},
                    "csrf_token": {"type": "string", "description": "With a session only."},
                },
            },
        ]
    }
    limits_body = {"type": "object", "properties": {f: _LIMIT for f in LIMIT_FIELDS}}
    return {
        "/api/me": {"get": _op("getMe", "The calling account", me_schema)},
        "/api/keys": {
            "get": _op("listKeys", "Your API keys", _list_of(_KEY_RECORD)),
            "post": _op(
                "createKey",
                "Create a key (the full key is in this answer only)",
                _ISSUED,
                status=201,
                errors_=(400, 401, 403),
                body=key_body,
            ),
        },
        "/api/keys/{id}": {
            "get": _op(
                "getKey", "One of your keys", _KEY_RECORD, errors_=(401, 403, 404), params=("id",)
            )
        },
        "/api/keys/{id}/rotate": {
            "post": _op(
                "rotateKey",
                "New secret for a key (shown once); the old one works for the grace period",
                _ISSUED,
                errors_=(400, 401, 403, 404),
                body=grace_body,
                params=("id",),
            )
        },
        "/api/keys/{id}/revoke": {
            "post": _op(
                "revokeKey", "Revoke a key", _KEY_RECORD, errors_=(401, 403, 404), params=("id",)
            )
        },
        "/api/plans": {"get": _op("listPlans", "Every plan's limits", _list_of(_PLAN))},
        "/api/admin/accounts": {
            "get": _op(
                "adminListAccounts",
                "Search accounts by email, the newest 100 (admin)",
                _accounts_page(),
                errors_=(401, 403, 404),
                query=("q",),
            )
        },
        "/api/admin/accounts/{id}/plan": {
            "post": _op(
                "adminSetPlan",
                "Move an account to a plan (admin)",
                _ACCOUNT,
                errors_=(400, 401, 403, 404),
                body={
                    "type": "object",
                    "required": ["plan"],
                    "properties": {"plan": {"type": "string"}},
                },
                params=("id",),
            )
        },
        "/api/admin/accounts/{id}/disable": {
            "post": _op(
                "adminDisableAccount",
                "Disable (or with false, enable) an account (admin)",
                _ACCOUNT,
                errors_=(400, 401, 403, 404),
                body={"type": "object", "properties": {"disabled": {"type": "boolean"}}},
                params=("id",),
            )
        },
        "/api/admin/plans/{name}": {
            "patch": _op(
                "adminUpdatePlan",
                "Change a plan's limits (admin)",
                _PLAN,
                errors_=(400, 401, 403, 404),
                body=limits_body,
                params=("name",),
            )
        },
    }


def openapi_security_schemes() -> dict[str, Any]:
    """The session cookie scheme the ``/api/*`` operations accept besides ``bearerAuth``."""
    return {
        "sessionCookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": dashboard_auth.COOKIE_NAME,
            "description": "The dashboard's session; changes also need the X-CSRF-Token header.",
        }
    }


__all__ = ["caller", "openapi_paths", "openapi_security_schemes", "setup"]
