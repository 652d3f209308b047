"""Templates and the page wrapper: login required, admin only, CSRF on every POST, HTML errors.

Every page handler is wrapped by :func:`page`, which
- sends a visitor without a session to the login page (303), and a non-admin on an admin
  page to a 404 page (the same as for a page that does not exist);
- rejects a POST whose form cannot be read (400) or whose ``csrf_token`` field is missing or
  wrong (403), before the handler runs (:func:`form_problem`; the log-in and sign-up pages,
  outside the wrapper, call it too), and every handler reads the form with :func:`read_form`;
- turns an :class:`~chatgate.errors.APIError` from the shared services into an HTML page with
  the same status (the API middleware would answer JSON);
- adds the security headers (CSP without inline scripts, no framing, no caching).
"""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import aiohttp_session
import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_request import FileField
from multidict import MultiDictProxy
from yarl import URL

from chatgate import errors
from chatgate.dashboard.auth import (
    CSRF_FIELD,
    User,
    anonymous_csrf,
    csrf_ok,
    current_user,
    once_mac,
)
from chatgate.keys.store import Once
from chatgate.state import STATE, State
from chatgate.usage.tables import cents_text, usd_text

HERE = Path(__file__).parent
TEMPLATES = web.AppKey("chatgate_dashboard_templates", jinja2.Environment)
PREFIX = "/dashboard"

PageHandler = Callable[[web.Request, User], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _ts(value: int | None) -> str:
    if value is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))


def _day(value: int | None) -> str:
    return "—" if value is None else time.strftime("%Y-%m-%d", time.gmtime(value))


def _num(value: int | float | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def _ago(value: int | None) -> str:
    if value is None:
        return "never"
    delta = int(time.time()) - value
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= seconds:
            return f"{delta // seconds}{unit} ago"
    return "just now"


def _cents(value: int | None) -> str:
    """US cents as dollars: ``$12.34`` (``unlimited`` for None, as :func:`_num`)."""
    return "unlimited" if value is None else cents_text(value)


def _ms(value: float | None) -> str:
    """A mean latency: ``1,234 ms`` (``—`` when no request was timed)."""
    return "—" if value is None else f"{value:,.0f} ms"


def _percent(used: int, limit: int | None) -> str:
    """Share of ``limit`` used, 0-100, for a CSS width (0 when unlimited)."""
    if not limit:
        return "0"
    return str(min(int(used * 100 / limit), 100))


FILTERS: dict[str, Callable[..., str]] = {
    "ts": _ts,
    "day": _day,
    "num": _num,
    "ago": _ago,
    "percent": _percent,
    "cents": _cents,
    "usd": usd_text,  # nano-dollars
    "ms": _ms,
}


def setup_templates(app: web.Application) -> jinja2.Environment:
    """The Jinja2 environment (autoescaped) for the dashboard's templates."""
    return aiohttp_jinja2.setup(
        app,
        app_key=TEMPLATES,
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        filters=FILTERS,
    )


def state(request: web.Request) -> State:
    return request.app[STATE]


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """Render ``template`` with the common context (user, nav, flash messages)."""
    response = aiohttp_jinja2.render_template(
        template, request, dict(context), app_key=TEMPLATES, status=status
    )
    response.headers.update(SECURITY_HEADERS)
    return response


async def base_context(request: web.Request, user: User | None) -> dict[str, Any]:
    """What every template may use."""
    session = await aiohttp_session.get_session(request)
    flashes = session.pop("flash", [])
    csrf = user.csrf if user is not None else await anonymous_csrf(request)
    return {
        "user": user,
        "csrf": csrf,
        "csrf_field": CSRF_FIELD,
        "flashes": flashes if isinstance(flashes, list) else [],
        "path": request.path,
        "signup_open": signup_open(request),
    }


async def page_response(
    request: web.Request,
    user: User | None,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
) -> web.Response:
    """Render a page with the base context merged in."""
    merged = await base_context(request, user)
    merged.update(context or {})
    return render(request, template, merged, status=status)


async def flash(request: web.Request, message: str, kind: str = "ok") -> None:
    """A message shown once on the next page (kept in the session cookie)."""
    session = await aiohttp_session.get_session(request)
    messages = session.get("flash", [])
    session["flash"] = [*messages[-4:], {"kind": kind, "text": message[:300]}]


ONCE_FIELD = "once"
ONCE_MARGIN = 300
"""Seconds a taken once token is kept beyond a login's lifetime (clocks of several nodes)."""


async def once_token(request: web.Request) -> str:
    """A token for a form whose POST must run once (it makes a key and shows it): the page
    that reloads the POST's answer sends the form again, and a browser's "resend?" is easily
    said yes to. The token is its time, a nonce and the server's MAC of both with the
    session's CSRF token, which says the form came from this login, lately (nothing is kept
    in the session: pages loaded at once in several tabs each wrote the list of tokens the
    cookie held, and the last cookie written lost the others' tokens). The key's transaction
    takes it for good in the database (:func:`take_once`), so the same form sent again (a
    double submit, a retry after a lost answer, a replay) makes nothing, on any process."""
    session = await aiohttp_session.get_session(request)
    issued, nonce = str(int(time.time())), secrets.token_urlsafe(12)
    mac = once_mac(request, f"{session.get('csrf')}|{issued}|{nonce}")
    return f"{issued}.{nonce}.{mac}"


async def take_once(
    request: web.Request, form: MultiDictProxy[str | bytes | bytearray | FileField]
) -> Once | None:
    """The form's once token when this login issued it within a login's lifetime, to be taken
    in the database with the key it makes (:class:`~chatgate.keys.store.Once`: its row is kept
    longer than the token is good for); ``None`` when it is not such a token."""
    token = form.get(ONCE_FIELD)
    session = await aiohttp_session.get_session(request)
    csrf = session.get("csrf")
    if not isinstance(token, str) or not isinstance(csrf, str) or not csrf or len(token) > 64:
        return None
    issued, _, rest = token.partition(".")
    nonce, _, mac = rest.partition(".")
    if not issued.isascii() or not issued.isdigit():
        return None
    max_age = state(request).settings.session_max_age
    if not -ONCE_MARGIN <= time.time() - int(issued) <= max_age:
        return None
    if not hmac.compare_digest(
        mac.encode(), once_mac(request, f"{csrf}|{issued}|{nonce}").encode()
    ):
        return None
    return Once(token, max_age + ONCE_MARGIN)


def redirect(location: str) -> web.HTTPSeeOther:
    """A 303 to ``location`` (raise it): after a POST, the browser GETs the next page."""
    return web.HTTPSeeOther(location)


def signup_open(request: web.Request) -> bool:
    """Whether anyone may create an account (setting ``signup_open``, default on)."""
    return state(request).settings.signup_open


async def error_page(
    request: web.Request, user: User | None, status: int, title: str, message: str
) -> web.Response:
    """The error page; a refused form's links back to the page it came from (QA: "Back to
    the dashboard" alone, from the admin's Plans page), the browser's Back keeping its input."""
    context = {"title": title, "message": message, "back": _came_from(request)}
    return await page_response(request, user, "error.html", context, status=status)


def _came_from(request: web.Request) -> str | None:
    """The dashboard page a POST's form was on (its ``Referer``, this host's only)."""
    if request.method != "POST":
        return None
    referer = URL(request.headers.get("Referer", ""))
    if referer.host != request.url.host or referer.port != request.url.port:
        return None
    path = referer.path_qs
    return path if safe_next(path) == path else None


async def not_found(request: web.Request, user: User | None = None) -> web.Response:
    return await error_page(
        request, user, 404, "Page not found", "There is no page here, or it is not yours."
    )


def page(*, admin: bool = False) -> Callable[[PageHandler], Handler]:
    """Wrap a page handler: session required (admin too if asked), CSRF on POST, HTML errors."""

    def wrap(fn: PageHandler) -> Handler:
        @functools.wraps(fn)
        async def handler(request: web.Request) -> web.StreamResponse:
            user = await current_user(request)
            if user is None:
                if request.method == "GET":
                    raise redirect(f"{PREFIX}/login?next={quote(request.path_qs, safe='')}")
                raise redirect(f"{PREFIX}/login")
            if admin and not user.is_admin:
                return await not_found(request, user)
            if request.method == "POST":
                refused = await form_problem(request, user)
                if refused is not None:
                    return refused
            try:
                response = await fn(request, user)
            except errors.APIError as exc:
                return await error_page(request, user, exc.status, "Not possible", exc.message)
            except Exception as exc:
                bad = errors.refused_text(exc)  # a NUL in a URL's id (PostgreSQL)
                if bad is None:
                    raise
                return await error_page(request, user, bad.status, "Not possible", bad.message)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return handler

    return wrap


# What aiohttp raises on a form body it cannot read: a byte outside the charset
# (UnicodeDecodeError), an unknown charset (LookupError), multipart without a boundary, with a
# part without a name or cut short (ValueError), with broken part headers (its parser's
# BadHttpMessage) or an unknown transfer encoding (RuntimeError). Each was a 500.
_UNREADABLE = (ValueError, LookupError, RuntimeError, HttpProcessingError)
UNREADABLE_FORM = (
    "This form could not be read: its encoding or format is broken. Go back, reload the page "
    "and try again."
)


async def read_form(
    request: web.Request,
) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    """The posted form (parsed once, aiohttp keeps it); a 400 when its body cannot be read or
    a field holds a NUL character."""
    try:
        form = await request.post()
    except _UNREADABLE as exc:
        raise errors.InvalidRequest(UNREADABLE_FORM, code="invalid_form") from exc
    # No field takes a NUL, and PostgreSQL refuses one even in a lookup (a login's email).
    if any(isinstance(value, str) and "\x00" in value for value in form.values()):
        raise errors.InvalidRequest(UNREADABLE_FORM, code="invalid_form")
    return form


async def form_problem(request: web.Request, user: User | None) -> web.Response | None:
    """The error page for a POST whose form cannot be read (400) or does not carry the
    session's CSRF token (403); ``None`` when the form is fine."""
    try:
        form = await read_form(request)
    except errors.InvalidRequest as exc:
        return await error_page(request, user, exc.status, "Form not readable", exc.message)
    if not await csrf_ok(request, form.get(CSRF_FIELD)):
        return await csrf_failed(request, user)
    return None


async def csrf_failed(request: web.Request, user: User | None) -> web.Response:
    return await error_page(
        request,
        user,
        403,
        "Form expired",
        "This form was missing its security token or it expired. Go back, reload the page "
        "and try again.",
    )


def safe_next(target: str | None) -> str:
    """A post-login destination inside the dashboard only (no open redirect)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//"):
        return target
    return PREFIX + "/"


def field(
    form: Mapping[str, object], name: str, limit: int = 320, *, default: str | None = None
) -> str:
    """A text field of a posted form ("" when absent), never clipped: one longer than
    ``limit`` is a 400 naming it (or ``default``, when given, for a field that only says
    where to go next). A clipped value could pass the check its whole failed: a 65-character
    plan name was made as its first 64, another plan's name chosen by its first 64. A
    ``limit`` bounds the work and should be above what the field's own check takes, so that
    check's message is the one shown."""
    value = form.get(name, "")
    if not isinstance(value, str):
        return ""
    if len(value) > limit:
        if default is not None:
            return default
        raise errors.InvalidRequest(
            f"The field `{name[:40]}` is longer than {limit:,} characters.", param=name[:40]
        )
    return value
