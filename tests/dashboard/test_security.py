"""Dashboard and /api/* security, over plain HTTP against the real server: CSRF, other
accounts' keys, admin-only pages, cookie flags, sessions, generic messages."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from chatgate.settings import Settings, derive_key
from tests.dashboard.conftest import (
    CSRF,
    PASSWORD,
    User,
    admin_key,
    chat,
    csrf_of,
    make_user,
    set_password,
)
from tests.helpers import Gateway, Upstream, make_gateway

PAGES = [
    "/dashboard/",
    "/dashboard/keys",
    "/dashboard/usage",
    "/dashboard/usage.csv",
    "/dashboard/plan",
    "/dashboard/playground",
    "/dashboard/account",
    "/dashboard/admin/accounts",
    "/dashboard/admin/plans",
    "/dashboard/admin/models",
    "/dashboard/admin/usage",
]
ADMIN_PAGES = [p for p in PAGES if "/admin/" in p]
TOKEN = re.compile(r'(?<=content=")[\w-]{20,}|(?<=value=")[\w-]{20,}')


@pytest.fixture(scope="module")
def alice(dash: Gateway) -> User:
    return make_user(dash)


@pytest.fixture(scope="module")
def bob(dash: Gateway) -> User:
    return make_user(dash)


def wait_status(gw: Gateway, key: str, status: int, timeout: float = 5.0) -> int:
    """Call until the answer has ``status`` (revocation reaches the cache within ~1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        got = chat(gw, key).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.parametrize("path", PAGES)
def test_pages_need_a_session(dash: Gateway, path: str) -> None:
    resp = requests.get(dash.url + path, allow_redirects=False, timeout=10)
    assert resp.status_code == 303
    assert resp.headers["Location"].startswith("/dashboard/login?next=")


def test_api_needs_a_session_or_key(dash: Gateway) -> None:
    for path in ("/api/me", "/api/keys", "/api/plans", "/api/admin/accounts"):
        resp = requests.get(dash.url + path, timeout=10)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_a_session_cookie_that_is_not_utf8_is_no_session(dash: Gateway) -> None:
    """Bytes that are not UTF-8 in the cookie read as no session (they were a 500: the cookie
    storage failed to encode them), on the pages and on the API."""
    garbage = {"Cookie": b"chatgate_session=\xff\xfe" + b"A" * 40}
    resp = requests.get(dash.url + "/api/me", headers=garbage, timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    for path in ("/dashboard/keys", "/dashboard/login"):
        resp = requests.get(dash.url + path, headers=garbage, allow_redirects=False, timeout=10)
        assert resp.status_code == (200 if path.endswith("login") else 303), path


def test_session_cookie_flags(dash: Gateway) -> None:
    user = make_user(dash, login=False)
    token = csrf_of(user.http, user.url("/dashboard/login"))
    resp = user.http.post(
        user.url("/dashboard/login"),
        data={"csrf_token": token, "email": user.email, "password": PASSWORD},
        allow_redirects=False,
        timeout=30,
    )
    assert resp.status_code == 303
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("chatgate_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see test_units for HTTPS
    assert "Path=/" in cookie


def test_security_headers(alice: User) -> None:
    resp = alice.http.get(alice.url("/dashboard/keys"), timeout=10)
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"


def test_post_without_csrf_is_rejected(alice: User) -> None:
    before = len(alice.api("GET", "/api/keys").json()["data"])
    for data in ({"name": "sneaky"}, {"name": "sneaky", "csrf_token": "wrong"}):
        resp = alice.http.post(alice.url("/dashboard/keys"), data=data, timeout=10)
        assert resp.status_code == 403
        assert "sk-cg-" not in resp.text
    assert len(alice.api("GET", "/api/keys").json()["data"]) == before
    # Log in and sign up forms carry a token too.
    resp = requests.post(
        alice.url("/dashboard/login"), data={"email": alice.email, "password": PASSWORD}, timeout=10
    )
    assert resp.status_code == 403
    # The JSON API with a session cookie needs the header on every change.
    resp = alice.http.post(alice.url("/api/keys"), json={"name": "x"}, timeout=10)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "csrf_failed"
    resp = alice.http.post(
        alice.url("/api/keys"), json={"name": "x"}, headers={"X-CSRF-Token": "nope"}, timeout=10
    )
    assert resp.status_code == 403
    # A header that is not UTF-8 is just a wrong token (it was a 500: encoding it failed).
    for token in (b"\xff" * 43, b"\xe9", "\u00e9".encode()):
        resp = alice.http.post(
            alice.url("/api/keys"), json={"name": "x"}, headers={"X-CSRF-Token": token}, timeout=10
        )
        assert resp.status_code == 403, (token, resp.status_code)
        assert resp.json()["error"]["code"] == "csrf_failed"
    assert len(alice.api("GET", "/api/keys").json()["data"]) == before
    assert alice.api("POST", "/api/keys", json={"name": "x"}).status_code == 201


UNREADABLE_FORMS = [
    (b"csrf_token=x&email=\xff", "application/x-www-form-urlencoded"),
    (b"csrf_token=x&email=a", "application/x-www-form-urlencoded; charset=bogus"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
    (b"xx", "multipart/form-data"),
    (b"--x\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    (
        b'--x\r\nContent-Disposition: form-data; name="csrf_token"\r\n'
        b"Content-Transfer-Encoding: bogus\r\n\r\nv\r\n--x--\r\n",
        "multipart/form-data; boundary=x",
    ),
]


def test_unreadable_forms_are_a_400_page(dash: Gateway, alice: User) -> None:
    """Each was a 500 (UnicodeDecodeError, LookupError, ValueError, a parser's errors), some
    before logging in; now the dashboard's error page, and nothing changes."""
    admin = make_user(dash, admin=True)
    key_id = alice.new_key(name="kept")["id"]
    before = alice.api("GET", "/api/keys").json()["data"]
    anonymous = requests.Session()
    posts = [
        (anonymous, "/dashboard/login"),
        (anonymous, "/dashboard/signup"),
        (alice.http, "/dashboard/logout"),
        (alice.http, "/dashboard/account/password"),
        (alice.http, "/dashboard/keys"),
        (alice.http, f"/dashboard/keys/{key_id}/rotate"),
        (alice.http, f"/dashboard/keys/{key_id}/revoke"),
        (admin.http, "/dashboard/admin/plans"),
        (admin.http, "/dashboard/admin/plans/free"),
        (admin.http, "/dashboard/admin/accounts/nobody/plan"),
    ]
    problems = []
    for http, path in posts:
        for body, ctype in UNREADABLE_FORMS:
            resp = http.post(
                dash.url + path, data=body, headers={"Content-Type": ctype}, timeout=10
            )
            if not (
                resp.status_code == 400
                and resp.headers["Content-Type"].startswith("text/html")
                and "could not be read" in resp.text
            ):
                problems.append(f"{path} {body[:20]!r} {ctype}: {resp.status_code}")
    assert not problems, "\n".join(problems)
    assert alice.api("GET", "/api/keys").json()["data"] == before
    assert alice.http.get(alice.url("/dashboard/keys"), timeout=10).status_code == 200


def test_a_nul_character_is_never_a_500(gateway: Gateway) -> None:
    """PostgreSQL's text cannot hold a NUL (U+0000) and it refuses one even in a lookup: a NUL
    in a form field (before logging in, too), a key id in a URL or a usage filter was a 500
    there. Now a 4xx on both databases (the dashboard's HTML page for its pages and forms,
    OpenAI's error shape for the APIs), and nothing is stored."""
    user = make_user(gateway)
    key = user.new_key(name="kept")["key"]
    before = user.api("GET", "/api/keys").json()["data"]
    anonymous = requests.Session()
    form = {
        "csrf_token": csrf_of(anonymous, gateway.url + "/dashboard/login"),
        "email": "nul\x00@example.com",
        "password": PASSWORD,
        "password2": PASSWORD,
    }
    pages = [
        anonymous.post(gateway.url + "/dashboard/login", data=form, timeout=30),
        anonymous.post(gateway.url + "/dashboard/signup", data=form, timeout=30),
        user.post("/dashboard/keys", {"name": "nul\x00name"}),
        user.http.get(user.url("/dashboard/keys/key_%00/rotate"), timeout=10),
        user.post("/dashboard/keys/key_%00/revoke"),
    ]
    for resp in pages:
        assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code)
        assert resp.headers["Content-Type"].startswith("text/html"), resp.request.url
    bearer = {"Authorization": f"Bearer {key}"}
    usage = "/v1/organization/usage/completions?start_time=0&"
    apis = [
        user.api("GET", "/api/keys/key_%00"),
        user.api("POST", "/api/keys/key_%00/rotate"),
        requests.get(gateway.url + "/api/usage?api_key_id=%00", headers=bearer, timeout=10),
        requests.get(gateway.url + usage + "models=%00", headers=bearer, timeout=10),
        requests.get(gateway.url + usage + "api_key_ids=%00", headers=bearer, timeout=10),
    ]
    for resp in apis:
        assert resp.status_code < 500, (resp.request.url, resp.status_code, resp.text[:200])
        if resp.status_code >= 400:
            assert resp.json()["error"]["type"] == "invalid_request_error"
    after = user.api("GET", "/api/keys").json()["data"]
    # The same keys: only "last used" moved (the key called the usage APIs above).
    assert [{**k, "last_used_at": 0} for k in after] == [{**k, "last_used_at": 0} for k in before]
    assert "nul\x00" not in json.dumps(gateway.cli_json("accounts", "list"))


def test_another_accounts_key_is_404(dash: Gateway, alice: User, bob: User) -> None:
    bobs = bob.new_key(name="bob's")
    key_id = bobs["id"]
    # JSON API, session and key alike.
    alice_key = alice.new_key()["key"]
    for via_key in (False, True):
        for method, path in (
            ("GET", f"/api/keys/{key_id}"),
            ("POST", f"/api/keys/{key_id}/rotate"),
            ("POST", f"/api/keys/{key_id}/revoke"),
        ):
            if via_key:
                resp = requests.request(
                    method,
                    dash.url + path,
                    headers={"Authorization": f"Bearer {alice_key}"},
                    timeout=10,
                )
            else:
                resp = alice.api(method, path)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
    # Pages: the confirm pages and the form posts.
    for action in ("rotate", "revoke"):
        page = alice.http.get(alice.url(f"/dashboard/keys/{key_id}/{action}"), timeout=10)
        assert page.status_code == 404
        assert "bob's" not in page.text
        assert alice.post(f"/dashboard/keys/{key_id}/{action}", {"grace": "0"}).status_code == 404
    assert all(k["id"] != key_id for k in alice.api("GET", "/api/keys").json()["data"])
    assert "bob&#39;s" not in alice.http.get(alice.url("/dashboard/keys"), timeout=10).text
    # Nothing happened to Bob's key.
    assert chat(dash, bobs["key"]).status_code == 200
    assert bob.api("GET", f"/api/keys/{key_id}").json()["status"] == "active"


@pytest.mark.parametrize("path", ADMIN_PAGES)
def test_non_admin_gets_404_on_admin_pages(alice: User, path: str) -> None:
    resp = alice.http.get(alice.url(path), timeout=10)
    assert resp.status_code == 404
    assert "Page not found" in resp.text


def test_non_admin_cannot_post_admin_forms(alice: User, bob: User) -> None:
    bob_id = bob.api("GET", "/api/me").json()["id"]
    assert (
        alice.post(f"/dashboard/admin/accounts/{bob_id}/plan", {"plan": "enterprise"}).status_code
        == 404
    )
    assert (
        alice.post(f"/dashboard/admin/accounts/{bob_id}/disable", {"disabled": "1"}).status_code
        == 404
    )
    assert alice.post("/dashboard/admin/plans/free", {"rpm": "100000"}).status_code == 404
    me = bob.api("GET", "/api/me").json()
    assert me["plan"] == "free" and not me["disabled"]


def test_non_admin_gets_404_on_admin_api(dash: Gateway, alice: User, bob: User) -> None:
    bob_id = bob.api("GET", "/api/me").json()["id"]
    key = alice.new_key()["key"]
    calls = [
        ("GET", "/api/admin/accounts", None),
        ("POST", f"/api/admin/accounts/{bob_id}/plan", {"plan": "enterprise"}),
        ("POST", f"/api/admin/accounts/{bob_id}/disable", {"disabled": True}),
        ("PATCH", "/api/admin/plans/free", {"rpm": 100000}),
    ]
    for method, path, body in calls:
        by_session = alice.api(method, path, json=body)
        by_key = requests.request(
            method,
            dash.url + path,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        for resp in (by_session, by_key):
            assert resp.status_code == 404, (method, path)
            assert resp.json()["error"]["code"] == "unknown_url"
    assert bob.api("GET", "/api/me").json()["plan"] == "free"


def test_admin_key_and_admin_session_reach_admin_api(dash: Gateway, bob: User) -> None:
    key = admin_key(dash)
    resp = requests.get(
        dash.url + "/api/admin/accounts",
        params={"q": bob.email},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert resp.status_code == 200
    assert [a["email"] for a in resp.json()["data"]] == [bob.email]
    admin = make_user(dash, admin=True)
    assert admin.http.get(admin.url("/dashboard/admin/accounts"), timeout=10).status_code == 200
    assert admin.api("GET", "/api/admin/accounts").status_code == 200


def test_unknown_email_and_wrong_password_read_the_same(dash: Gateway, alice: User) -> None:
    answers = []
    for email, password in (
        (alice.email, "wrong password!"),
        ("nobody@example.com", "whatever1234"),
    ):
        http = requests.Session()
        token = csrf_of(http, dash.url + "/dashboard/login")
        resp = http.post(
            dash.url + "/dashboard/login",
            data={"csrf_token": token, "email": email, "password": password},
            timeout=30,
        )
        assert resp.status_code == 401
        answers.append(TOKEN.sub("TOKEN", resp.text.replace(email, "EMAIL")))
    assert "Incorrect email or password." in answers[0]
    # Only the CSRF tokens differ between the two pages.
    assert answers[0] == answers[1]


def test_login_next_is_not_an_open_redirect(dash: Gateway) -> None:
    user = make_user(dash, login=False)
    token = csrf_of(user.http, user.url("/dashboard/login"))
    for target in ("https://evil.example/", "//evil.example/x", "/v1/models"):
        resp = user.http.post(
            user.url("/dashboard/login"),
            data={"csrf_token": token, "email": user.email, "password": PASSWORD, "next": target},
            allow_redirects=False,
            timeout=30,
        )
        assert resp.status_code == 303
        assert resp.headers["Location"] == "/dashboard/"
        token = csrf_of(user.http, user.url("/dashboard/keys"))


def test_logout_ends_the_session(dash: Gateway) -> None:
    """Logging out ends the session server-side: a copy of the cookie taken before no longer
    works (the cookie is stateless; the account's session epoch moved on), and neither do the
    account's other sessions. Logging in again starts a working one."""
    user = make_user(dash)
    other = User(dash, user.email)
    assert other.login().status_code == 200
    cookies = user.http.cookies.copy()
    csrf = user.api("GET", "/api/me").json()["csrf_token"]
    resp = user.post("/dashboard/logout", allow_redirects=False)
    assert resp.status_code == 303 and resp.headers["Location"] == "/dashboard/login"
    assert (
        user.http.get(user.url("/dashboard/keys"), allow_redirects=False, timeout=10).status_code
        == 303
    )
    copied = requests.get(
        dash.url + "/dashboard/keys", cookies=cookies, allow_redirects=False, timeout=10
    )
    assert copied.status_code == 303
    resp = requests.post(
        dash.url + "/api/keys",
        json={"name": "replayed"},
        cookies=cookies,
        headers={"X-CSRF-Token": csrf},
        timeout=10,
    )
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    stale = other.http.get(other.url("/dashboard/keys"), allow_redirects=False, timeout=10)
    assert stale.status_code == 303
    # A new login works, and a stale copy logging out does not end it.
    assert user.login().url.endswith("/dashboard/")
    token = csrf_of(requests.Session(), dash.url + "/dashboard/login")
    requests.post(
        dash.url + "/dashboard/logout",
        data={"csrf_token": token},
        cookies=cookies,
        allow_redirects=False,
        timeout=10,
    )
    assert user.http.get(user.url("/dashboard/keys"), timeout=10).status_code == 200
    assert user.api("POST", "/api/keys", json={"name": "after"}).status_code == 201


def _restamped(gw: Gateway, cookie: str, **changes: object) -> str:
    """The session cookie with ``changes`` made to what it holds, encrypted again now: what a
    write to the session does (aiohttp-session re-stamps ``created``, Fernet its time)."""
    secret = Settings.from_env(gw.env).resolved_secret().reveal()
    fernet = Fernet(base64.urlsafe_b64encode(derive_key(secret, "dashboard-session")))
    data = json.loads(fernet.decrypt(cookie.encode()))
    data["created"] = int(time.time())
    data["session"].update(changes)
    return fernet.encrypt(json.dumps(data).encode()).decode()


def test_a_login_ends_max_age_after_it_was_made_whatever_is_done(dash: Gateway) -> None:
    """CHATGATE_SESSION_MAX_AGE is how long a login lasts: every session write re-stamped
    the cookie, so viewing the keys page (which writes a once token) every 10 s kept a 60 s
    login alive for ever. The login's own time (``at``) now ends it."""
    user = make_user(dash)
    page = user.http.get(user.url("/dashboard/keys"), allow_redirects=False, timeout=10)
    assert page.status_code == 200
    max_age = Settings.from_env(dash.env).session_max_age
    # The cookie that answer wrote is fresh: made just now, by a login made max_age ago.
    cookie = user.http.cookies["chatgate_session"]
    made = int(time.time()) - max_age - 1
    old = _restamped(dash, cookie, at=made)
    for path in ("/dashboard/keys", "/dashboard/"):
        resp = requests.get(
            dash.url + path, cookies={"chatgate_session": old}, allow_redirects=False, timeout=10
        )
        assert resp.status_code == 303 and "/dashboard/login" in resp.headers["Location"], path
    resp = requests.get(dash.url + "/api/me", cookies={"chatgate_session": old}, timeout=10)
    assert resp.status_code == 401
    # A login with time left works, and a cookie it writes (here a revocation's message)
    # ends with it, not max_age from now.
    young = _restamped(dash, cookie, at=made + 60)
    resp = requests.get(
        dash.url + "/dashboard/keys", cookies={"chatgate_session": young}, timeout=10
    )
    assert resp.status_code == 200
    key_id = user.new_key(name="to revoke")["id"]
    resp = requests.post(
        dash.url + f"/dashboard/keys/{key_id}/revoke",
        data={"csrf_token": user.csrf()},
        cookies={"chatgate_session": young},
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 303, resp.status_code
    written = resp.headers["Set-Cookie"]
    left = int(re.search(r"Max-Age=(\d+)", written).group(1))  # type: ignore[union-attr]
    assert left <= 60


def test_password_change_ends_other_sessions(dash: Gateway) -> None:
    user = make_user(dash)
    other = User(dash, user.email)
    assert other.login().status_code == 200
    new = "a different long password"
    resp = user.post(
        "/dashboard/account/password",
        {"current": PASSWORD, "password": new, "password2": new},
    )
    assert resp.status_code == 200 and "Password changed" in resp.text
    # This browser stays logged in; the other one is logged out.
    assert user.http.get(user.url("/dashboard/keys"), timeout=10).status_code == 200
    stale = other.http.get(other.url("/dashboard/keys"), allow_redirects=False, timeout=10)
    assert stale.status_code == 303
    # The new password works, the old one does not.
    assert User(dash, user.email, new).login().url.endswith("/dashboard/")
    assert User(dash, user.email, PASSWORD).login().status_code == 401


def test_disabled_account_is_logged_out_and_its_keys_stop(dash: Gateway) -> None:
    user = make_user(dash)
    key = user.new_key()["key"]
    account_id = user.api("GET", "/api/me").json()["id"]
    copied = requests.Session()  # the session cookie, kept elsewhere (another tab, a thief)
    copied.cookies.update(user.http.cookies)

    def disable(disabled: bool) -> None:
        resp = requests.post(
            dash.url + f"/api/admin/accounts/{account_id}/disable",
            json={"disabled": disabled},
            headers={"Authorization": f"Bearer {admin_key(dash)}"},
            timeout=10,
        )
        assert resp.status_code == 200 and resp.json()["disabled"] is disabled

    disable(True)
    assert (
        user.http.get(user.url("/dashboard/"), allow_redirects=False, timeout=10).status_code == 303
    )
    assert user.login().status_code == 401  # the same generic answer
    assert wait_status(dash, key, 401) == 401
    # The key's holder is told why, as OpenAI tells it (it said "Incorrect API key": QA).
    error = chat(dash, key).json()["error"]
    assert error["code"] == "account_deactivated" and "disabled account" in error["message"]
    # Enabled again, the account logs in afresh: the sessions it had stay ended.
    disable(False)
    stale = copied.get(user.url("/dashboard/"), allow_redirects=False, timeout=10)
    assert stale.status_code == 303
    assert user.login().url.endswith("/dashboard/")


def test_key_is_never_in_a_list_or_a_later_page(dash: Gateway, alice: User) -> None:
    issued = alice.new_key(name="secret-check")
    key = issued["key"]
    for path in ("/dashboard/keys", "/dashboard/", f"/api/keys/{issued['id']}", "/api/keys"):
        assert key not in alice.http.get(alice.url(path), timeout=10).text
    assert key not in dash.logs()


def test_keys_past_their_rotation_period_are_marked(dash: Gateway) -> None:
    user = make_user(dash)
    fresh = dash.cli_json(
        "keys", "create", "--account", user.email, "--name", "fresh", "--rotate-every", "30d"
    )
    due = dash.cli_json(
        "keys", "create", "--account", user.email, "--name", "stale", "--rotate-every", "1s"
    )
    time.sleep(1.5)
    page = user.http.get(user.url("/dashboard/keys"), timeout=10).text
    rows = page.split("<tr")[1:]
    row_of = {k["id"]: next(r for r in rows if k["id"] in r) for k in (fresh, due)}
    assert "rotation due" in row_of[due["id"]]
    assert "rotation due" not in row_of[fresh["id"]]
    listed = {k["id"]: k for k in dash.cli_json("keys", "due")}
    assert due["id"] in listed and fresh["id"] not in listed


def _as_over_tls(http: requests.Session) -> None:
    """Let ``Secure`` cookies go out over the test's plain HTTP, as a browser sends them to
    the proxy over TLS."""
    for cookie in http.cookies:
        cookie.secure = False


def test_behind_a_trusted_tls_proxy_the_cookie_is_secure_and_urls_https(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Behind a proxy that ends TLS, each request reaches chatgate as plain HTTP: with the
    default ``cookie_secure=auto`` the session cookie never got ``Secure``, and the new key's
    page showed an ``http://`` base URL. With ``trust_forwarded_for`` (the proxy is trusted
    for ``X-Forwarded-For``), its ``X-Forwarded-Proto`` now counts too."""
    gw = make_gateway(tmp_path, upstream=upstream, extra_env={"CHATGATE_TRUST_FORWARDED_FOR": "1"})
    gw.start()
    try:
        user = User(gw, f"tls-{time.time_ns()}@example.com")
        gw.cli("accounts", "create", user.email)
        set_password(gw, user.email, PASSWORD)
        user.http.headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
        token = csrf_of(user.http, user.url("/dashboard/login"))
        _as_over_tls(user.http)
        login = user.http.post(
            user.url("/dashboard/login"),
            data={"csrf_token": token, "email": user.email, "password": PASSWORD},
            allow_redirects=False,
            timeout=30,
        )
        assert login.status_code == 303, login.text[:300]
        cookie = login.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie
        _as_over_tls(user.http)
        keys_page = user.http.get(user.url("/dashboard/keys"), timeout=10).text
        found = re.search(r'name="once" value="([^"]+)"', keys_page), CSRF.search(keys_page)
        assert found[0] and found[1]
        form = {"csrf_token": found[1].group(1), "once": found[0].group(1), "name": "tls"}
        _as_over_tls(user.http)  # (each answer sets the cookie again)
        page = user.http.post(user.url("/dashboard/keys"), data=form, timeout=30)
        assert page.status_code == 201 and f"https://127.0.0.1:{gw.port}/v1" in page.text
    finally:
        gw.stop()


def test_an_untrusted_forwarded_proto_changes_nothing(dash: Gateway) -> None:
    """Without ``trust_forwarded_for``, anyone may send the header: it is not believed."""
    user = User(dash, f"plain-{time.time_ns()}@example.com")
    dash.cli("accounts", "create", user.email)
    set_password(dash, user.email, PASSWORD)
    user.http.headers["X-Forwarded-Proto"] = "https"
    login = user.login()
    assert login.status_code == 200 and "Secure" not in login.history[0].headers["Set-Cookie"]
