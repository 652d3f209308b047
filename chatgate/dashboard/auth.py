"""Who is logged in to the dashboard: the session cookie, CSRF tokens, log in and log out.

The session lives in an encrypted cookie (aiohttp-session's ``EncryptedCookieStorage``, Fernet
with a key derived from the server secret), so any server process can read it. The cookie is
HttpOnly, SameSite=Lax, and Secure when the request came over HTTPS (or always, with
``cookie_secure``). It holds the account id, a CSRF token, a fingerprint of the account's
password hash (changing the password ends every other session) and the account's session epoch
when it began: logging out moves the epoch on (``accounts.session_epoch``, read in the same
query as the password hash), which ends that cookie and any copy of it server-side, and with
them the account's other sessions. A disabled account is logged out on its next page.

The session wraps only the routes that use it, the dashboard's pages and the management API
(:func:`with_session`): the ``/v1`` hot path never touches a cookie.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp_session
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from chatgate.accounts import Account
from chatgate.dashboard.passwords import PasswordStore
from chatgate.dashboard.throttle import LoginThrottle
from chatgate.settings import Settings, derive_key
from chatgate.state import STATE, State

COOKIE_NAME = "chatgate_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


def forwarded(request: web.Request, header: str) -> str:
    """The last entry of a proxy's ``X-Forwarded-*`` header (the one the proxy in front
    wrote; entries before it come from the client and prove nothing), or ``""``. Read only
    where the setting ``trust_forwarded_for`` says such a proxy is there."""
    return request.headers.get(header, "").rsplit(",", 1)[-1].strip()


def scheme(request: web.Request, trust_proxy: bool) -> str:
    """``http`` or ``https``: the request's, or (``trust_proxy``) the trusted proxy's
    ``X-Forwarded-Proto``. Behind a proxy that ends TLS, the request itself is plain HTTP."""
    if trust_proxy:
        last = forwarded(request, "X-Forwarded-Proto").lower()
        if last in ("http", "https"):
            return last
    return request.scheme


def api_base_url(request: web.Request) -> str:
    """The API's base URL as this request reached it (shown beside a new key)."""
    trusted = dashboard(request).state_settings().trust_forwarded_for
    return f"{scheme(request, trusted)}://{request.host}/v1"


class SessionStorage(EncryptedCookieStorage):
    """Encrypted cookie sessions whose ``Secure`` flag follows the request's scheme (as a
    trusted proxy forwarded it, with ``trust_proxy``)."""

    def __init__(
        self, key: bytes, *, max_age: int, force_secure: bool | None, trust_proxy: bool = False
    ) -> None:
        super().__init__(
            key, cookie_name=COOKIE_NAME, max_age=max_age, httponly=True, samesite="Lax"
        )
        self._force_secure = force_secure
        self._trust_proxy = trust_proxy

    def load_cookie(self, request: web.Request) -> str | None:
        """The cookie's value; one that is not ASCII (a Fernet token is) reads as none: bytes
        that are not UTF-8 arrive as lone surrogates, which the storage cannot encode."""
        cookie = super().load_cookie(request)
        return cookie if cookie is None or cookie.isascii() else None

    async def save_session(
        self,
        request: web.Request,
        response: web.StreamResponse,
        session: aiohttp_session.Session,
    ) -> None:
        secure = self._force_secure
        if secure is None:
            secure = scheme(request, self._trust_proxy) == "https"
        # Set per response; there is no await between this and the cookie being written.
        self._cookie_params["secure"] = secure or None
        await super().save_session(request, response, session)


@dataclass(slots=True)
class Dashboard:
    """The dashboard's per-process objects; filled in at start-up (see :func:`holder`)."""

    state: State | None = None
    middleware: Middleware | None = None  # aiohttp-session's, on the session cookie
    passwords: PasswordStore | None = None
    throttle: LoginThrottle | None = None
    fingerprint_key: bytes = b""
    once_key: bytes = b""

    def ready(self) -> State:
        """The process state; an error before the application started."""
        if self.state is None:
            raise RuntimeError("the dashboard is used before the application started")
        return self.state

    def state_settings(self) -> Settings:
        """The server's settings."""
        return self.ready().settings


DASHBOARD = web.AppKey("chatgate_dashboard", Dashboard)


@dataclass(frozen=True, slots=True)
class User:
    """A logged-in person: the account, the session's CSRF token and its epoch."""

    account: Account
    csrf: str
    epoch: int = 0

    @property
    def is_admin(self) -> bool:
        return self.account.is_admin


def dashboard(request: web.Request) -> Dashboard:
    """The process's :class:`Dashboard`."""
    return request.app[DASHBOARD]


def passwords(request: web.Request) -> PasswordStore:
    store = dashboard(request).passwords
    assert store is not None
    return store


def throttle(request: web.Request) -> LoginThrottle:
    found = dashboard(request).throttle
    assert found is not None
    return found


def once_mac(request: web.Request, text: str) -> str:
    """The server's MAC of a once token's parts (:func:`chatgate.dashboard.render.once_token`)."""
    digest = hmac.new(dashboard(request).once_key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def _fingerprint(request: web.Request, password_hash: str | None) -> str:
    key = dashboard(request).fingerprint_key
    return hmac.new(key, (password_hash or "").encode(), hashlib.sha256).hexdigest()[:32]


def login_left(request: web.Request, session: aiohttp_session.Session) -> int:
    """Seconds the session's login has left: ``session_max_age`` after it was made
    (``at``), whatever was done since. Any write to the session (a once token, a flash)
    re-stamps aiohttp-session's ``created`` and the cookie's Fernet time, so neither ends it:
    polling a page kept a login alive for ever."""
    at = session.get("at")
    if not isinstance(at, int) or isinstance(at, bool):
        return 0
    max_age = dashboard(request).state_settings().session_max_age
    return min(at + max_age - int(time.time()), max_age)


async def current_user(request: web.Request) -> User | None:
    """The logged-in user, or ``None``; a stale session (its login too old, password
    changed, logged out, disabled) is ended."""
    session = await aiohttp_session.get_session(request)
    account_id = session.get("account")
    if not isinstance(account_id, str):
        return None
    left = login_left(request, session)
    if left <= 0:
        session.invalidate()
        return None
    # The cookie, written again on this answer, goes with the login, not max_age from now.
    session.max_age = left
    found = await passwords(request).session_account(account_id)
    if found is not None:
        account, password_hash, epoch = found
        # A cookie made before sessions had epochs has none: the first one, 0.
        if (
            not account.disabled
            and session.get("epoch", 0) == epoch
            and hmac.compare_digest(
                str(session.get("auth", "")), _fingerprint(request, password_hash)
            )
        ):
            return User(account, str(session.get("csrf", "")), epoch)
    session.invalidate()
    return None


async def log_in(
    request: web.Request, account_id: str, password_hash: str | None, epoch: int
) -> None:
    """Start a fresh session for ``account_id`` (a new cookie and a new CSRF token) in the
    account's session ``epoch``; it lasts ``session_max_age`` from now (:func:`login_left`)."""
    session = await aiohttp_session.new_session(request)
    session["account"] = account_id
    session["auth"] = _fingerprint(request, password_hash)
    session["csrf"] = secrets.token_urlsafe(32)
    session["epoch"] = epoch
    session["at"] = int(time.time())


async def log_out(request: web.Request, user: User) -> None:
    """End the user's session, server-side: the cookie is deleted and the account's session
    epoch moves on, so no copy of it works any more (nor do the account's other sessions)."""
    await passwords(request).end_sessions(user.account.id)
    session = await aiohttp_session.get_session(request)
    session.invalidate()


async def anonymous_csrf(request: web.Request) -> str:
    """A CSRF token for forms shown before login (sign up, log in), kept in the session."""
    session = await aiohttp_session.get_session(request)
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


async def csrf_ok(request: web.Request, supplied: Any) -> bool:
    """True when ``supplied`` equals the session's CSRF token (constant-time).

    Tokens are ASCII; anything else (a header's bytes that are not UTF-8 arrive as lone
    surrogates, which do not encode) is simply wrong.
    """
    session = await aiohttp_session.get_session(request)
    expected = session.get("csrf")
    return (
        isinstance(expected, str)
        and bool(expected)
        and isinstance(supplied, str)
        and supplied.isascii()
        and hmac.compare_digest(expected.encode(), supplied.encode())
    )


def with_session(handler: Handler) -> Handler:
    """``handler`` inside the dashboard's session: the cookie read before it runs and written
    after (aiohttp-session's middleware, for this one route).

    Every dashboard page and management API route (:mod:`chatgate.api.manage`) is registered
    wrapped; a test walks the routes. The session is not an application middleware: that was
    one more coroutine on every ``/v1`` request, only to look at its path (0.5-1% of a request's
    instructions, callgrind).
    """

    @functools.wraps(handler)
    async def in_session(request: web.Request) -> web.StreamResponse:
        middleware = request.app[DASHBOARD].middleware
        if middleware is None:  # not started (the storage needs the server's secret)
            return await handler(request)
        response: web.StreamResponse = await middleware(request, handler)
        return response

    return in_session


def setup(app: web.Application) -> Dashboard:
    """Keep the dashboard's objects on ``app``; the session storage is built when it starts."""
    holder = Dashboard()
    app[DASHBOARD] = holder

    async def start(app: web.Application) -> None:
        state = app[STATE]
        settings = state.settings
        secret = settings.resolved_secret().reveal()
        holder.state = state
        holder.middleware = aiohttp_session.session_middleware(
            SessionStorage(
                derive_key(secret, "dashboard-session"),
                max_age=settings.session_max_age,
                force_secure=settings.cookie_secure,
                trust_proxy=settings.trust_forwarded_for,
            )
        )
        holder.passwords = PasswordStore(state.engine)
        holder.throttle = LoginThrottle.from_settings(settings, state.throttles)
        holder.fingerprint_key = derive_key(secret, "dashboard-password-fingerprint")
        holder.once_key = derive_key(secret, "dashboard-once-token")

    app.on_startup.append(start)
    return holder


def client_address(request: web.Request) -> str:
    """The client address used for throttling.

    The TCP peer, unless the setting ``trust_forwarded_for`` says a reverse proxy in front
    appends the real client to ``X-Forwarded-For``: then its last entry (the one that proxy
    wrote; entries before it come from the client and prove nothing). Without the setting
    behind a proxy, every client shares the proxy's address and its throttle.
    """
    if dashboard(request).state_settings().trust_forwarded_for:
        last = forwarded(request, "X-Forwarded-For")
        if last:
            return last[:64]
    return request.remote or "unknown"
