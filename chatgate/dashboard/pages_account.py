"""Sign up, log in, log out, change password.

Messages are generic: a wrong password, an unknown email and a disabled account all read
"Incorrect email or password.", and every failure counts against both the email and the
address, so neither the answer nor the throttle tells whether an account exists.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from aiohttp import web

from chatgate import errors
from chatgate.dashboard import auth
from chatgate.dashboard.auth import User, with_session
from chatgate.dashboard.passwords import (
    HASHER,
    MIN_PASSWORD,
    hash_password,
    password_problem,
    verify_password,
)
from chatgate.dashboard.render import (
    PREFIX,
    field,
    flash,
    form_problem,
    page,
    page_response,
    read_form,
    redirect,
    safe_next,
    signup_open,
    state,
)

BAD_LOGIN = "Incorrect email or password."

log = logging.getLogger(__name__)


def _minutes(seconds: float) -> str:
    minutes = max(math.ceil(seconds / 60), 1)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


async def login_form(request: web.Request) -> web.StreamResponse:
    """GET /dashboard/login."""
    if await auth.current_user(request) is not None:
        raise redirect(safe_next(request.query.get("next")))
    return await page_response(
        request,
        None,
        "login.html",
        {"title": "Log in", "email": "", "next": safe_next(request.query.get("next"))},
    )


async def _throttled(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    said: str,
    wait: float,
    user: User | None = None,
) -> web.StreamResponse:
    """A throttled form's page: 429, ``said`` and the wait in words, and ``Retry-After``."""
    context["error"] = f"{said} Try again in {_minutes(wait)}."
    response = await page_response(request, user, template, context, status=429)
    response.headers["Retry-After"] = str(math.ceil(wait))
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/login: throttled, constant-time for unknown emails, generic answers."""
    refused = await form_problem(request, None)
    if refused is not None:
        return refused
    form = await read_form(request)
    target = safe_next(field(form, "next", 2000, default=""))
    try:
        email = field(form, "email", 1024).strip().lower()
        password = field(form, "password", 1024)
    except errors.InvalidRequest:  # longer than any account's: no such login
        context = {"title": "Log in", "email": "", "next": target, "error": BAD_LOGIN}
        return await page_response(request, None, "login.html", context, status=401)
    context = {"title": "Log in", "email": email, "next": target}
    throttle = auth.throttle(request)
    address = auth.client_address(request)
    wait = await throttle.login_wait(email, address)
    if wait > 0:
        return await _throttled(request, "login.html", context, "Too many attempts.", wait)
    creds = await auth.passwords(request).credentials(email)
    ok = await verify_password(creds.password_hash if creds else None, password)
    if creds is None or not ok or creds.disabled:
        await throttle.login_failed(email, address)
        context["error"] = BAD_LOGIN
        return await page_response(request, None, "login.html", context, status=401)
    await throttle.login_succeeded(email)
    stored = creds.password_hash
    if stored is not None and HASHER.check_needs_rehash(stored):
        stored = await hash_password(password)
        await auth.passwords(request).set_password_hash(creds.account_id, stored)
    await auth.log_in(request, creds.account_id, stored, creds.session_epoch)
    raise redirect(target)


async def signup_form(request: web.Request) -> web.StreamResponse:
    """GET /dashboard/signup."""
    if await auth.current_user(request) is not None:
        raise redirect(PREFIX + "/")
    status = 200 if signup_open(request) else 403
    return await page_response(
        request,
        None,
        "signup.html",
        {"title": "Sign up", "email": "", "min_password": MIN_PASSWORD},
        status=status,
    )


async def signup(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/signup: a new account on the default plan, logged in at once."""
    context: dict[str, object] = {"title": "Sign up", "min_password": MIN_PASSWORD}
    if not signup_open(request):
        context["email"] = ""
        return await page_response(request, None, "signup.html", context, status=403)
    refused = await form_problem(request, None)
    if refused is not None:
        return refused
    form = await read_form(request)
    try:
        # Read whole: the email's check takes at most 320 characters, and a clipped one was
        # another address.
        email = field(form, "email", 1024).strip().lower()
        password = field(form, "password", 1024)
        context["email"] = email
        problem = password_problem(password, email)
        if problem is None and password != field(form, "password2", 1024):
            problem = "The two passwords differ."
    except errors.InvalidRequest as exc:
        context.setdefault("email", "")
        problem = exc.message
    address = auth.client_address(request)
    signups = auth.throttle(request).signups
    wait = await signups.retry_after(address)
    if wait > 0:  # as the login's throttle: a 429 with the wait, whatever else is wrong
        said = "Too many sign-ups from your network."
        return await _throttled(request, "signup.html", context, said, wait)
    if problem is not None:
        context["error"] = problem
        return await page_response(request, None, "signup.html", context, status=400)
    st = state(request)
    plan = st.settings.default_plan
    password_hash = await hash_password(password)
    try:
        account = await st.accounts.create(email, plan=plan, password_hash=password_hash)
    except errors.NotFound as exc:
        if exc.param != "plan":
            raise
        # Not the user's details: the default plan, there at the start (serve checks it), is
        # gone since. Said as the server's fault, and logged for the operator.
        log.error("sign-up failed: the default plan %r (CHATGATE_DEFAULT_PLAN) is gone", plan)
        context["error"] = (
            "We could not create your account because of a problem on our side, not with "
            "your details. Please try again later."
        )
        return await page_response(request, None, "signup.html", context, status=500)
    except errors.InvalidRequest as exc:
        await signups.hit(address)
        context["error"] = (
            exc.message
            if exc.param == "email" and exc.code != "account_exists"
            else "We could not create an account with these details. "
            "If you already have an account, log in instead."
        )
        return await page_response(request, None, "signup.html", context, status=400)
    await signups.hit(address)
    await auth.log_in(request, account.id, password_hash, 0)  # a new account's first epoch
    await flash(request, "Welcome to chatgate. Create your first API key to get started.")
    raise redirect(PREFIX + "/")


@page()
async def logout(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/logout."""
    await auth.log_out(request, user)
    raise redirect(PREFIX + "/login")


@page()
async def account_page(request: web.Request, user: User) -> web.StreamResponse:
    """GET /dashboard/account: the account and the change-password form."""
    return await page_response(
        request, user, "account.html", {"title": "Account", "min_password": MIN_PASSWORD}
    )


@page()
async def change_password(request: web.Request, user: User) -> web.StreamResponse:
    """POST /dashboard/account/password: ends every other session of the account."""
    form = await read_form(request)
    current = field(form, "current", 1024)
    new = field(form, "password", 1024)
    context: dict[str, Any] = {"title": "Account", "min_password": MIN_PASSWORD}
    throttle = auth.throttle(request)
    address = auth.client_address(request)
    store = auth.passwords(request)
    wait = await throttle.login_wait(user.account.email, address)
    if wait > 0:
        return await _throttled(request, "account.html", context, "Too many attempts.", wait, user)
    if not await verify_password(await store.password_hash(user.account.id), current):
        await throttle.login_failed(user.account.email, address)
        context["error"] = "The current password is not correct."
        return await page_response(request, user, "account.html", context, status=400)
    problem = password_problem(new, user.account.email)
    if problem is None and new != field(form, "password2", 1024):
        problem = "The two new passwords differ."
    if problem is not None:
        context["error"] = problem
        return await page_response(request, user, "account.html", context, status=400)
    password_hash = await hash_password(new)
    await store.set_password_hash(user.account.id, password_hash)
    await auth.log_in(request, user.account.id, password_hash, user.epoch)
    await flash(request, "Password changed. Your other sessions were logged out.")
    raise redirect(PREFIX + "/account")


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/login", with_session(login_form))
    app.router.add_post(PREFIX + "/login", with_session(login))
    app.router.add_get(PREFIX + "/signup", with_session(signup_form))
    app.router.add_post(PREFIX + "/signup", with_session(signup))
    app.router.add_post(PREFIX + "/logout", with_session(logout))
    app.router.add_get(PREFIX + "/account", with_session(account_page))
    app.router.add_post(PREFIX + "/account/password", with_session(change_password))
