"""Dashboard pages as a user reads them: a key form sent twice, keys no longer active, the
usage page's numbers beside the export's and the plan's meters beside the limiter."""

from __future__ import annotations

import csv
import io
import re
import secrets
import time
from pathlib import Path

import requests

from tests.dashboard.conftest import CSRF, User, chat, make_user
from tests.helpers import Gateway, Upstream, make_gateway

ONCE = re.compile(r'name="once" value="([^"]+)"')
NEW_KEY = re.compile(r"sk-cg-[A-Za-z0-9_\-]{20,}")  # a whole key, not a hint


def form_of(user: User, path: str) -> dict[str, str]:
    """The CSRF and once tokens of the form on ``path``, as a browser would send them."""
    page = user.http.get(user.url(path), timeout=10)
    assert page.status_code == 200, page.status_code
    csrf, once = CSRF.search(page.text), ONCE.search(page.text)
    assert csrf and once, f"no form tokens on {path}"
    return {"csrf_token": csrf.group(1), "once": once.group(1)}


def count_keys(user: User) -> int:
    return len(user.api("GET", "/api/keys").json()["data"])


def test_a_key_form_sent_again_makes_no_second_key(dash: Gateway) -> None:
    """Reloading the page that showed a new key sends its form again: the second time makes
    no key (and shows none); two forms open in two tabs each make theirs."""
    user = make_user(dash)
    form = {**form_of(user, "/dashboard/keys"), "name": "reloaded"}
    first = user.http.post(user.url("/dashboard/keys"), data=form, timeout=30)
    assert first.status_code == 201 and NEW_KEY.search(first.text)
    before = count_keys(user)
    again = user.http.post(user.url("/dashboard/keys"), data=form, timeout=30)
    assert again.status_code == 409, again.status_code
    assert "sent before" in again.text and not NEW_KEY.search(again.text)
    assert count_keys(user) == before
    tabs = [form_of(user, "/dashboard/keys") for _ in range(2)]
    for tab in tabs:
        made = user.http.post(user.url("/dashboard/keys"), data={**tab, "name": "tab"}, timeout=30)
        assert made.status_code == 201
    assert count_keys(user) == before + 2
    # A form without the token (made by hand) is refused the same way.
    bare = {"csrf_token": form["csrf_token"], "name": "by hand"}
    assert user.http.post(user.url("/dashboard/keys"), data=bare, timeout=30).status_code == 409

    # Rotation: sent again, it would have replaced the secret just shown with another.
    key_id = user.new_key(name="rotated")["id"]
    path = f"/dashboard/keys/{key_id}/rotate"
    form = {**form_of(user, path), "grace": "0"}
    rotated = user.http.post(user.url(path), data=form, timeout=30)
    assert rotated.status_code == 200
    shown = NEW_KEY.search(rotated.text)
    assert shown
    again = user.http.post(user.url(path), data=form, timeout=30)
    assert again.status_code == 409 and not NEW_KEY.search(again.text)
    assert chat(dash, shown.group(0)).status_code == 200  # the secret shown still works


def _send(user: User, path: str, form: dict[str, str], cookies: object) -> requests.Response:
    """POST ``form`` with the session cookie of before (``cookies``), as a double submit or
    a retry after a lost answer sends it; the user's own cookie jar is left as it is."""
    return requests.post(user.url(path), data=form, cookies=cookies, timeout=30)


def test_a_key_form_sent_again_with_the_cookie_of_before_changes_nothing(
    dash: Gateway,
) -> None:
    """The once token lived only in the session cookie: the same POST sent again with the
    cookie it was sent with made a second key, and rotated a second time, which ended the
    grace of the original secret at once."""
    user = make_user(dash)
    form = {**form_of(user, "/dashboard/keys"), "name": "twice"}
    before = user.http.cookies.copy()
    first = _send(user, "/dashboard/keys", form, before)
    assert first.status_code == 201 and NEW_KEY.search(first.text)
    again = _send(user, "/dashboard/keys", form, before)
    assert again.status_code == 409 and "sent before" in again.text
    assert not NEW_KEY.search(again.text)
    assert [k["name"] for k in user.api("GET", "/api/keys").json()["data"]] == ["twice"]

    original = user.new_key(name="rotated")
    path = f"/dashboard/keys/{original['id']}/rotate"
    form = {**form_of(user, path), "grace": "24h"}
    before = user.http.cookies.copy()
    rotated = _send(user, path, form, before)
    assert rotated.status_code == 200
    shown = NEW_KEY.search(rotated.text)
    assert shown
    again = _send(user, path, form, before)
    assert again.status_code == 409 and "rotated then" in again.text
    assert not NEW_KEY.search(again.text)
    # The original secret keeps the grace it was promised, and the new one works.
    assert chat(dash, original["key"]).status_code == 200
    assert chat(dash, shown.group(0)).status_code == 200


def test_a_key_form_runs_once_across_processes_sharing_a_database(
    pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """Two processes on one PostgreSQL database: a form sent to one and then, with the same
    cookie, to the other makes one key."""
    nodes = [
        make_gateway(tmp_path / f"n{i}", database_url=pg_url, upstream=upstream).start()
        for i in range(2)
    ]
    try:
        user = make_user(nodes[0])
        form = {**form_of(user, "/dashboard/keys"), "name": "one of two"}
        before = user.http.cookies.copy()
        sent = [
            requests.post(n.url + "/dashboard/keys", data=form, cookies=before, timeout=30)
            for n in nodes
        ]
        assert [r.status_code for r in sent] == [201, 409]
        assert count_keys(user) == 1
    finally:
        for node in nodes:
            node.stop()


def test_forms_opened_at_once_in_several_tabs_each_run(dash: Gateway) -> None:
    """QA (a browser): two pages loaded at the same moment (tabs opened together, a browser
    restoring its tabs) each wrote the session's list of once tokens into the cookie, and the
    cookie written last lost the other tab's token: its form was refused, "opened before your
    last login, or more than 8 forms ago", none of which was true. The token is now the
    form's own (signed for this login), so every tab's form runs, once."""
    user = make_user(dash)
    before = user.http.cookies.copy()
    loaded = [requests.get(user.url("/dashboard/keys"), cookies=before, timeout=30) for _ in "ab"]
    tokens = [ONCE.search(page.text) for page in loaded]
    csrf = CSRF.search(loaded[0].text)
    assert csrf and all(tokens)
    last = loaded[-1].cookies or before  # the cookie the browser ends up with
    for i, token in enumerate(tokens):
        assert token
        form = {"csrf_token": csrf.group(1), "once": token.group(1), "name": f"tab {i}"}
        made = requests.post(user.url("/dashboard/keys"), data=form, cookies=last, timeout=30)
        assert made.status_code == 201, made.status_code
    forms = [form_of(user, "/dashboard/keys") for _ in range(9)]  # more tabs than 8: all good
    made = user.http.post(user.url("/dashboard/keys"), data={**forms[0], "name": "9"}, timeout=30)
    assert made.status_code == 201
    assert count_keys(user) == 3


def test_a_form_of_another_login_or_forged_says_nothing_was_made(dash: Gateway) -> None:
    """A once token is good for the login that issued it: a form opened before the last
    login, or one whose token was altered, makes nothing and says so (not "sent before")."""
    user = make_user(dash)
    stale = form_of(user, "/dashboard/keys")
    forged = form_of(user, "/dashboard/keys")
    issued, nonce, mac = forged["once"].split(".")
    forged["once"] = f"{issued}.{nonce}.{mac[::-1]}"
    sent = user.http.post(user.url("/dashboard/keys"), data={**forged, "name": "x"}, timeout=30)
    assert sent.status_code == 409 and "Nothing was changed" in sent.text
    assert "sent before" not in sent.text
    user.post("/dashboard/logout")
    assert user.login().status_code == 200
    stale["csrf_token"] = form_of(user, "/dashboard/keys")["csrf_token"]  # the new login's
    old = user.http.post(user.url("/dashboard/keys"), data={**stale, "name": "old"}, timeout=30)
    assert old.status_code == 409 and "Nothing was changed" in old.text
    assert "sent before" not in old.text and not NEW_KEY.search(old.text)
    assert count_keys(user) == 0


def test_rotating_again_in_a_grace_warns_and_says_which_secret_stopped(dash: Gateway) -> None:
    """A key keeps one previous secret: a second rotation within the first's grace ends the
    original secret at once. The rotate page says so before; the answers (page and API) say
    it happened, and until when that secret was to work."""
    user = make_user(dash)
    original = user.new_key(name="twice rotated")
    path = f"/dashboard/keys/{original['id']}/rotate"
    assert 'id="grace-running"' not in user.http.get(user.url(path), timeout=10).text
    first = user.api("POST", f"/api/keys/{original['id']}/rotate", json={"grace": "24h"})
    assert first.status_code == 200 and first.json()["grace_cut_short"] is None
    page = user.http.get(user.url(path), timeout=10).text
    assert 'id="grace-running"' in page and "stops that one now" in page
    form = {**form_of(user, path), "grace": "1h"}
    second = user.http.post(user.url(path), data=form, timeout=30)
    assert second.status_code == 200 and 'id="grace-cut-short"' in second.text
    assert chat(dash, original["key"]).status_code == 401  # as the page warned
    third = user.api("POST", f"/api/keys/{original['id']}/rotate", json={"grace": "0"})
    cut = third.json()["grace_cut_short"]
    assert cut is not None and cut > time.time()


def test_pages_of_a_key_no_longer_active_offer_no_form(dash: Gateway) -> None:
    user = make_user(dash)
    key_id = user.new_key(name="gone")["id"]
    assert user.api("POST", f"/api/keys/{key_id}/revoke").status_code == 200
    for action in ("rotate", "revoke"):
        page = user.http.get(user.url(f"/dashboard/keys/{key_id}/{action}"), timeout=10)
        assert page.status_code == 200
        assert 'id="not-active"' in page.text and "revoked" in page.text
        assert f'action="/dashboard/keys/{key_id}/{action}"' not in page.text


def _csv_totals(user: User) -> dict[str, int]:
    text = user.http.get(user.url("/dashboard/usage.csv?period=7d"), timeout=10).text
    rows = list(csv.DictReader(io.StringIO(text)))
    return {c: sum(int(r[c]) for r in rows) for c in ("requests", "errors", "rate_limited")}


def _stat(page: str, name: str) -> int:
    found = re.search(rf'id="{name}">([\d,]+)<', page)
    assert found, name
    return int(found.group(1).replace(",", ""))


def test_usage_page_counts_as_the_export_and_the_meter_as_the_limit(dash: Gateway) -> None:
    """Errors are every answer that is not 2xx on the page as in the export (429s among
    them), and the requests-per-day meter counts what the limit counts: a malformed request
    is an error but takes none of the day's requests, a 429 neither."""
    plan = f"day-{secrets.token_hex(3)}"
    dash.cli("plans", "create", plan, "--rpd", "2")
    user = make_user(dash, plan=plan)
    key = user.new_key(name="counted")["key"]
    bearer = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    malformed = requests.post(
        dash.url + "/v1/chat/completions", headers=bearer, data="{", timeout=30
    )
    assert malformed.status_code == 400
    assert [chat(dash, key).status_code for _ in range(3)] == [200, 200, 429]

    deadline = time.monotonic() + 20  # the recorder writes in batches, about every second
    while _csv_totals(user)["requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    exported = _csv_totals(user)
    assert exported == {"requests": 4, "errors": 2, "rate_limited": 1}, exported
    page = user.http.get(user.url("/dashboard/usage?period=7d"), timeout=10).text
    assert _stat(page, "total-requests") == exported["requests"]
    assert _stat(page, "total-errors") == exported["errors"]
    assert _stat(page, "total-rate-limited") == exported["rate_limited"]
    meter = re.search(r'id="meter-rpd">([\d,]+) / ([\d,]+)<', page)
    assert meter and meter.groups() == ("2", "2"), meter and meter.groups()
    # The errors chart says there were errors; with none, it says that, not "no requests".
    assert "No errors in this period" not in page and "No requests in this period" not in page


def test_a_usage_range_that_was_changed_says_so(dash: Gateway) -> None:
    user = make_user(dash)
    for query, said in (
        ("from=2026-12-01&to=9999-12-31", "after today"),
        ("from=garbage&to=2026-12-01", "not a range of dates"),
        ("from=%3Cb%3Ex&to=2026-12-01", "&lt;b&gt;x"),  # the date as typed, escaped
    ):
        page = user.http.get(user.url(f"/dashboard/usage?{query}"), timeout=10)
        assert page.status_code == 200
        note = re.search(r'id="period-note">([^<]*)<', page.text)
        assert note and said in note.group(1), (query, note and note.group(1))
    page = user.http.get(user.url("/dashboard/usage?period=30d"), timeout=10).text
    assert 'id="period-note"' not in page


def test_any_authenticated_request_counts_as_a_use_of_its_key(dash: Gateway) -> None:
    """The "last used" column tells an owner whether revoking a key breaks something:
    listing models or a malformed request uses the key as much as a chat does (they read
    "never")."""
    user = make_user(dash)
    listing, malformed, idle = (user.new_key(name=n) for n in ("models", "malformed", "idle"))
    bearer = {"Authorization": f"Bearer {listing['key']}"}
    assert requests.get(dash.url + "/v1/models", headers=bearer, timeout=10).status_code == 200
    bearer = {"Authorization": f"Bearer {malformed['key']}", "Content-Type": "application/json"}
    bad = requests.post(dash.url + "/v1/chat/completions", headers=bearer, data="{", timeout=10)
    assert bad.status_code == 400
    used = {k["id"]: k["last_used_at"] for k in user.api("GET", "/api/keys").json()["data"]}
    assert used[listing["id"]] is not None and used[malformed["id"]] is not None
    assert used[idle["id"]] is None


def test_sign_up_refuses_a_password_easy_to_guess(dash: Gateway) -> None:
    http = requests.Session()
    email = f"weak-{secrets.token_hex(4)}@example.com"
    for weak in ("password123", " " * 12, email):
        page = http.get(dash.url + "/dashboard/signup", timeout=10).text
        csrf = CSRF.search(page)
        assert csrf
        form = {"csrf_token": csrf.group(1), "email": email, "password": weak, "password2": weak}
        resp = http.post(dash.url + "/dashboard/signup", data=form, timeout=30)
        assert resp.status_code == 400, resp.status_code
        assert "too easy to guess" in resp.text or "other than spaces" in resp.text
    page = http.get(dash.url + "/dashboard/signup", timeout=10).text
    csrf = CSRF.search(page)
    assert csrf
    good = "a walrus in a bowler hat"
    form = {"csrf_token": csrf.group(1), "email": email, "password": good, "password2": good}
    made = http.post(dash.url + "/dashboard/signup", data=form, timeout=30)
    assert made.status_code == 200 and made.url.endswith("/dashboard/"), made.status_code


def test_a_password_longer_than_zxcvbn_reads_signs_up_and_changes(dash: Gateway) -> None:
    """A password manager's 100-character password was a 500 at sign-up and at a change
    (zxcvbn raises beyond 72 characters)."""
    http = requests.Session()
    email = f"long-{secrets.token_hex(4)}@example.com"
    first, second = secrets.token_urlsafe(90)[:100], secrets.token_urlsafe(200)[:256]
    csrf = CSRF.search(http.get(dash.url + "/dashboard/signup", timeout=10).text)
    assert csrf
    form = {"csrf_token": csrf.group(1), "email": email, "password": first, "password2": first}
    made = http.post(dash.url + "/dashboard/signup", data=form, timeout=30)
    assert made.status_code == 200 and made.url.endswith("/dashboard/"), made.status_code
    user = User(dash, email, first, http)
    form = {"current": first, "password": second, "password2": second}
    changed = user.post("/dashboard/account/password", form)
    assert changed.status_code == 200 and "Password changed" in changed.text, changed.status_code
    weak = "a" * 100
    form = {"current": second, "password": weak, "password2": weak}
    refused = user.post("/dashboard/account/password", form)
    assert refused.status_code == 400 and "too easy to guess" in refused.text


def test_a_key_pasted_into_a_form_field_is_shown_as_its_hint(dash: Gateway) -> None:
    """The JSON API showed a key pasted into a field as its hint; the pages echoed it whole:
    the key form's models field ("Unknown model `sk-cg-...`") and the admin's plan field."""
    user = make_user(dash)
    made = user.new_key(name="pasted")
    key, hint = made["key"], made["hint"]
    form = {**form_of(user, "/dashboard/keys"), "name": "x", "models": key}
    page = user.http.post(user.url("/dashboard/keys"), data=form, timeout=30)
    assert page.status_code == 400 and key not in page.text and hint in page.text
    admin = make_user(dash, admin=True)
    account_id = user.api("GET", "/api/keys").json()["data"][0]["account_id"]
    path = f"/dashboard/admin/accounts/{account_id}/plan"
    page = admin.post(path, {"plan": key})
    assert page.status_code == 404 and "No plan named" in page.text
    assert key not in page.text and hint in page.text


def test_a_plan_name_of_dots_only_is_refused(dash: Gateway) -> None:
    """A plan named ``.`` or ``..`` was made, and then could not be edited: the browser reads
    /dashboard/admin/plans/.. as /dashboard/admin/, and PATCH /api/admin/plans/.. was a 404."""
    admin = make_user(dash, admin=True)
    for name in (".", "..", "...", "..\n"):
        page = admin.post("/dashboard/admin/plans", {"name": name})
        assert page.status_code == 400 and "not only dots" in page.text, (name, page.status_code)
    plans = {p["name"] for p in admin.api("GET", "/api/plans").json()["data"]}
    assert not {".", "..", "..."} & plans
    name = f"v1.{secrets.token_hex(2)}"
    assert admin.post("/dashboard/admin/plans", {"name": name}).status_code == 200
    patched = admin.api("PATCH", f"/api/admin/plans/{name}", json={"rpm": 5})
    assert patched.status_code == 200 and patched.json()["rpm"] == 5


def test_form_fields_are_checked_whole_not_clipped_first(dash: Gateway) -> None:
    """Fields were clipped before their check: a 65-character plan name was made as its
    first 64, a plan chosen by its first 64 characters, a limit of 21 digits read as its
    first 20, an expiry read without what followed its 20th character, and a sign-up's
    321-character email made the account of its first 320. Each is refused now."""
    admin = make_user(dash, admin=True)
    name = f"p{secrets.token_hex(4)}".ljust(64, "x")
    page = admin.post("/dashboard/admin/plans", {"name": name + "y"})
    assert page.status_code == 400 and "1-64 letters" in page.text, page.status_code
    plans = {p["name"] for p in admin.api("GET", "/api/plans").json()["data"]}
    assert name not in plans
    assert admin.post("/dashboard/admin/plans", {"name": name}).status_code == 200

    user = make_user(dash)
    account_id = user.api("GET", "/api/me").json()["id"]
    page = admin.post(f"/dashboard/admin/accounts/{account_id}/plan", {"plan": name + "y"})
    assert page.status_code == 404 and "No plan named" in page.text
    assert user.api("GET", "/api/me").json()["plan"] == "free"

    page = admin.post(f"/dashboard/admin/plans/{name}", {"rpm": "0" * 19 + "50"})
    assert page.status_code == 400 and "whole number" in page.text, page.status_code
    assert {p["name"]: p for p in admin.api("GET", "/api/plans").json()["data"]}[name][
        "rpm"
    ] is None

    form = {**form_of(user, "/dashboard/keys"), "name": "x", "expires_in": "1d" + " " * 18 + "x"}
    page = user.http.post(user.url("/dashboard/keys"), data=form, timeout=30)
    assert page.status_code == 400 and "Expiry must look like" in page.text
    assert count_keys(user) == 0

    http = requests.Session()
    email = "e" * 64 + "@" + (f"{secrets.token_hex(4)}." + "d" * 250)[:255]
    csrf = CSRF.search(http.get(dash.url + "/dashboard/signup", timeout=10).text)
    assert csrf and len(email) == 320
    password = "a walrus in a bowler hat"
    form = {"csrf_token": csrf.group(1), "email": email + "x", "password": password}
    form["password2"] = password
    made = http.post(dash.url + "/dashboard/signup", data=form, timeout=30)
    assert made.status_code == 400 and "not an email address" in made.text, made.status_code


def test_a_sign_up_the_default_plan_fails_is_logged_and_blames_the_server(
    upstream: Upstream, tmp_path: Path
) -> None:
    """The default plan gone since the start (serve refuses one that is not there): every
    sign-up said "We could not create an account with these details", and nothing was logged
    (found by QA)."""
    import asyncio

    import sqlalchemy as sa

    from chatgate.db.engine import create_engine
    from chatgate.settings import Settings

    plan = f"starter-{secrets.token_hex(3)}"
    gw = make_gateway(tmp_path, upstream=upstream, extra_env={"CHATGATE_DEFAULT_PLAN": plan})
    gw.cli("migrate")
    gw.cli("plans", "create", plan)
    gw.start()

    async def rename() -> None:  # as gone as a plan gets: none is ever deleted
        engine = create_engine(Settings.from_env(gw.env))
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(f"UPDATE plans SET name = 'x{plan}' WHERE name = '{plan}'")
                )
        finally:
            await engine.dispose()

    try:
        asyncio.run(rename())
        http = requests.Session()
        csrf = CSRF.search(http.get(gw.url + "/dashboard/signup", timeout=10).text)
        assert csrf
        good = "a walrus in a bowler hat"
        form = {
            "csrf_token": csrf.group(1),
            "email": f"new-{secrets.token_hex(4)}@example.com",
            "password": good,
            "password2": good,
        }
        resp = http.post(gw.url + "/dashboard/signup", data=form, timeout=30)
        assert resp.status_code == 500, resp.status_code
        assert "problem on our side" in resp.text and "with these details" not in resp.text
    finally:
        gw.stop()
    assert f"sign-up failed: the default plan '{plan}' (CHATGATE_DEFAULT_PLAN) is gone" in gw.logs()


def test_a_refused_admin_form_links_back_to_its_page(dash: Gateway) -> None:
    """QA: a plan named ``free`` (taken) or ``...`` answered a "Not possible" page whose one
    link went to the dashboard's front page, away from the Plans page and its form."""
    admin = make_user(dash, admin=True)
    plans = admin.url("/dashboard/admin/plans")
    refused = admin.post("/dashboard/admin/plans", {"name": "free"}, headers={"Referer": plans})
    assert refused.status_code in (400, 409), refused.status_code
    assert 'href="/dashboard/admin/plans" data-back' in refused.text, refused.text[-1500:]
    elsewhere = admin.post(  # a Referer of another site is no page to go back to
        "/dashboard/admin/plans", {"name": "free"}, headers={"Referer": "http://evil/x"}
    )
    assert "data-back" not in elsewhere.text and 'href="/dashboard/"' in elsewhere.text
