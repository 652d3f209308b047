"""Secret hygiene: a full scenario against a real server logging at DEBUG (PostgreSQL + Redis,
the scale-out set-up, so every driver logs too), then a search for every secret it handled.

Secrets searched for: every API key issued (the admin key included), the upstream key, the
``CHATGATE_SECRET`` value, dashboard passwords (right and wrong ones) and session cookies.
Places searched: the server's log (stdout + stderr), ``/metrics``, every response body the
scenario received (error bodies included), and every CLI output.

Allowed, by design, and nothing else:
- the one line of the first start that prints the admin key (``export CHATGATE_API_KEY=...``):
  the server writes it to stdout once, for the operator who just installed it, and never
  logs it (``chatgate/server.py``). That exact line is removed before the log is searched,
  and the key must appear nowhere else;
- the key in the answer that creates or rotates it ("shown once": ``keys create/rotate``
  output, ``POST /api/keys``, ``POST /api/keys/{id}/rotate``), only in that answer;
- the session cookie in the ``Set-Cookie`` header that sets it (headers are not bodies).

Also here: a unit check that the code paths comparing secrets use ``hmac.compare_digest``
or a hash lookup, never a plain ``==``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from chatgate.keys import format as keyfmt
from tests.helpers import (
    REDIS_URL,
    ROOT,
    Gateway,
    Upstream,
    create_pg_database,
    drop_pg_database,
    drop_redis_prefix,
    make_gateway,
)
from tests.security.conftest import admin_key

PASSWORD = "hygiene test " + secrets.token_hex(6)
WRONG_PASSWORD = "not the password " + secrets.token_hex(6)
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Leaky:
    """An upstream that echoes the Authorization header it got in its error messages, as
    some providers do (``Incorrect API key provided: sk-...``): the gateway must not relay it."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        status = int(str(body.get("model", "x-500")).rsplit("-", 1)[1])
        said = f"Incorrect API key provided: {request.headers.get('Authorization')}"
        return web.json_response(
            {"error": {"message": said, "type": "invalid_request_error", "code": said}},
            status=status,
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._chat)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> Leaky:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Recorder:
    """Every HTTP answer and CLI output of the scenario, with the ones allowed to hold a key."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.bodies: list[tuple[str, str]] = []  # (what, text) that must hold no secret
        self.shown_once: list[str] = []  # create/rotate answers: may hold their own key
        self.keys: list[str] = []
        self.cookies: list[str] = []

    def http(
        self, method: str, path: str, *, shown_once: bool = False, **kw: Any
    ) -> requests.Response:
        session = kw.pop("session", None) or requests
        resp: requests.Response = session.request(method, self.gw.url + path, timeout=30, **kw)
        # Headers count too, except the Set-Cookie that sets a session (its one job).
        headers = "".join(
            f"{k}: {v}\n"
            for r in [*resp.history, resp]
            for k, v in r.headers.items()
            if k.lower() != "set-cookie"
        )
        text = headers + resp.content.decode(errors="replace")
        if shown_once:
            self.shown_once.append(text)
        else:
            self.bodies.append((f"{method} {path} -> {resp.status_code}", text))
        cookie = resp.cookies.get("chatgate_session")
        if cookie:
            self.cookies.append(cookie)
        return resp

    def cli(self, *args: str, shown_once: bool = False, check: bool = True) -> str:
        result = self.gw.cli(*args, check=check)
        out = result.stdout + result.stderr
        if shown_once:
            self.shown_once.append(out)
        else:
            self.bodies.append(("chatgate " + " ".join(args), out))
        return result.stdout

    def issue(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli(*args, "--json", shown_once=True))
        self.keys.append(data["key"])
        return data


@pytest.fixture(scope="module")
def leaky() -> Iterator[Leaky]:
    server = Leaky().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hygiene_gw(
    upstream: Upstream, leaky: Leaky, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    url = create_pg_database()
    extra = f"""
[[models]]
name = "gpt-fail"
base_url = "{upstream.base_url}"
upstream_model = "fail-500"
api_key_env = "FAKE_UPSTREAM_KEY"
"""
    for status in (400, 401, 404, 429, 500):
        extra += f"""
[[models]]
name = "leaky-{status}"
base_url = "http://127.0.0.1:{leaky.port}/v1"
upstream_model = "leaky-{status}"
api_key_env = "FAKE_UPSTREAM_KEY"
"""
    prefix = f"hygiene-{secrets.token_hex(4)}:"
    gw = make_gateway(
        Path(tmp_path_factory.mktemp("hygiene")),
        database_url=url,
        upstream=upstream,
        extra_toml=extra,
        extra_env={
            "CHATGATE_LOG_LEVEL": "DEBUG",
            "CHATGATE_SECRET": "server-secret-" + secrets.token_urlsafe(24),
            "CHATGATE_REDIS_URL": REDIS_URL,
            "CHATGATE_REDIS_PREFIX": prefix,
            "CHATGATE_INVALIDATION_POLL": "0.2",
        },
    )
    gw.start()
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.stop()
    drop_pg_database(url)
    drop_redis_prefix(prefix)


def chat_body(model: str = "gpt-test", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def run_scenario(gw: Gateway, rec: Recorder) -> None:
    """One story, top to bottom: everything a deployment does with secrets."""
    admin = admin_key(gw)
    rec.keys.append(admin)
    auth = {"Authorization": f"Bearer {admin}"}
    rec.http("GET", "/v1/models", headers=auth)
    rec.http("GET", "/api/admin/accounts", headers=auth)
    rec.http("GET", "/api/admin/backends", headers=auth)

    # Accounts and keys with the CLI.
    alice = f"alice-{secrets.token_hex(3)}@example.com"
    rec.cli("accounts", "create", alice, "--plan", "enterprise")
    rec.cli("accounts", "list", "--json")
    main = rec.issue("keys", "create", "--account", alice, "--name", "main", "--rotate-every", "1s")
    limited = rec.issue("keys", "create", "--account", alice, "--models", "gpt-test")
    short = rec.issue("keys", "create", "--account", alice, "--expires-in", "1s")
    table = rec.cli("keys", "create", "--account", alice, "--name", "table", shown_once=True)
    rec.keys.append(table.split("store it now):")[1].split()[0])
    rec.cli("keys", "list")
    rec.cli("keys", "list", "--json")

    # Using them: JSON, stream, embeddings, models, a forbidden model, the usage API.
    key = main["key"]
    bearer = {"Authorization": f"Bearer {key}"}
    assert rec.http("POST", "/v1/chat/completions", headers=bearer, json=chat_body()).ok
    rec.http(
        "POST",
        "/v1/chat/completions",
        headers=bearer,
        json=chat_body(stream=True, stream_options={"include_usage": True}),
    )
    rec.http("POST", "/v1/embeddings", headers=bearer, json={"model": "gpt-test", "input": "x"})
    rec.http("GET", "/v1/models/gpt-test", headers=bearer)
    limited_auth = {"Authorization": f"Bearer {limited['key']}"}
    rec.http("POST", "/v1/chat/completions", headers=limited_auth, json=chat_body("gpt-other"))
    rec.http("GET", "/v1/organization/usage/completions?start_time=0", headers=bearer)
    rec.http("GET", "/api/keys", headers=bearer)
    rec.http("GET", f"/api/keys/{main['id']}", headers=bearer)
    rec.http("GET", "/api/me", headers=bearer)

    # Bad keys and keys in the wrong places.
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    for header in (
        f"Bearer {flipped}",
        f"Bearer {keyfmt.generate()}",
        f"Basic {key}",
        f"Token {key}",
        f"Bearer {key}{key}",
        f"Bearer {key[:-3]}",
        f"bearer  {key} ",
    ):
        rec.http(
            "POST", "/v1/chat/completions", headers={"Authorization": header}, json=chat_body()
        )
        rec.http("GET", "/api/keys", headers={"Authorization": header})
    rec.http("POST", f"/v1/chat/completions?api_key={key}", json=chat_body())
    rec.http("POST", "/v1/chat/completions", headers={"X-Api-Key": key}, json=chat_body())
    # Keys inside request bodies that fail validation: an echo of user input must not echo them.
    for body in (
        chat_body(model=key),
        {"model": "gpt-test", "messages": [{"role": key, "content": "x"}]},
        {"model": "gpt-test", "messages": key},
        {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "temperature": key},
        {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "stop": {key: 1}},
        {key: "x"},
    ):
        rec.http("POST", "/v1/chat/completions", headers=bearer, json=body)
    rec.http("POST", "/v1/chat/completions", headers=bearer, data=f'{{"model": "{key}", oops')
    rec.http("GET", f"/v1/models/{key}", headers=bearer)
    rec.http("GET", f"/api/keys/{key}", headers=bearer)
    rec.http("GET", f"/v1/responses/{key}", headers=bearer)
    rec.http("GET", f"/v1/conversations/{key}", headers=bearer)
    rec.http("GET", f"/nothing/{key}", headers=bearer)

    # Upstream errors: refused, 5xx, and an upstream that echoes our upstream key.
    for model in ("gpt-dead", "gpt-fail", *(f"leaky-{s}" for s in (400, 401, 404, 429, 500))):
        rec.http("POST", "/v1/chat/completions", headers=bearer, json=chat_body(model))
        rec.http("POST", "/v1/chat/completions", headers=bearer, json=chat_body(model, stream=True))
    rec.http("POST", "/v1/embeddings", headers=bearer, json={"model": "leaky-400", "input": "x"})
    rec.http("POST", "/v1/responses", headers=bearer, json={"model": "leaky-400", "input": "x"})

    # Rotation (shown once), grace 0, old secret refused; revocation; expiry; due.
    rotated = rec.issue("keys", "rotate", main["id"], "--grace", "0")
    rec.cli("keys", "due", "--json")
    rec.cli("keys", "due")
    time.sleep(1.2)
    rec.http("POST", "/v1/chat/completions", headers=bearer, json=chat_body())  # old secret
    new_auth = {"Authorization": f"Bearer {rotated['key']}"}
    rec.http("POST", "/v1/chat/completions", headers=new_auth, json=chat_body())
    rec.cli("keys", "revoke", limited["id"])
    rec.cli("keys", "revoke", limited["id"], "--json")
    time.sleep(0.5)
    rec.http("POST", "/v1/chat/completions", headers=limited_auth, json=chat_body())
    rec.http(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {short['key']}"},
        json=chat_body(),
    )
    rec.cli("keys", "revoke", key, check=False)  # a key where an id belongs
    rec.cli("keys", "rotate", key, check=False)
    rec.cli("keys", "create", "--account", key, check=False)

    # The management API with a key: create and rotate (shown once), revoke.
    created = rec.http("POST", "/api/keys", shown_once=True, headers=new_auth, json={"name": "api"})
    api_key = created.json()
    rec.keys.append(api_key["key"])
    again = rec.http(
        "POST",
        f"/api/keys/{api_key['id']}/rotate",
        shown_once=True,
        headers=new_auth,
        json={"grace": "0"},
    )
    rec.keys.append(again.json()["key"])
    rec.http("POST", f"/api/keys/{api_key['id']}/revoke", headers=new_auth)

    # The dashboard: sign up, a wrong password, log out, log in.
    http = requests.Session()
    bob = f"bob-{secrets.token_hex(3)}@example.com"
    form = rec.http("GET", "/dashboard/signup", session=http)
    token = CSRF.search(form.text)
    assert token, form.text[:200]
    rec.http(
        "POST",
        "/dashboard/signup",
        session=http,
        data={
            "csrf_token": token.group(1),
            "email": bob,
            "password": PASSWORD,
            "password2": PASSWORD,
        },
    )
    me = rec.http("GET", "/api/me", session=http)
    csrf = me.json()["csrf_token"]
    made = rec.http(
        "POST", "/api/keys", session=http, shown_once=True, headers={"X-CSRF-Token": csrf}, json={}
    )
    rec.keys.append(made.json()["key"])
    rec.http("POST", "/dashboard/logout", session=http, data={"csrf_token": csrf})
    fresh = requests.Session()
    page = rec.http("GET", "/dashboard/login", session=fresh)
    login_token = CSRF.search(page.text)
    assert login_token
    rec.http(
        "POST",
        "/dashboard/login",
        session=fresh,
        data={"csrf_token": login_token.group(1), "email": bob, "password": WRONG_PASSWORD},
    )
    page = rec.http("GET", "/dashboard/login", session=fresh)
    login_token = CSRF.search(page.text)
    assert login_token
    rec.http(
        "POST",
        "/dashboard/login",
        session=fresh,
        data={"csrf_token": login_token.group(1), "email": bob, "password": PASSWORD},
    )
    rec.http("GET", "/dashboard/keys", session=fresh)
    rec.cookies.extend(c.value for c in [*http.cookies, *fresh.cookies] if c.value)

    # A leak report for a live key, and the scanner over a file holding two keys.
    rec.http("POST", "/api/keys/report-leak", json={"key": rotated["key"]})
    leak_file = gw.workdir / "leaked.txt"
    leak_file.write_text(f"{rotated['key']}\n{api_key['key']}\n")
    rec.cli("scan", str(leak_file), check=False)
    rec.cli("scan", str(leak_file), "--revoke", "--json", check=False)
    time.sleep(0.5)

    # Usage, by model too (a key sent as the model above is in it), from the CLI and the API.
    rec.cli("usage", "--by", "model")
    rec.cli("usage", "--by", "model", "--format", "json")
    rec.cli("usage", "export", "--output", "-")
    rec.http("GET", "/api/usage", headers=auth)  # the admin: every account

    # Metrics and the OpenAPI document, last, after everything above was counted.
    rec.http("GET", "/metrics")
    rec.http("GET", "/openapi.json")
    rec.http("GET", "/readyz")


def around(text: str, secret: str, width: int = 120) -> str:
    """The text around the first place ``secret`` appears, with the secret masked."""
    at = text.index(secret)
    snippet = text[max(at - width, 0) : at + len(secret) + width]
    return snippet.replace(secret, "<SECRET>").replace("\n", " | ")


def secrets_of(gw: Gateway, rec: Recorder) -> dict[str, str]:
    found = {f"key {keyfmt.hint(k)}": k for k in rec.keys}
    found["upstream key"] = gw.env["FAKE_UPSTREAM_KEY"]
    found["CHATGATE_SECRET"] = gw.env["CHATGATE_SECRET"]
    found["password"] = PASSWORD
    found["wrong password"] = WRONG_PASSWORD
    for i, cookie in enumerate(rec.cookies):
        found[f"session cookie {i}"] = cookie
    return found


@dataclass
class Outcome:
    log: str  # the server's whole log, less the one line that prints the first admin key
    rec: Recorder
    hidden: dict[str, str]


@pytest.fixture(scope="module")
def outcome(hygiene_gw: Gateway) -> Outcome:
    rec = Recorder(hygiene_gw)
    run_scenario(hygiene_gw, rec)
    hygiene_gw.stop()  # the shutdown's log lines count too
    log = hygiene_gw.logs()
    printed = [line for line in log.splitlines() if "CHATGATE_API_KEY=" in line]
    assert len(printed) == 1  # the one allowed line: the first start's admin key, on stdout
    return Outcome(log.replace(printed[0], ""), rec, secrets_of(hygiene_gw, rec))


def test_the_scenario_ran_at_debug(outcome: Outcome) -> None:
    assert " DEBUG " in outcome.log
    assert len(outcome.rec.keys) >= 8 and outcome.rec.cookies
    assert any(what.startswith("GET /metrics -> 200") for what, _ in outcome.rec.bodies)


def test_no_secret_in_the_server_log(outcome: Outcome) -> None:
    problems = [
        f"{name} in the server log: {around(outcome.log, value)}"
        for name, value in outcome.hidden.items()
        if value in outcome.log
    ]
    assert not problems, "\n".join(problems)


def _in_answers(outcome: Outcome, names: set[str] | None) -> list[str]:
    return [
        f"{name} in {what}: {around(text, value)}"
        for name, value in outcome.hidden.items()
        if names is None or name in names
        for what, text in outcome.rec.bodies
        if value in text
    ]


def test_no_key_password_cookie_or_server_secret_in_answers_metrics_or_cli(
    outcome: Outcome,
) -> None:
    """Every response (headers and body, errors included), /metrics and every CLI output."""
    names = set(outcome.hidden) - {"upstream key"}
    problems = _in_answers(outcome, names)
    assert not problems, "\n".join(problems)


def test_the_upstream_key_never_reaches_a_caller(outcome: Outcome) -> None:
    problems = _in_answers(outcome, {"upstream key"})
    assert not problems, "\n".join(problems)


def test_shown_once_answers_hold_their_own_key_only(outcome: Outcome) -> None:
    for text in outcome.rec.shown_once:
        holds = [name for name, value in outcome.hidden.items() if value in text]
        assert len(holds) == 1 and holds[0].startswith("key "), holds


# -- constant-time comparisons ------------------------------------------------------------

# An identifier naming a secret: ``key``/``api_key`` (not ``key_id``), a token, a hash...
SECRET_NAME = re.compile(
    r"secret|token|password|passwd|csrf|digest|hash|signature|(^|_)key$", re.IGNORECASE
)
COMPARED_FILES = [
    "chatgate/auth.py",
    "chatgate/keys/format.py",
    "chatgate/keys/store.py",
    "chatgate/keys/scan.py",
    "chatgate/api/leaks.py",
    "chatgate/api/manage.py",
    "chatgate/dashboard/auth.py",
    "chatgate/dashboard/passwords.py",
]


def _names_a_secret(node: ast.AST) -> bool:
    names = [
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Name | ast.Attribute)
    ]
    return any(SECRET_NAME.search(name) for name in names)


def _is_harmless(node: ast.AST) -> bool:
    """Literals (None, numbers, a status or scheme name), ``len()``/``type()`` results, and
    SQLAlchemy column expressions (``table.c.key_hash == x`` is the database's indexed
    lookup, not a comparison in Python) compare no secret here."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in ("len", "type", "isinstance")
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "c"
    )


def plain_secret_comparisons(source: str, name: str = "<source>") -> list[str]:
    """Every ``==``/``!=`` in ``source`` with a secret-named value on one side and something
    other than a literal, a length or a database column on the other."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        lefts = [node.left, *node.comparators[:-1]]
        for op, left, right in zip(node.ops, lefts, node.comparators, strict=True):
            if not isinstance(op, ast.Eq | ast.NotEq):
                continue
            if _is_harmless(left) or _is_harmless(right):
                continue
            if _names_a_secret(left) or _names_a_secret(right):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_comparison_check_itself() -> None:
    bad = "if supplied == session.csrf_token: pass\nok = stored_hash != digest\n"
    assert len(plain_secret_comparisons(bad)) == 2
    fine = (
        "q = api_keys.c.key_hash == key_hash\n"
        "ok = hmac.compare_digest(a_token, b_token)\n"
        "empty = token == ''\n"
        "same = len(key) != KEY_LEN\n"
        "same_key = key_id == other_id\n"
    )
    assert plain_secret_comparisons(fine) == []


@pytest.mark.parametrize("path", COMPARED_FILES)
def test_secrets_are_compared_in_constant_time(path: str) -> None:
    """Secrets are compared with ``hmac.compare_digest`` (or found by a hash lookup in the
    database), never with ``==``, whose time depends on how much of a guess is right."""
    file = ROOT / path
    if not file.exists():
        pytest.skip(f"{path} does not exist")
    assert plain_secret_comparisons(file.read_text(), path) == []


def test_the_checksum_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert keyfmt.is_well_formed(keyfmt.generate()) and calls


class SpyStore:
    """Stands in for the key store: records what authentication asks it."""

    def __init__(self) -> None:
        self.hashed: list[str] = []
        self.looked_up: list[str] = []

    def hash(self, key: str) -> str:
        self.hashed.append(key)
        return keyfmt.key_hash("spy-secret", key)

    async def lookup(self, key_hash: str) -> None:
        self.looked_up.append(key_hash)


async def test_authentication_looks_up_the_hash_never_the_key() -> None:
    """The presented key is hashed (HMAC under the server secret) and only the hash goes to
    the database; a malformed key never gets that far."""
    from chatgate.auth import Authenticator
    from chatgate.errors import AuthenticationError

    spy = SpyStore()
    auth = Authenticator(spy, None, ttl=60, poll_interval=1)  # type: ignore[arg-type]
    key = keyfmt.generate()
    with pytest.raises(AuthenticationError):
        await auth.authenticate(f"Bearer {key}")
    assert spy.hashed == [key]
    assert spy.looked_up == [keyfmt.key_hash("spy-secret", key)]
    with pytest.raises(AuthenticationError):
        await auth.authenticate("Bearer " + key[:-1] + ("A" if key[-1] != "A" else "B"))
    # The checksum rejected it before any lookup. (It was hashed, to look in the in-memory
    # cache first: only a digest of a well-formed key is ever cached, so a hit skips the check.)
    assert len(spy.looked_up) == 1
    with pytest.raises(AuthenticationError):
        await auth.authenticate("Bearer " + key[:-2])  # the wrong length: not even hashed
    assert len(spy.hashed) == 2 and len(spy.looked_up) == 1
