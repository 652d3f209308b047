"""Overview, usage (charts, period picker, CSV), plan and limits, and the playground."""

from __future__ import annotations

from typing import cast

from aiohttp import web

from chatgate.dashboard import services, usage_view
from chatgate.dashboard.auth import User, api_base_url, with_session
from chatgate.dashboard.render import PREFIX, page, page_response, state

PRESETS = (
    (
        "support",
        "Support bot",
        "You are a friendly customer-support agent for an online shop. Answer briefly and "
        "politely, ask for an order number when you need one, and never invent policies: when "
        "unsure, offer to hand the conversation to a human.",
    ),
    (
        "chatbot",
        "Chatbot",
        "You are a helpful, upbeat conversational partner. Keep answers short and natural, and "
        "ask a follow-up question when it helps the conversation.",
    ),
    (
        "writer",
        "Content writing",
        "You are a skilled content writer. Write clear, engaging, well-structured text with a "
        "headline and short paragraphs. Match the tone the user asks for.",
    ),
    (
        "assistant",
        "Assistant",
        "You are a precise personal assistant. Follow instructions exactly, think step by step "
        "for tasks with several parts, and say so when you do not know something.",
    ),
)


@page()
async def overview(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/: the account at a glance and how to call the API."""
    st = state(request)
    keys = await st.keys.list(user.account.id)
    plan = await st.plans.get(user.account.plan)
    use = await usage_view.plan_use(st.engine, user.account.id)
    return await page_response(
        request,
        user,
        "overview.html",
        {
            "title": "Overview",
            "active_keys": sum(1 for k in keys if k.status == "active"),
            "plan": plan,
            "use": use,
            "base_url": api_base_url(request),
            "model": (services.model_names(st) or ["gpt-4o-mini"])[0],
        },
    )


def _by(request: web.Request, allowed: tuple[str, ...]) -> usage_view.By:
    by = request.query.get("by", allowed[0])
    return cast(usage_view.By, by if by in allowed else allowed[0])


@page()
async def usage_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/usage?period=30d&by=key."""
    st = state(request)
    period = usage_view.period_from(dict(request.query))
    view = await usage_view.build(
        st.engine, period, account_id=user.account.id, by=_by(request, ("key", "model"))
    )
    plan = await st.plans.get(user.account.plan)
    use = await usage_view.plan_use(st.engine, user.account.id)
    return await page_response(
        request,
        user,
        "usage.html",
        {
            "title": "Usage",
            "view": view,
            "plan": plan,
            "use": use,
            "periods": usage_view.PERIODS,
            "groupings": (("key", "By key"), ("model", "By model")),
            "action": PREFIX + "/usage",
            "csv_url": PREFIX + "/usage.csv",
        },
    )


@page()
async def usage_csv(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/usage.csv?period=30d: one row per day, key and model."""
    period = usage_view.period_from(dict(request.query))
    text = await usage_view.csv_text(state(request).engine, period, account_id=user.account.id)
    filename = f"chatgate-usage-{period.first}-{period.last}.csv"
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@page()
async def plan_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/plan: the plan's limits, what is used, the other plans."""
    st = state(request)
    plans = await st.plans.list()
    current = next((p for p in plans if p.name == user.account.plan), None)
    use = await usage_view.plan_use(st.engine, user.account.id)
    return await page_response(
        request,
        user,
        "plan.html",
        {"title": "Plan and limits", "plan": current, "plans": plans, "use": use},
    )


@page()
async def playground(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/playground: streaming chat in the browser with one of your keys.

    The page's script calls ``/v1/chat/completions`` itself with a key the user pastes (or
    the one just created, handed over in the tab's ``sessionStorage``): the request takes the
    very path an application's would, with the key's model scopes, rate limits, quota and
    usage records, and the server never holds a key it could misuse.
    """
    st = state(request)
    keys = [k for k in await st.keys.list(user.account.id) if k.status == "active"]
    return await page_response(
        request,
        user,
        "playground.html",
        {
            "title": "Playground",
            "models": services.model_names(st),
            "presets": PRESETS,
            "keys": keys,
            "base_url": api_base_url(request),
        },
    )


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/", with_session(overview))
    app.router.add_get(PREFIX + "/usage", with_session(usage_page))
    app.router.add_get(PREFIX + "/usage.csv", with_session(usage_csv))
    app.router.add_get(PREFIX + "/plan", with_session(plan_page))
    app.router.add_get(PREFIX + "/playground", with_session(playground))
