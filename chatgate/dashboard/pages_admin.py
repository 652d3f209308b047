"""Admin pages (admin accounts only; anyone else gets the 404 page): accounts, plans, models,
global usage."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, cast

from aiohttp import web

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS
from chatgate.dashboard import auth, services, usage_view
from chatgate.dashboard.auth import User, with_session
from chatgate.dashboard.passwords import LISTED
from chatgate.dashboard.render import (
    PREFIX,
    field,
    flash,
    page,
    page_response,
    read_form,
    redirect,
    state,
)
from chatgate.state import State

ADMIN = PREFIX + "/admin"
LIMIT_LABELS = {
    "rpm": "Requests / min",
    "tpm": "Tokens / min",
    "rpd": "Requests / day",
    "concurrency": "Concurrent",
    "monthly_tokens": "Tokens / month",
    "monthly_budget_cents": "Budget / month (¢)",
}


@page(admin=True)
async def accounts_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/admin/accounts?q=text."""
    query = request.query.get("q", "")[:200]
    found = await auth.passwords(request).search(query, limit=LISTED + 1)
    plans = await state(request).plans.list()
    return await page_response(
        request,
        user,
        "admin_accounts.html",
        {
            "title": "Accounts",
            "accounts": found[:LISTED],
            "more": len(found) > LISTED,
            "q": query,
            "plans": plans,
        },
    )


def _back(form: Mapping[str, object], default: str) -> str:
    """Where to go after an admin action: the form's ``back`` field, if it is an admin page."""
    target = field(form, "back", 2000, default="")
    return target if target.startswith(ADMIN + "/") else default


@page(admin=True)
async def set_plan(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/admin/accounts/{id}/plan."""
    form = await read_form(request)
    account = await state(request).accounts.set_plan(
        request.match_info["id"], field(form, "plan", 1000)
    )
    await flash(request, f"{account.email} is now on the {account.plan} plan.")
    raise redirect(_back(form, ADMIN + "/accounts"))


@page(admin=True)
async def set_disabled(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/admin/accounts/{id}/disable (``disabled=1`` or ``0``)."""
    form = await read_form(request)
    account_id = request.match_info["id"]
    disabled = field(form, "disabled", 5) == "1"
    if account_id == user.account.id and disabled:
        raise errors.InvalidRequest("You cannot disable your own account.")
    account = await state(request).accounts.set_disabled(account_id, disabled)
    verb = "disabled: its keys stop working within a second" if disabled else "enabled"
    await flash(request, f"{account.email} {verb}.")
    raise redirect(_back(form, ADMIN + "/accounts"))


@page(admin=True)
async def plans_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/admin/plans: every plan's limits, editable."""
    return await page_response(
        request,
        user,
        "admin_plans.html",
        {
            "title": "Plans",
            "plans": await state(request).plans.list(),
            "limit_fields": LIMIT_FIELDS,
            "limit_labels": LIMIT_LABELS,
        },
    )


def _limits_from(form: Mapping[str, object]) -> dict[str, int | None]:
    return services.parse_limits({f: field(form, f, 100) for f in LIMIT_FIELDS if f in form})


@page(admin=True)
async def update_plan(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/admin/plans/{name}: empty = unlimited."""
    form = await read_form(request)
    plan = await services.set_plan_limits(
        state(request), request.match_info["name"], _limits_from(form)
    )
    await flash(request, f"Plan {plan.name} saved.")
    raise redirect(ADMIN + "/plans")


@page(admin=True)
async def create_plan(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/admin/plans: a new plan."""
    form = await read_form(request)
    plan = await state(request).plans.create(
        field(form, "name", 1000).strip(), **_limits_from(form)
    )
    await flash(request, f"Plan {plan.name} created.")
    raise redirect(ADMIN + "/plans")


async def model_status(st: State) -> list[dict[str, Any]]:
    """Each model with its deployments' health (``Router.status()``, when the router has it)."""
    rows: dict[str, dict[str, Any]] = {}
    for m in st.router.models():
        rows[m.name] = {
            "name": m.name,
            "backend": m.backend,
            "upstream_model": m.upstream_model,
            "context_window": m.context_window,
            "deployments": [],
        }
    status = getattr(st.router, "status", None)
    if callable(status):
        found = status()
        if inspect.isawaitable(found):
            found = await found
        for item in _as_dicts(found):
            name = str(item.get("model") or item.get("name") or "")
            entry = rows.setdefault(name, {"name": name, "deployments": []})
            entry["deployments"].append(item)
    return list(rows.values())


def _as_dicts(found: object) -> list[dict[str, Any]]:
    """A status report as a list of dicts, whatever shape the router gives it."""
    if isinstance(found, Mapping):
        return [{"model": k, **_one(v)} for k, v in found.items()]
    if isinstance(found, list | tuple):
        return [_one(v) for v in found]
    return []


def _one(value: object) -> dict[str, Any]:
    if hasattr(value, "to_dict"):
        return cast(dict[str, Any], value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    return {"state": str(value)}


@page(admin=True)
async def models_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/admin/models: the router's models and their backends' health."""
    return await page_response(
        request,
        user,
        "admin_models.html",
        {"title": "Models", "models": await model_status(state(request))},
    )


@page(admin=True)
async def usage_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/admin/usage: every account's usage, by account, model or key."""
    st = state(request)
    period = usage_view.period_from(dict(request.query))
    by = request.query.get("by", "account")
    chosen = cast(usage_view.By, by if by in ("account", "model", "key") else "account")
    emails = {a.id: a.email for a in await st.accounts.list()} if chosen == "account" else {}
    view = await usage_view.build(st.engine, period, account_id=None, by=chosen, emails=emails)
    return await page_response(
        request,
        user,
        "admin_usage.html",
        {
            "title": "Global usage",
            "view": view,
            "periods": usage_view.PERIODS,
            "groupings": (("account", "By account"), ("model", "By model"), ("key", "By key")),
            "action": ADMIN + "/usage",
        },
    )


def setup(app: web.Application) -> None:
    app.router.add_get(ADMIN + "/accounts", with_session(accounts_page))
    app.router.add_post(ADMIN + "/accounts/{id}/plan", with_session(set_plan))
    app.router.add_post(ADMIN + "/accounts/{id}/disable", with_session(set_disabled))
    app.router.add_get(ADMIN + "/plans", with_session(plans_page))
    app.router.add_post(ADMIN + "/plans", with_session(create_plan))
    app.router.add_post(ADMIN + "/plans/{name}", with_session(update_plan))
    app.router.add_get(ADMIN + "/models", with_session(models_page))
    app.router.add_get(ADMIN + "/usage", with_session(usage_page))
