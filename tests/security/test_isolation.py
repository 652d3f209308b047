"""Cross-account isolation (OWASP API1, BOLA): account B walks every endpoint that takes an id
with account A's ids, by key and by dashboard session. Always 404 (or an empty result for a
filter), never A's data, and nothing of A's changes. Non-admins never reach admin operations.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.helpers import Gateway
from tests.security.conftest import CHAT, call, new_account, new_key

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
PRIVATE = "private-" + secrets.token_hex(6)  # A's words: must never reach B


@dataclass
class Owner:
    """Account A and the ids of everything it has."""

    email: str
    account_id: str
    key: str
    key_id: str
    other_key_id: str
    conversation: str
    item: str
    response: str


@pytest.fixture(scope="module")
def alice(sec: Gateway) -> Owner:
    email = new_account(sec)
    issued = new_key(sec, email)
    other = new_key(sec, email)
    auth = {"Authorization": f"Bearer {issued['key']}"}
    conv = requests.post(
        sec.url + "/v1/conversations",
        headers=auth,
        json={"items": [{"role": "user", "content": PRIVATE}]},
        timeout=30,
    ).json()
    items = requests.get(
        sec.url + f"/v1/conversations/{conv['id']}/items", headers=auth, timeout=30
    ).json()
    resp = requests.post(
        sec.url + "/v1/responses",
        headers=auth,
        json={"model": "gpt-test", "input": PRIVATE},
        timeout=30,
    ).json()
    chat = {**CHAT, "messages": [{"role": "user", "content": PRIVATE}]}
    assert call(sec, "POST", "/v1/chat/completions", issued["key"], json=chat).status_code == 200
    account_id = next(a["id"] for a in sec.cli_json("accounts", "list") if a["email"] == email)
    return Owner(
        email,
        account_id,
        issued["key"],
        issued["id"],
        other["id"],
        conv["id"],
        items["data"][0]["id"],
        resp["id"],
    )


@pytest.fixture(scope="module")
def bob_key(sec: Gateway) -> str:
    return str(new_key(sec, new_account(sec))["key"])


@pytest.fixture(scope="module")
def bob_session(sec: Gateway) -> tuple[requests.Session, str]:
    """B signed up on the dashboard: a session cookie, and its CSRF token for /api/*."""
    http = requests.Session()
    page = http.get(sec.url + "/dashboard/signup", timeout=30)
    token = CSRF.search(page.text)
    assert token, page.status_code
    password = "bob password " + secrets.token_hex(4)
    email = f"bob-{secrets.token_hex(4)}@example.com"
    http.post(
        sec.url + "/dashboard/signup",
        data={
            "csrf_token": token.group(1),
            "email": email,
            "password": password,
            "password2": password,
        },
        timeout=30,
    )
    me = http.get(sec.url + "/api/me", timeout=30)
    assert me.status_code == 200, me.text
    return http, me.json()["csrf_token"]


def id_routes(a: Owner) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, path, JSON body) of every route that names one of A's things."""
    conv, item, resp = a.conversation, a.item, a.response
    return [
        ("GET", f"/api/keys/{a.key_id}", None),
        ("POST", f"/api/keys/{a.key_id}/rotate", {"grace": "0"}),
        ("POST", f"/api/keys/{a.key_id}/revoke", None),
        ("GET", f"/api/keys/{a.other_key_id}", None),
        ("GET", f"/v1/conversations/{conv}", None),
        ("POST", f"/v1/conversations/{conv}", {"metadata": {"x": "y"}}),
        ("GET", f"/v1/conversations/{conv}/items", None),
        ("POST", f"/v1/conversations/{conv}/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", f"/v1/conversations/{conv}/items/{item}", None),
        ("DELETE", f"/v1/conversations/{conv}/items/{item}", None),
        ("DELETE", f"/v1/conversations/{conv}", None),
        ("GET", f"/v1/responses/{resp}", None),
        ("GET", f"/v1/responses/{resp}/input_items", None),
        ("DELETE", f"/v1/responses/{resp}", None),
        (
            "POST",
            "/v1/responses",
            {"model": "gpt-test", "input": "x", "previous_response_id": resp},
        ),
        ("POST", "/v1/responses", {"model": "gpt-test", "input": "x", "conversation": conv}),
        ("POST", "/v1/chat/completions", {**CHAT, "conversation": conv}),
    ]


def admin_routes(a: Owner) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", "/api/admin/accounts", None),
        ("GET", f"/api/admin/accounts?q={a.email}", None),
        ("POST", f"/api/admin/accounts/{a.account_id}/plan", {"plan": "free"}),
        ("POST", f"/api/admin/accounts/{a.account_id}/disable", {"disabled": True}),
        ("PATCH", "/api/admin/plans/free", {"rpm": 1}),
        ("GET", "/api/admin/backends", None),
    ]


def assert_no_data(resp: requests.Response, a: Owner) -> None:
    text = resp.text
    for secret in (PRIVATE, a.email, a.account_id, a.key, "echo:"):
        assert secret not in text, (resp.request.method, resp.url, resp.status_code, text[:300])


def assert_not_found(resp: requests.Response, a: Owner, what: str) -> None:
    """What an id that does not exist gets: a 404, or for a ``previous_response_id``, OpenAI's
    400 ``previous_response_not_found``."""
    sent = resp.request.body or b""
    if b'"previous_response_id"' in (sent if isinstance(sent, bytes) else sent.encode()):
        assert resp.status_code == 400, (what, resp.status_code, resp.text[:300])
        assert resp.json()["error"]["code"] == "previous_response_not_found", what
    else:
        assert resp.status_code == 404, (what, resp.status_code, resp.text[:300])
    assert_no_data(resp, a)


def alice_is_intact(sec: Gateway, a: Owner) -> None:
    auth = {"Authorization": f"Bearer {a.key}"}
    assert call(sec, "POST", "/v1/chat/completions", a.key, json=CHAT).status_code == 200
    conv = requests.get(sec.url + f"/v1/conversations/{a.conversation}", headers=auth, timeout=30)
    assert conv.status_code == 200 and conv.json().get("metadata") in (None, {})
    items = requests.get(
        sec.url + f"/v1/conversations/{a.conversation}/items", headers=auth, timeout=30
    ).json()
    assert [i["id"] for i in items["data"]] == [a.item]
    assert requests.get(sec.url + f"/v1/responses/{a.response}", headers=auth, timeout=30).ok
    keys = {k["id"]: k for k in sec.cli_json("keys", "list", "--account", a.email)}
    assert keys[a.key_id]["status"] == "active" and keys[a.key_id]["rotated_at"] is None
    account = next(x for x in sec.cli_json("accounts", "list") if x["id"] == a.account_id)
    assert account["plan"] == "enterprise" and not account["disabled"]
    free = next(p for p in sec.cli_json("plans", "list") if p["name"] == "free")
    assert free["rpm"] != 1


def test_other_accounts_ids_are_404_by_key(sec: Gateway, alice: Owner, bob_key: str) -> None:
    for method, path, body in id_routes(alice):
        resp = call(sec, method, path, bob_key, json=body)
        assert_not_found(resp, alice, f"{method} {path}")
    alice_is_intact(sec, alice)


def test_other_accounts_ids_are_404_by_session(
    sec: Gateway, alice: Owner, bob_session: tuple[requests.Session, str]
) -> None:
    http, csrf = bob_session
    for method, path, body in id_routes(alice):
        if not path.startswith("/api/"):
            continue  # /v1 takes keys only
        resp = http.request(
            method, sec.url + path, json=body, headers={"X-CSRF-Token": csrf}, timeout=30
        )
        assert_not_found(resp, alice, f"{method} {path} (session)")
    for action in ("rotate", "revoke"):
        page = f"/dashboard/keys/{alice.key_id}/{action}"
        assert_not_found(http.get(sec.url + page, timeout=30), alice, page)
        posted = http.post(sec.url + page, data={"csrf_token": csrf, "grace": "0"}, timeout=30)
        assert posted.status_code in (403, 404), (page, posted.status_code)
        assert_no_data(posted, alice)
    alice_is_intact(sec, alice)


def _usage(gw: Gateway, key: str, path: str, **query: str) -> requests.Response:
    since = str(int(time.time()) - 86400)
    return call(gw, "GET", path, key, params={"start_time": since, "bucket_width": "1d", **query})


def _results(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text[:300]
    return [r for bucket in resp.json()["data"] for r in bucket["results"]]


def test_usage_filters_with_other_accounts_ids_are_empty(
    sec: Gateway, alice: Owner, bob_key: str
) -> None:
    path = "/v1/organization/usage/completions"
    deadline = time.monotonic() + 15  # usage is written in the background, ~1 s batches
    while not _results(_usage(sec, alice.key, path, api_key_ids=alice.key_id)):
        assert time.monotonic() < deadline, "A's usage never showed up"
        time.sleep(0.3)
    now = str(int(time.time()) + 60)
    for query in (
        {"api_key_ids": alice.key_id},
        {"api_key_ids": f"{alice.key_id},{alice.other_key_id}", "group_by": "api_key_id"},
        {"group_by": "api_key_id,model"},
        {"models": "gpt-test", "end_time": now},
    ):
        for usage_path in (path, "/v1/organization/usage/embeddings"):
            resp = _usage(sec, bob_key, usage_path, **query)
            assert _results(resp) == [], (usage_path, query, resp.text[:300])
            assert_no_data(resp, alice)
    dashboard = call(sec, "GET", "/api/usage", bob_key, params={"api_key_id": alice.key_id})
    assert dashboard.status_code == 200 and dashboard.json()["data"] == []
    assert_no_data(dashboard, alice)
    other = call(sec, "GET", "/api/usage", bob_key, params={"account_id": alice.account_id})
    assert other.status_code in (403, 404)  # the same answer for any id but one's own
    assert_no_data(other, alice)


def test_non_admins_never_reach_admin_operations(
    sec: Gateway,
    alice: Owner,
    bob_key: str,
    bob_session: tuple[requests.Session, str],
) -> None:
    http, csrf = bob_session
    for method, path, body in admin_routes(alice):
        by_key = call(sec, method, path, bob_key, json=body)
        assert_not_found(by_key, alice, f"{method} {path}")
        assert by_key.json()["error"]["code"] == "unknown_url"  # the same as no such URL
        if path != "/api/admin/backends":  # key-only route
            by_session = http.request(
                method, sec.url + path, json=body, headers={"X-CSRF-Token": csrf}, timeout=30
            )
            assert_not_found(by_session, alice, f"{method} {path} (session)")
        anonymous = call(sec, method, path, None, json=body)
        assert anonymous.status_code == 401
    for page in ("/dashboard/admin/accounts", "/dashboard/admin/plans", "/dashboard/admin/usage"):
        resp = http.get(sec.url + page, timeout=30, allow_redirects=False)
        assert resp.status_code in (403, 404), (page, resp.status_code)
        assert_no_data(resp, alice)
    alice_is_intact(sec, alice)


def test_admins_do_reach_them(sec: Gateway, sec_admin: str, alice: Owner) -> None:
    """The control: the same routes answer an admin, so the 404s above are the checks'."""
    found = call(sec, "GET", "/api/admin/accounts", sec_admin, params={"q": alice.email})
    assert found.status_code == 200 and [a["id"] for a in found.json()["data"]] == [
        alice.account_id
    ]
    assert call(sec, "GET", "/api/admin/backends", sec_admin).status_code == 200
