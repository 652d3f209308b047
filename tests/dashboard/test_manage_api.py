"""The JSON management API (/api/*) against the real server, with keys and with a session."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import requests

from chatgate.accounts import LIMIT_FIELDS, AccountStore
from chatgate.db.engine import create_engine
from chatgate.keys import format as keyfmt
from chatgate.settings import Settings
from tests.dashboard.conftest import admin_key, chat, make_user
from tests.dashboard.test_security import wait_status
from tests.helpers import Gateway, Upstream, make_gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_lifecycle_with_a_bearer_key(dash: Gateway) -> None:
    user = make_user(dash)
    first = user.new_key(name="bootstrap")
    h = bearer(first["key"])
    me = requests.get(dash.url + "/api/me", headers=h, timeout=10).json()
    assert me["email"] == user.email and me["auth"] == "key" and "csrf_token" not in me
    assert me["plan_limits"]["name"] == "free"

    resp = requests.post(
        dash.url + "/api/keys",
        json={"name": "ci", "expires_in": "30d", "models": ["gpt-test"]},
        headers=h,
        timeout=10,
    )
    assert resp.status_code == 201
    assert resp.headers["Cache-Control"] == "no-store"
    made = resp.json()
    assert keyfmt.is_well_formed(made["key"])
    assert made["hint"] == keyfmt.hint(made["key"])
    assert made["models"] == ["gpt-test"]
    assert made["expires_at"] - time.time() > 29 * 86400
    assert chat(dash, made["key"]).status_code == 200
    assert chat(dash, made["key"], model="gpt-other").status_code == 404  # as an unknown model

    listed = requests.get(dash.url + "/api/keys", headers=h, timeout=10).json()
    assert listed["object"] == "list"
    assert {k["name"] for k in listed["data"]} == {"bootstrap", "ci"}
    assert all("key" not in k for k in listed["data"])
    got = requests.get(dash.url + f"/api/keys/{made['id']}", headers=h, timeout=10).json()
    assert got["status"] == "active" and "key" not in got
    # Used a moment ago: not "never" (the stamps reach the database every 10 s).
    [used] = [k for k in listed["data"] if k["id"] == made["id"]]
    assert used["last_used_at"] is not None and used["last_used_at"] >= made["created_at"]
    assert got["last_used_at"] == used["last_used_at"]

    rotated = requests.post(
        dash.url + f"/api/keys/{made['id']}/rotate", json={"grace": "1h"}, headers=h, timeout=10
    ).json()
    assert rotated["id"] == made["id"] and rotated["key"] != made["key"]
    assert chat(dash, rotated["key"]).status_code == 200
    assert chat(dash, made["key"]).status_code == 200  # in its grace hour

    revoked = requests.post(dash.url + f"/api/keys/{made['id']}/revoke", headers=h, timeout=10)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert wait_status(dash, rotated["key"], 401) == 401
    assert wait_status(dash, made["key"], 401) == 401


def test_bad_input_is_a_400_naming_the_field(dash: Gateway) -> None:
    user = make_user(dash)
    for body, param in (
        ({"models": ["no-such-model"]}, "models"),
        ({"models": "gpt-test"}, "models"),
        # Only blank names: a 201 with every model (QA), the restriction gone unsaid.
        ({"models": [""]}, "models"),
        ({"models": ["  ", ""]}, "models"),
        ({"expires_in": "soon"}, "expires_in"),
        # A key expiring as it is made (it was a 201: a key that failed its first call).
        ({"expires_in": "0d"}, "expires_in"),
        ({"expires_in": "0s"}, "expires_in"),
        ({"name": "x" * 201}, "name"),
        # JSON types a limit (the form parser read "10" as 10, "" as none) and a misspelt one
        # is refused (it made a key without the limit it meant).
        ({"rpm": "10"}, "rpm"),
        ({"rpm": ""}, "rpm"),
        ({"tpm": True}, "tpm"),
        ({"rmp": 5}, "rmp"),
    ):
        resp = user.api("POST", "/api/keys", json=body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]["param"] == param
    assert user.api("GET", "/api/keys").json()["data"] == []
    key_id = user.new_key()["id"]
    resp = user.api("POST", f"/api/keys/{key_id}/rotate", json={"grace": "forever"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "grace"
    resp = user.api(
        "POST", "/api/keys", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_plans_and_admin_api(dash: Gateway) -> None:
    user = make_user(dash)
    plans = user.api("GET", "/api/plans").json()["data"]
    assert {"free", "pro", "enterprise"} <= {p["name"] for p in plans}
    h = bearer(admin_key(dash))
    account_id = user.api("GET", "/api/me").json()["id"]

    resp = requests.post(
        dash.url + f"/api/admin/accounts/{account_id}/plan",
        json={"plan": "pro"},
        headers=h,
        timeout=10,
    )
    assert resp.status_code == 200 and resp.json()["plan"] == "pro"
    assert user.api("GET", "/api/me").json()["plan"] == "pro"
    resp = requests.post(
        dash.url + f"/api/admin/accounts/{account_id}/plan",
        json={"plan": "nope"},
        headers=h,
        timeout=10,
    )
    assert resp.status_code == 404

    name = "plan" + str(int(time.time() * 1000) % 100000)
    dash.cli("plans", "create", name, "--rpm", "5")
    resp = requests.patch(
        dash.url + f"/api/admin/plans/{name}",
        json={"rpm": 7, "monthly_tokens": None, "tpm": 1000},
        headers=h,
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.json()["rpm"] == 7 and resp.json()["tpm"] == 1000
    resp = requests.patch(
        dash.url + f"/api/admin/plans/{name}", json={"rpm": -1}, headers=h, timeout=10
    )
    assert resp.status_code == 400
    resp = requests.patch(
        dash.url + f"/api/admin/plans/{name}", json={"bogus": 1}, headers=h, timeout=10
    )
    assert resp.status_code == 400
    resp = requests.patch(  # a string is not a number in JSON (it was read as 25)
        dash.url + f"/api/admin/plans/{name}", json={"rpm": "25"}, headers=h, timeout=10
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "rpm"

    me = requests.get(dash.url + "/api/me", headers=h, timeout=10).json()
    resp = requests.post(
        dash.url + f"/api/admin/accounts/{me['id']}/disable",
        json={"disabled": True},
        headers=h,
        timeout=10,
    )
    assert resp.status_code == 400  # not yourself


def _create_accounts(gw: Gateway, emails: list[str]) -> None:
    """Many accounts at once, straight into the database (the CLI is a process each)."""

    async def go() -> None:
        engine = create_engine(Settings.from_env(gw.env))
        try:
            store = AccountStore(engine)
            for email in emails:
                await store.create(email)
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_admin_accounts_say_when_more_match(dash: Gateway) -> None:
    """The accounts page and /api/admin/accounts show the newest 100 matches; past 100 they
    said nothing (an operator saw 100 accounts and took them for all); now the page says
    more match and to narrow the search, and the API answers ``has_more``."""
    admin = make_user(dash, admin=True)
    tag = f"many-{secrets.token_hex(4)}"
    _create_accounts(dash, [f"{tag}-{i:03}@example.com" for i in range(101)])
    page = admin.http.get(admin.url(f"/dashboard/admin/accounts?q={tag}"), timeout=10).text
    assert page.count(f'aria-label="Plan of {tag}-') == 100  # one a row
    assert "More accounts match" in page
    found = requests.get(
        dash.url + f"/api/admin/accounts?q={tag}", headers=bearer(admin_key(dash)), timeout=10
    ).json()
    assert len(found["data"]) == 100 and found["has_more"] is True
    few = admin.http.get(admin.url(f"/dashboard/admin/accounts?q={tag}-01"), timeout=10).text
    assert "More accounts match" not in few
    found = requests.get(
        dash.url + f"/api/admin/accounts?q={tag}-01", headers=bearer(admin_key(dash)), timeout=10
    ).json()
    assert len(found["data"]) == 10 and found["has_more"] is False


def test_numbers_beyond_their_column_are_400_naming_the_field(dash: Gateway) -> None:
    """Each was a 500 (OverflowError: Python int too large to convert to SQLite INTEGER)."""
    user = make_user(dash)
    for expiry in ("9" * 20 + "d", "100000000000d", "36501d"):
        resp = user.api("POST", "/api/keys", json={"name": "x", "expires_in": expiry})
        assert resp.status_code == 400, (expiry, resp.text)
        assert resp.json()["error"]["param"] == "expires_in"
    made = user.new_key(expires_in="36500d")  # 100 years is the most
    assert made["expires_at"] - time.time() > 36499 * 86400

    h = bearer(admin_key(dash))
    name = "big" + str(int(time.time() * 1000) % 100000)
    dash.cli("plans", "create", name)
    url = dash.url + f"/api/admin/plans/{name}"
    for limits in (
        {"rpm": 2**63},
        {"rpm": "9" * 30},
        {"tpm": 2**31},  # INTEGER columns are 32 bits on PostgreSQL
        {"monthly_tokens": 2**63},
        {"rpd": "\u00b2"},  # a digit to str.isdigit, not to int()
    ):
        resp = requests.patch(url, json=limits, headers=h, timeout=10)
        assert resp.status_code == 400, (limits, resp.text)
        error = resp.json()["error"]
        assert error["param"] == next(iter(limits)) and error["type"] == "invalid_request_error"
    most = {"rpm": 2**31 - 1, "monthly_tokens": 2**63 - 1}
    resp = requests.patch(url, json=most, headers=h, timeout=10)
    assert resp.status_code == 200 and resp.json()["monthly_tokens"] == 2**63 - 1


def test_openapi_documents_the_management_api(dash: Gateway) -> None:
    doc = requests.get(dash.url + "/openapi.json", timeout=10).json()
    for path in (
        "/api/me",
        "/api/keys",
        "/api/keys/{id}",
        "/api/keys/{id}/rotate",
        "/api/keys/{id}/revoke",
        "/api/plans",
        "/api/admin/accounts",
        "/api/admin/accounts/{id}/plan",
        "/api/admin/accounts/{id}/disable",
        "/api/admin/plans/{name}",
    ):
        assert path in doc["paths"], path
    assert doc["paths"]["/api/keys"]["post"]["operationId"] == "createKey"
    assert doc["paths"]["/api/admin/plans/{name}"]["patch"]["security"]
    assert "sessionCookie" in doc["components"]["securitySchemes"]
    assert "/v1/chat/completions" in doc["paths"]
    # Every field a key record has is documented (QA: rotation_period, rotation_due_at and
    # rotation_due were not), and every query /api/usage reads (since, api_key_id, model).
    record = make_user(dash).new_key()
    getter = doc["paths"]["/api/keys/{id}"]["get"]["responses"]["200"]["content"]
    schema = getter["application/json"]["schema"]
    documented = set(schema["properties"])
    assert set(record) - {"key", "grace_cut_short"} <= documented, set(record) - documented
    queries = {p["name"] for p in doc["paths"]["/api/usage"]["get"]["parameters"]}
    assert {"since", "start_time", "end_time", "api_key_id", "model", "account_id"} <= queries


def test_a_narrow_key_cannot_mint_a_broader_one(dash: Gateway) -> None:
    """A key limited by models, an expiry or any limit of its own makes no key and rotates
    none: with rpm=1, monthly_tokens=10 and a budget of 1 cent, a key made a key without
    limits that served chat freely (and "no looser" keys would add up: 100 keys of 1 cent)."""
    user = make_user(dash)
    wide = user.new_key(name="wide")
    limited = [user.new_key(**{f: 1}) for f in LIMIT_FIELDS]
    both = user.new_key(rpm=1, monthly_tokens=10, monthly_budget_cents=1)
    narrows = (user.new_key(models=["gpt-test"]), user.new_key(expires_in="1d"), *limited, both)
    for narrow in narrows:
        h = bearer(narrow["key"])
        resp = requests.post(
            dash.url + "/api/keys", json={"name": "escalate"}, headers=h, timeout=10
        )
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
        same = {f: narrow[f] for f in LIMIT_FIELDS if narrow[f] is not None}
        resp = requests.post(
            dash.url + "/api/keys", json={"name": "as narrow", **same}, headers=h, timeout=10
        )
        assert resp.status_code == 403, (same, resp.status_code)
        for target in (wide["id"], narrow["id"]):
            resp = requests.post(dash.url + f"/api/keys/{target}/rotate", headers=h, timeout=10)
            assert resp.status_code == 403
        assert requests.get(dash.url + "/api/keys", headers=h, timeout=10).status_code == 200
    assert chat(dash, wide["key"]).status_code == 200  # not rotated away
    listed = user.api("GET", "/api/keys").json()["data"]
    assert not {k["name"] for k in listed} & {"escalate", "as narrow"}
    assert all(k["rotated_at"] is None for k in listed)  # nor was a narrow key


def test_a_replaced_secret_in_its_grace_cannot_manage_keys(dash: Gateway) -> None:
    """A rotated key's old secret (the one that leaked, say) keeps working for API calls in its
    grace period, but cannot take the key back, mint keys or revoke: that needs the current
    secret or the dashboard."""
    user = make_user(dash)
    victim = user.new_key(name="victim")
    other = user.new_key(name="other")
    resp = user.api("POST", f"/api/keys/{victim['id']}/rotate", json={"grace": "1h"})
    assert resp.status_code == 200
    current = resp.json()["key"]
    old = bearer(victim["key"])
    assert wait_status(dash, victim["key"], 200) == 200  # in its grace hour

    for method, path, body in (
        ("POST", f"/api/keys/{victim['id']}/rotate", {"grace": "0"}),
        ("POST", "/api/keys", {"name": "backdoor"}),
        ("POST", f"/api/keys/{other['id']}/revoke", None),
        ("POST", f"/api/keys/{victim['id']}/revoke", None),
        ("GET", "/api/keys", None),
        ("GET", "/api/me", None),
    ):
        resp = requests.request(method, dash.url + path, json=body, headers=old, timeout=10)
        assert resp.status_code == 403, (path, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "current_key_required"
        assert "current" in error["message"] and victim["key"] not in resp.text

    names = {k["name"] for k in user.api("GET", "/api/keys").json()["data"]}
    assert names == {"victim", "other"}  # nothing minted
    assert all(k["status"] == "active" for k in user.api("GET", "/api/keys").json()["data"])
    assert chat(dash, current).status_code == 200  # the owner's new secret: not rotated away
    assert chat(dash, victim["key"]).status_code == 200  # the old one: still in its grace
    # The current secret manages the key as before.
    resp = requests.post(
        dash.url + f"/api/keys/{victim['id']}/rotate",
        json={"grace": "0"},
        headers=bearer(current),
        timeout=10,
    )
    assert resp.status_code == 200
    assert wait_status(dash, victim["key"], 401) == 401
    assert wait_status(dash, current, 401) == 401
    assert chat(dash, resp.json()["key"]).status_code == 200


def test_an_admin_url_asked_with_another_method_tells_only_an_admin_it_exists(
    dash: Gateway,
) -> None:
    """aiohttp's method check ran before the caller was known: a 405 told anyone, with or
    without a key, which admin routes exist (an unknown one is a 404). Now the caller comes
    first: 401 without credentials, the unknown URL's 404 for a user, the 405 for an admin."""
    user = make_user(dash)
    user_key = user.new_key(name="plain")["key"]
    admin = admin_key(dash)
    for method, path, allow in (
        ("GET", "/api/admin/accounts/acct_x/disable", "POST"),
        ("GET", "/api/admin/accounts/acct_x/plan", "POST"),
        ("GET", "/api/admin/plans/free", "PATCH"),
        ("DELETE", "/api/admin/accounts", "GET, HEAD"),
        ("POST", "/api/admin/backends", "GET, HEAD"),
    ):
        url = dash.url + path
        unknown = requests.request(method, dash.url + "/api/admin/nothing", timeout=10)
        assert requests.request(method, url, timeout=10).status_code == 401, path
        as_user = requests.request(method, url, headers=bearer(user_key), timeout=10)
        assert as_user.status_code == 404, (path, as_user.text)
        assert as_user.json() == unknown.json()
        # Logged in, without the CSRF header: the CSRF refusal (403) told of the route too.
        as_session = user.http.request(method, url, timeout=10)
        assert as_session.status_code == 404, path
        as_admin = requests.request(method, url, headers=bearer(admin), timeout=10)
        assert as_admin.status_code == 405, (path, as_admin.text)
        assert as_admin.json()["error"]["code"] == "method_not_allowed"
        assert as_admin.headers["allow"] == allow, path  # RFC 9110 (QA: none)


def test_a_secret_rotated_or_revoked_here_is_refused_here_at_once(
    upstream: Upstream, tmp_path: Path
) -> None:
    """QA (no Redis): a key's rotation or revocation reached the cache of the process that
    made it only at the feed's next poll (0.25 s), and in that window the secret just replaced
    or revoked still counted as current: it rotated the key away from its owner, or minted a
    new key. The process that commits a key's change now applies it at once. (The poll is
    set to a minute here, so that only that can explain a refusal.)"""
    env = {"CHATGATE_INVALIDATION_POLL": "60", "CHATGATE_KEY_CACHE_TTL": "60"}
    gw = make_gateway(tmp_path / "gw", upstream=upstream, extra_env=env).start()
    try:
        gw.cli("accounts", "create", "owner@example.com")
        made = gw.cli_json("keys", "create", "--account", "owner@example.com", "--name", "k")
        leaked = bearer(made["key"])
        assert requests.get(gw.url + "/api/me", headers=leaked, timeout=10).status_code == 200
        rotated = requests.post(
            gw.url + f"/api/keys/{made['id']}/rotate", json={"grace": "0"}, headers=leaked
        )
        assert rotated.status_code == 200
        owner = bearer(rotated.json()["key"])
        again = requests.post(
            gw.url + f"/api/keys/{made['id']}/rotate", json={"grace": "0"}, headers=leaked
        )
        assert again.status_code == 401, again.text  # it was 200: the owner's secret gone
        assert requests.get(gw.url + "/api/me", headers=owner, timeout=10).status_code == 200

        minted = requests.post(gw.url + "/api/keys", json={"name": "m"}, headers=owner).json()
        doomed = bearer(minted["key"])
        assert requests.get(gw.url + "/api/me", headers=doomed, timeout=10).status_code == 200
        revoke = requests.post(gw.url + f"/api/keys/{minted['id']}/revoke", headers=owner)
        assert revoke.status_code == 200
        backdoor = requests.post(gw.url + "/api/keys", json={"name": "b"}, headers=doomed)
        assert backdoor.status_code == 401, backdoor.text  # it was 201
    finally:
        gw.stop()


def test_admin_and_usage_routes_take_what_the_other_management_routes_take(
    dash: Gateway,
) -> None:
    """QA: ``{"disable": false}`` (a typo of ``disabled``) disabled the account, the body's
    default; ``/api/admin/backends`` took a replaced secret in its grace (the other routes say
    403 ``current_key_required``) and refused the dashboard's session, as ``/api/usage`` did.
    Now every ``/api/*`` body refuses a field it does not have, and these two routes answer
    the caller the other management routes answer."""
    admin = make_user(dash, admin=True)
    target = make_user(dash)
    account_id = admin.api("GET", "/api/admin/accounts", params={"q": target.email}).json()["data"][
        0
    ]["id"]
    for path, body, field in (
        (f"/api/admin/accounts/{account_id}/disable", {"disable": False}, "disable"),
        (f"/api/admin/accounts/{account_id}/plan", {"plan": "pro", "palns": "x"}, "palns"),
        ("/api/keys/key_0/rotate", {"grase": "1h"}, "grase"),
    ):
        refused = admin.api("POST", path, json=body)
        assert refused.status_code == 400, (path, refused.text)
        assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (
            "unknown_parameter",
            field,
        )
    assert target.http.get(target.url("/dashboard/"), timeout=10).status_code == 200  # enabled
    assert admin.api("GET", "/api/admin/backends").status_code == 200  # the session
    assert target.api("GET", "/api/admin/backends").status_code == 404  # not an admin
    usage = target.api("GET", "/api/usage")
    assert usage.status_code == 200 and usage.json()["object"] == "usage.report"

    made = admin.new_key(name="to rotate")
    rotated = admin.api("POST", f"/api/keys/{made['id']}/rotate", json={"grace": "1h"})
    assert rotated.status_code == 200
    assert wait_status(dash, made["key"], 200) == 200  # the old secret, in its grace
    for path in ("/api/admin/backends", "/api/usage"):
        old = requests.get(dash.url + path, headers=bearer(made["key"]), timeout=10)
        assert old.status_code == 403, (path, old.text)
        assert old.json()["error"]["code"] == "current_key_required"
        current = requests.get(dash.url + path, headers=bearer(rotated.json()["key"]), timeout=10)
        assert current.status_code == 200, (path, current.text)

    def usage(**params: int) -> requests.Response:
        return target.http.get(target.url("/api/usage"), params=params, timeout=10)

    at_zero = usage(start_time=0, end_time=0)  # 0 is a time, not "now"
    assert at_zero.status_code == 400 and at_zero.json()["error"]["param"] == "end_time"
    ahead = usage(start_time=int(time.time()) + 3600)
    assert ahead.status_code == 400 and ahead.json()["error"]["param"] == "start_time"


def test_an_account_search_for_a_nul_is_refused_on_every_database(dash: Gateway) -> None:
    """QA: on SQLite ``GET /api/admin/accounts?q=%00`` listed every account (LIKE's pattern
    ends at the NUL); PostgreSQL refused it. The same 400 on both now."""
    admin = make_user(dash, admin=True)
    refused = admin.api("GET", "/api/admin/accounts", params={"q": "a\x00"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_text"
