"""The CLI: readable tables, --json, one-line errors with exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chatgate.dashboard.passwords import HASHER
from tests.helpers import (
    BIN,
    REDIS_URL,
    Gateway,
    Upstream,
    create_pg_database,
    drop_pg_database,
    drop_redis_prefix,
    make_gateway,
)


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    return make_gateway(tmp_path)


def test_errors_are_one_line_exit_2(gw: Gateway) -> None:
    gw.cli("migrate")  # as `make run` does first: the other commands make no database
    result = gw.cli("accounts", "set-plan", "nobody@example.com", "pro", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error" in result.stderr
    result = gw.cli("keys", "create", "--account", "nobody@example.com", check=False)
    assert result.returncode == 2
    result = gw.cli("plans", "create", "bad name!", check=False)
    assert result.returncode == 2
    for dots in (".", "..", "pro\n"):  # dot segments in a URL; "$" let a newline through
        result = gw.cli("plans", "create", dots, check=False)
        assert result.returncode == 2 and "not only dots" in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0


def test_migrate_says_what_it_did(gw: Gateway) -> None:
    """A new database was migrated with "database is up to date" as the only word (QA)."""
    first = gw.cli("migrate").stdout
    assert first.startswith("database migrated from empty to "), first
    assert gw.cli("migrate").stdout.startswith("database is up to date"), first


def test_set_password_takes_a_long_password_from_stdin(gw: Gateway) -> None:
    """A 100-character password printed zxcvbn's "exceeds max length of 72" and was refused."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "long@example.com")
    password = secrets.token_urlsafe(90)[:100]
    done = gw.cli(
        "accounts", "set-password", "long@example.com", "--password-stdin", input=password + "\n"
    )
    assert done.returncode == 0 and "long@example.com" in done.stdout
    weak = gw.cli(
        "accounts",
        "set-password",
        "long@example.com",
        "--password-stdin",
        input="a" * 100 + "\n",
        check=False,
    )
    assert weak.returncode == 2 and "too easy to guess" in weak.stderr, weak.stderr


def test_set_password_takes_a_crlf_line_without_its_cr(gw: Gateway) -> None:
    """A password piped with a CRLF line end (a Windows file, a heredoc) kept its CR: the
    password set was not the one typed at the dashboard, which then failed to log in."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "crlf@example.com")
    password = "Tq8#vLp2!zRw9mKf"
    gw.cli(
        "accounts", "set-password", "crlf@example.com", "--password-stdin", input=password + "\r\n"
    )
    with sqlite3.connect(gw.workdir / "data" / "chatgate.db") as db:
        [stored] = db.execute(
            "SELECT password_hash FROM accounts WHERE email = 'crlf@example.com'"
        ).fetchone()
    assert HASHER.verify(stored, password)


def test_a_plan_name_too_long_is_not_named_as_another_plan(gw: Gateway) -> None:
    """A 65-character plan name was said not to exist by its first 64 characters: the name
    of a plan that does exist."""
    gw.cli("migrate")
    gw.cli("plans", "create", "p" * 64)
    gw.cli("accounts", "create", "long-plan@example.com")
    result = gw.cli("accounts", "set-plan", "long-plan@example.com", "p" * 65, check=False)
    assert result.returncode == 2 and f"`{'p' * 64}…`" in result.stderr, result.stderr


def test_make_run_takes_the_port_from_its_command_line_only() -> None:
    """``make run`` passed a PORT or HOST from the environment (container platforms set PORT,
    tcsh sets HOST) over CHATGATE_PORT / CHATGATE_HOST; only ``make run PORT=...`` may."""
    root = Path(__file__).resolve().parent.parent

    def dry(*args: str, env: dict[str, str]) -> str:
        out = subprocess.run(
            ["make", "-n", "run", *args],
            cwd=root,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return next(line for line in out.splitlines() if "chatgate serve" in line)

    assert "--port" not in dry(env={"PORT": "3000", "HOST": "myhost"})
    assert "--host" not in dry(env={"PORT": "3000", "HOST": "myhost"})
    assert dry("PORT=9", "HOST=0.0.0.0", env={}).endswith("serve --host 0.0.0.0 --port 9")


@pytest.mark.parametrize("stdin", ["", "a walrus in a bowler hat\n"])
def test_set_password_without_a_terminal_is_a_one_line_error(gw: Gateway, stdin: str) -> None:
    """Without --password-stdin the password is typed at a prompt; fed by a pipe, getpass
    read the pipe and died of EOFError (or termios.error) with a traceback."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "piped@example.com")
    result = gw.cli("accounts", "set-password", "piped@example.com", input=stdin, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("chatgate: error: ") and "--password-stdin" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_debug_logs_hold_no_stored_hash(gw: Gateway) -> None:
    """CHATGATE_LOG_LEVEL=DEBUG is chatgate's own detail, not the SQLite driver's trace of
    every statement with its values: a key's stored hash (and on a server, password hashes
    and conversations) went to the log with it."""
    import sqlite3

    gw.cli("migrate")
    gw.env["CHATGATE_LOG_LEVEL"] = "DEBUG"
    gw.cli("accounts", "create", "dbg@example.com")
    made = gw.cli("keys", "create", "--account", "dbg@example.com", "--json")
    with sqlite3.connect(gw.workdir / "data" / "chatgate.db") as db:
        (stored,) = db.execute("SELECT key_hash FROM api_keys").fetchone()
    assert stored and stored not in made.stderr
    assert "DEBUG" in made.stderr  # still on, for the rest


def test_plans_accounts_keys_round_trip(gw: Gateway) -> None:
    gw.cli("migrate")
    plans = {p["name"]: p for p in gw.cli_json("plans", "list")}
    assert {"free", "pro", "enterprise"} <= set(plans)
    created = gw.cli_json("plans", "create", "team", "--rpm", "100", "--monthly-tokens", "5000")
    assert created["rpm"] == 100 and created["tpm"] is None and created["monthly_tokens"] == 5000
    updated = gw.cli_json("plans", "update", "team", "--rpm", "unlimited", "--tpm", "9")
    assert updated["rpm"] is None and updated["tpm"] == 9 and updated["monthly_tokens"] == 5000

    account = gw.cli_json("accounts", "create", "Ann@Example.com", "--plan", "team")
    assert account["email"] == "ann@example.com" and account["plan"] == "team"
    assert gw.cli_json("accounts", "set-plan", "ann@example.com", "pro")["plan"] == "pro"
    dup = gw.cli("accounts", "create", "ann@example.com", check=False)
    assert dup.returncode == 2

    table = gw.cli("keys", "create", "--account", "ann@example.com", "--name", "ci").stdout
    assert "shown once" in table and "sk-cg-" in table
    listing = gw.cli("keys", "list").stdout
    assert "ci" in listing and "sk-cg-" in listing  # the hint
    key = table.split("shown once, store it now):")[1].split()[0]
    assert key not in listing  # only the hint is ever listed


def test_numbers_beyond_the_database_are_one_line_errors(database_url: str, tmp_path: Path) -> None:
    """Each was an OverflowError traceback (SQLite) or a database error (PostgreSQL's 32-bit
    INTEGER); the same checks as the API's answer them."""
    gw = make_gateway(tmp_path, database_url=database_url)
    gw.cli("migrate")
    name = "big-" + tmp_path.name[-8:].replace("_", "")
    email = f"{name}@example.com"
    gw.cli("accounts", "create", email)
    for args in (
        ("plans", "create", name, "--rpm", "9" * 20),
        ("plans", "create", name, "--tpm", str(2**31)),
        ("plans", "create", name, "--monthly-tokens", str(2**63)),
        ("keys", "create", "--account", email, "--expires-in", "9" * 20 + "d"),
        ("keys", "create", "--account", email, "--expires-in", "36501d"),
        ("usage", "--since", "9" * 20 + "d"),
    ):
        result = gw.cli(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "error" in result.stderr, args
    made = gw.cli_json("plans", "create", name, "--rpm", str(2**31 - 1))
    assert made["rpm"] == 2**31 - 1
    key = gw.cli_json("keys", "create", "--account", email, "--expires-in", "36500d")
    assert key["expires_at"] > 4_000_000_000


@pytest.mark.parametrize("url", ["mysql://ann:hunter2@db.internal/chatgate", "oracle://x/y"])
def test_a_database_url_of_another_kind_is_a_one_line_error(gw: Gateway, url: str) -> None:
    """chatgate runs on SQLite and PostgreSQL: any other URL is refused in one line (naming
    neither its password), not with a traceback from a driver it does not have."""
    gw.env["CHATGATE_DATABASE_URL"] = url
    for args in (("keys", "list"), ("serve", "--port", "1")):
        result = gw.cli(*args, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "postgresql://" in result.stderr and "hunter2" not in result.stderr


@pytest.mark.parametrize("behaviour", ["close", "reset", "refuse"])
def test_a_database_that_drops_the_connection_is_named_in_one_line(
    gw: Gateway, behaviour: str
) -> None:
    """QA: PostgreSQL's address reached but the connection dropped (a proxy or a firewall in
    between, a server going down) said "unexpected connection_lost() call" or "[Errno 104]
    Connection reset by peer", naming neither the database nor the setting."""
    import socket
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()
    if behaviour == "refuse":
        listener.close()  # nothing listens there
    else:
        listener.listen(16)
        listener.settimeout(0.2)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:  # closed at the test's end
                    return
                if behaviour == "reset":  # an RST, not a FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
    gw.env["CHATGATE_DATABASE_URL"] = f"postgresql://ann:hunter2@127.0.0.1:{port}/chatgate"
    try:
        for args in (("keys", "list"), ("migrate",), ("serve", "--port", "1")):
            result = gw.cli(*args, check=False)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().count("\n") == 0, result.stderr
            assert f"cannot connect to 127.0.0.1:{port} (CHATGATE_DATABASE_URL)" in result.stderr
            assert "hunter2" not in result.stderr
    finally:
        stop.set()
        listener.close()


def test_serve_no_migrate_on_a_missing_database_creates_nothing(gw: Gateway) -> None:
    """QA: ``serve --no-migrate`` with a mistyped data directory refused the empty database,
    after making the directory and an empty SQLite file; the other commands make neither."""
    result = gw.cli("serve", "--no-migrate", "--port", "1", check=False)
    assert result.returncode == 2 and "there is no database at" in result.stderr, result.stderr
    assert not (gw.workdir / "data").exists()


def test_serve_refuses_a_port_that_does_not_exist(gw: Gateway) -> None:
    """uvloop took the number modulo 65536: ``serve --port 99999`` listened on 34463."""
    for args, env in (
        (("--port", "99999"), {}),
        (("--port", "-1"), {}),
        ((), {"CHATGATE_PORT": "70000"}),
    ):
        result = gw.cli("serve", *args, check=False, env=env, timeout=30)
        assert result.returncode == 2, (args, env, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "65535" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("toml", "said"),
    [
        ('[[models]]\nbase_url = "http://127.0.0.1:9/v1"\n', "name"),
        ("server = 3\n", "[server]"),
        ('models = ["gpt-test"]\n', "[[models]]"),
        ("models = 3\n", "[[models]]"),
    ],
)
def test_a_config_file_of_the_wrong_shape_is_a_one_line_error(
    gw: Gateway, toml: str, said: str
) -> None:
    """Each was a traceback (KeyError: 'name', AttributeError, TypeError) from every command."""
    config = gw.workdir / "bad.toml"
    config.write_text(toml)
    gw.env["CHATGATE_CONFIG"] = str(config)
    result = gw.cli("accounts", "list", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and said in result.stderr, result.stderr


def test_keys_create_expires_in_0_is_a_key_that_does_not_expire(gw: Gateway) -> None:
    """As in the API and the dashboard; the CLI made a key expired at birth (shown once, dead)."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "zero@example.com")
    for text in ("0", "never"):
        key = gw.cli_json("keys", "create", "--account", "zero@example.com", "--expires-in", text)
        assert key["expires_at"] is None and key["status"] == "active", (text, key)
    soon = gw.cli_json("keys", "create", "--account", "zero@example.com", "--expires-in", "1h")
    assert soon["expires_at"] > time.time() + 3500 and soon["status"] == "active"
    models = gw.workdir / "models.toml"
    models.write_text(
        "".join(f'[[models]]\nname = "{m}"\nbase_url = "http://127.0.0.1:9/v1"\n' for m in "abc")
    )
    gw.env["CHATGATE_CONFIG"] = str(models)
    made = gw.cli(
        "keys", "create", "--account", "zero@example.com", "--models", "a", "--models", "b,c",
        "--json",
    )  # fmt: skip
    both = json.loads(made.stdout)
    assert sorted(both["models"]) == ["a", "b", "c"], both  # QA: "c" and "b" alone were kept
    # "0d" is refused (a key dead at birth), saying what does mean no expiry: the message
    # said "be empty for never" where the help says "0 or never" (QA).
    dead = gw.cli(
        "keys", "create", "--account", "zero@example.com", "--expires-in", "0d", check=False
    )
    assert dead.returncode == 2 and "0, never or empty for no expiry" in dead.stderr


def test_a_setting_that_is_not_a_number_is_named(gw: Gateway) -> None:
    """The message was Python's alone (invalid literal for int() with base 10: '2k'), with no
    word of which of some thirty settings held it."""
    for name, value in (
        ("CHATGATE_USAGE_BATCH_SIZE", "2k"),
        ("CHATGATE_REDIS_TIMEOUT", "1s"),
        ("CHATGATE_LEASE_TTL", "1"),  # a number, but under the 3 s renewals need
    ):
        result = gw.cli("accounts", "list", check=False, env={name: value}, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and name in result.stderr, result.stderr
    config = gw.workdir / "port.toml"
    config.write_text('[server]\nport = "eighty"\n')
    gw.env["CHATGATE_CONFIG"] = str(config)
    result = gw.cli("accounts", "list", check=False)
    assert result.returncode == 2 and "port" in result.stderr, result.stderr


def _in_database(gw: Gateway, step: Callable[[AsyncConnection], Awaitable[object]]) -> None:
    """Run ``step`` in a transaction on ``gw``'s database."""
    from chatgate.db.engine import create_engine
    from chatgate.settings import Settings

    async def go() -> None:
        engine = create_engine(Settings.from_env(gw.env))
        try:
            async with engine.begin() as conn:
                await step(conn)
        finally:
            await engine.dispose()

    asyncio.run(go())


def _downgrade_one(gw: Gateway) -> None:
    """Take ``gw``'s database one migration back, as an older chatgate left it."""
    from alembic import command

    from chatgate.db.engine import _alembic_config

    _in_database(
        gw, lambda conn: conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "-1"))
    )


def test_a_database_behind_the_code_is_refused_by_serve_and_fails_readiness(gw: Gateway) -> None:
    """``serve --no-migrate`` (the deployment guide's, after ``chatgate migrate``) on a database
    nobody migrated served, and failed every query that needed the new schema; ``/readyz`` said
    ready all along (``SELECT 1``)."""
    from chatgate.db.engine import head_revision

    def no_migrate() -> subprocess.CompletedProcess[str]:
        return gw.cli("serve", "--no-migrate", "--port", "1", check=False, timeout=60)

    missing = no_migrate()  # no file: refused before one is made (see the test below)
    assert missing.returncode == 2, missing.stderr
    assert "there is no database at" in missing.stderr, missing.stderr
    (gw.workdir / "data").mkdir(mode=0o700)
    (gw.workdir / "data" / "chatgate.db").touch()  # a file with no chatgate tables
    empty = no_migrate()
    assert empty.returncode == 2, empty.stderr
    assert empty.stderr.strip().count("\n") == 0, empty.stderr
    assert "database is empty" in empty.stderr and "chatgate migrate" in empty.stderr

    gw.cli("migrate")
    _downgrade_one(gw)
    behind = no_migrate()
    assert behind.returncode == 2, behind.stderr
    head = head_revision()
    assert head is not None and f"needs migration {head}" in behind.stderr

    gw.start()  # migrates first, as by default
    try:
        ready = requests.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"]["database"]["ok"]
        _downgrade_one(gw)  # an older chatgate's migrations, run by hand under this node
        unready = requests.get(gw.url + "/readyz", timeout=10)
        assert unready.status_code == 503, unready.text
        assert unready.json()["checks"]["database"] == {"ok": False, "error": "SchemaBehind"}
        gw.cli("migrate")
        assert requests.get(gw.url + "/readyz", timeout=10).status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_node_with_another_secret_refuses_to_start(
    kind: str, tmp_path: Path, upstream: Upstream
) -> None:
    """Nodes of one database with different server secrets (CHATGATE_SECRET unset: each made
    its own in its data directory) each refused the other's keys: behind a load balancer, a
    key that failed on every other request, and nothing said why."""
    import secrets

    url = create_pg_database() if kind == "postgresql" else f"sqlite:///{tmp_path / 'one.db'}"
    first_secret, other_secret = (f"s{i}-" + secrets.token_urlsafe(24) for i in range(2))

    def node(name: str, secret: str) -> Gateway:
        return make_gateway(
            tmp_path / name, database_url=url, upstream=upstream,
            extra_env={"CHATGATE_SECRET": secret},
        )  # fmt: skip

    try:
        first = node("first", first_secret)
        first.cli("migrate")
        first.cli("accounts", "create", "lb@example.com")
        key = first.cli_json("keys", "create", "--account", "lb@example.com")["key"]

        other = node("other", other_secret)
        for args in (("serve", "--port", "1"), ("keys", "list")):
            refused = other.cli(*args, check=False)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.strip().count("\n") == 0, refused.stderr
            assert "CHATGATE_SECRET is not the secret this database" in refused.stderr
            assert first_secret not in refused.stderr and other_secret not in refused.stderr

        same = node("same", first_secret).start()  # a second node done right
        try:
            answer = requests.post(
                same.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        finally:
            same.stop()

        def works(gw: Gateway) -> bool:
            return gw.cli("keys", "list", check=False).returncode == 0

        # Rotating on purpose (SECURITY.md): with the old secret as the previous one, the
        # database moves to the new; a node still on the old one is then refused.
        rotated = node("rotated", "s2-" + secrets.token_urlsafe(24))
        rotated.env["CHATGATE_SECRET_PREVIOUS"] = first_secret
        assert works(rotated) and not works(first)
        # A clean break (no previous secret): refused until adopted.
        assert not works(other)
        assert "now takes this CHATGATE_SECRET" in other.cli("secret", "adopt").stdout
        assert works(other) and not works(rotated)
    finally:
        if kind == "postgresql":
            drop_pg_database(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_only_migrate_and_serve_make_a_database_or_bind_it_to_a_secret(
    kind: str, tmp_path: Path
) -> None:
    """Every command migrated the database it was given: ``keys list`` on a new PostgreSQL
    database printed [], made the schema and bound it to a secret it generated into the data
    directory, and ``serve`` with the real CHATGATE_SECRET was then refused; a mistyped
    CHATGATE_DATA_DIR made a new SQLite database and showed "no accounts" (found by QA)."""
    import sqlalchemy as sa

    from chatgate.keys import format as keyfmt

    url = create_pg_database() if kind == "postgresql" else ""
    gw = make_gateway(tmp_path / "gw", database_url=url)
    gw.env.pop("CHATGATE_SECRET", None)  # none given: the data directory's, if any
    data = gw.workdir / "data"
    leak = tmp_path / "leak.txt"
    leak.write_text(keyfmt.generate() + "\n")

    def tables() -> int:
        """PostgreSQL's tables (a SQLite database is a file in ``data``)."""
        query = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        found: list[int] = []

        async def count(conn: AsyncConnection) -> None:
            found.append((await conn.execute(sa.text(query))).scalar_one())

        _in_database(gw, count)
        return found[0]

    try:
        for args in (
            ("keys", "list", "--json"),
            ("accounts", "list"),
            ("accounts", "create", "a@example.com"),
            ("plans", "list"),
            ("keys", "create", "--account", "a@example.com"),
            ("usage",),
            ("secret", "adopt"),
            ("scan", str(leak), "--revoke"),
        ):
            result = gw.cli(*args, check=False)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            line = result.stderr.strip()
            assert line.count("\n") == 0 and line.startswith("chatgate: error: "), line
            assert line.endswith(": run 'chatgate migrate' first"), line
            assert not data.exists(), args  # no data dir, no SQLite file, no secret
            assert kind == "sqlite" or tables() == 0, args
        # migrate binds the database to the servers' secret, as serve would
        real = {"CHATGATE_SECRET": "real-" + secrets.token_urlsafe(24)}
        assert gw.cli("migrate", env=real).returncode == 0
        assert gw.cli("keys", "list", "--json", env=real).stdout.strip() == "[]"
        unset = gw.cli("keys", "list", check=False)  # a command never makes a secret
        assert unset.returncode == 2 and "CHATGATE_SECRET is not set" in unset.stderr
        # QA: `secret adopt` did, and bound the database to it: every node then refused
        adopt = gw.cli("secret", "adopt", check=False)
        assert adopt.returncode == 2 and "CHATGATE_SECRET is not set" in adopt.stderr
        assert not (data / "secret").exists()
        again = gw.cli("secret", "adopt", env=real)  # the secret it has: nothing to re-issue
        assert "takes this CHATGATE_SECRET already: nothing changed" in again.stdout
        assert gw.cli("keys", "list", "--json", env=real).returncode == 0
        # a database behind this code is refused, and left as it is
        _downgrade_one(gw)
        behind = gw.cli("accounts", "list", check=False, env=real)
        assert behind.returncode == 2 and "needs migration" in behind.stderr, behind.stderr
        assert behind.stderr.strip().endswith(": run 'chatgate migrate' first")
        assert gw.cli("migrate", env=real).returncode == 0
        # one migrated by an older chatgate's `migrate`, which set no secret: refused too
        _in_database(gw, lambda conn: conn.execute(sa.text("DELETE FROM instance")))
        unbound = gw.cli("keys", "list", check=False, env=real)
        assert unbound.returncode == 2, unbound.stderr
        assert "no server secret set up yet" in unbound.stderr, unbound.stderr
        assert gw.cli("migrate", env=real).returncode == 0
        assert gw.cli("keys", "list", env=real).returncode == 0
    finally:
        if kind == "postgresql":
            drop_pg_database(url)


def test_migrate_leaves_a_database_a_newer_chatgate_migrated(gw: Gateway) -> None:
    """An older node during a rolling upgrade (or a rollback): Alembic refused the database
    ("Can't locate revision"), so every command and the server's start failed."""
    import sqlalchemy as sa

    gw.cli("migrate")
    newer = sa.text("UPDATE alembic_version SET version_num = '9001'")
    _in_database(gw, lambda conn: conn.execute(newer))
    result = gw.cli("migrate")
    assert "at migration 9001, newer than this chatgate's" in result.stdout, result.stdout
    assert gw.cli("accounts", "create", "rolling@example.com").returncode == 0


def test_serve_port_0_takes_a_free_port_and_says_which(gw: Gateway) -> None:
    """``--port 0`` was read as "not given": the server took 8000 (or failed, if taken)."""
    import re

    log = gw.workdir / "port0.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "chatgate"), "serve", "--port", "0"],
            env={**gw.env, "CHATGATE_PORT": "1"},  # the flag wins over the environment
            cwd=gw.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        found = None
        for _ in range(300):
            found = re.search(rb"Running on http://127\.0\.0\.1:(\d+)", log.read_bytes())
            if found or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert found, log.read_text()
        port = int(found.group(1))
        assert port not in (0, 1, 8000)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_key_pasted_into_an_argument_is_never_stored_or_printed(gw: Gateway) -> None:
    """``keys create --models`` took any names: a key pasted there was stored and listed
    whole (and the key could use no model); ``set-plan`` and ``usage --key`` printed a pasted
    key whole in their error and title. Now every one is a one-line error showing its hint."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "paste@example.com")
    made = gw.cli_json("keys", "create", "--account", "paste@example.com")
    key, hint = made["key"], made["hint"]
    for argv in (
        ("keys", "create", "--account", "paste@example.com", "--models", key),
        ("keys", "create", "--account", "paste@example.com", "--models", "no-such-model"),
        ("accounts", "set-plan", "paste@example.com", key),
        ("usage", "--key", key),
        ("usage", "--key", "key_nothing"),
    ):
        result = gw.cli(*argv, check=False)
        assert result.returncode == 2, (argv, result.stdout)
        assert key not in result.stdout + result.stderr, argv
        assert result.stderr.startswith("chatgate: error: ")
        assert key not in argv or hint in result.stderr
    listed = gw.cli("keys", "list", "--json")
    assert key not in listed.stdout and len(json.loads(listed.stdout)) == 1
    by_id = gw.cli("usage", "--key", made["id"], "--format", "json")
    assert json.loads(by_id.stdout)["data"] == []


def test_keys_rotate_grace_is_capped_as_the_api_caps_it(gw: Gateway) -> None:
    """The API and the dashboard refuse a grace period beyond 30 days; the CLI took 100 years."""
    gw.cli("migrate")
    gw.cli("accounts", "create", "grace@example.com")
    made = gw.cli_json("keys", "create", "--account", "grace@example.com")
    result = gw.cli("keys", "rotate", made["id"], "--grace", "400d", check=False)
    assert result.returncode == 2 and "30 days" in result.stderr
    rotated = gw.cli_json("keys", "rotate", made["id"], "--grace", "30d")
    assert rotated["id"] == made["id"] and rotated["key"] != made["key"]


@pytest.mark.parametrize(
    ("env", "toml", "said"),
    [
        ({"CHATGATE_USAGE_RETENTION_DAYS": "0"}, "", "CHATGATE_USAGE_RETENTION_DAYS"),
        ({"CHATGATE_INVALIDATION_POLL": "abc"}, "", "CHATGATE_INVALIDATION_POLL"),
        ({"CHATGATE_DB_MAX_OVERFLOW": "-5"}, "", "CHATGATE_DB_MAX_OVERFLOW"),
        ({}, "[server]\nsecret = 12345\n", "secret in [server]"),
        ({}, '[server]\nredis_url = ["redis://127.0.0.1:6379/14"]\n', "redis_url in [server]"),
        ({}, "[server]\nhost = 5\n", "host in [server]"),
        ({}, '[[models]]\nname = "m"\ncontext_window = "big"\n', "'m': `context_window`"),
        ({}, "not toml at all\n", "bad.toml: not valid TOML"),
        (  # was "database: Could not parse SQLAlchemy URL from given URL string" (QA)
            {"CHATGATE_DATABASE_URL": "nonsense"},
            "",
            "CHATGATE_DATABASE_URL must be a postgresql:// or sqlite:/// URL",
        ),
        (  # was "[Errno 2] No such file or directory: '/nonexistent.toml'" (QA)
            {"CHATGATE_CONFIG": "/nonexistent.toml"},
            "",
            "CHATGATE_CONFIG: cannot read /nonexistent.toml: No such file or directory",
        ),
        ({"CHATGATE_HOST": ""}, "", "CHATGATE_HOST"),  # was every interface
        ({}, '[server]\nhost = ""\n', "host in [server]"),
        ({"CHATGATE_DATA_DIR": ""}, "", "CHATGATE_DATA_DIR"),  # was the current folder
        (  # was "invalid literal for int() with base 10: 'notaport'"
            {"CHATGATE_DATABASE_URL": "postgresql://u:12345@host:notaport/x"},
            "",
            "CHATGATE_DATABASE_URL",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    gw: Gateway, env: dict[str, str], toml: str, said: str
) -> None:
    """Tracebacks (AttributeError, TypeError), Python's own words naming no setting, or (a
    retention of 0) a server that deleted every usage record within a second of its start."""
    if toml:
        (gw.workdir / "bad.toml").write_text(toml)
        env = {**env, "CHATGATE_CONFIG": str(gw.workdir / "bad.toml")}
    for args in (("accounts", "list"), ("serve", "--port", "0")):
        result = gw.cli(*args, check=False, env=env, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and said in result.stderr, result.stderr
        assert "12345" not in result.stderr  # a secret in the wrong type is not repeated


def test_an_empty_host_option_is_refused_as_an_empty_setting_is(gw: Gateway) -> None:
    """QA: ``serve --host ''`` listened on the default address, where CHATGATE_HOST=""
    is refused (README: an empty host is refused)."""
    result = gw.cli("serve", "--host", "", "--port", "0", check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "chatgate: error: --host must be an address to listen on, not empty"
    )


def test_serve_checks_everything_before_the_first_start_shows_its_key(gw: Gateway) -> None:
    """The admin account was made and its key printed ("shown once"), then the start failed
    on a setting, a model table or a port in use: the key went with the process, and the next
    start, finding an account, shows none."""
    gw.cli("migrate")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = str(held.getsockname()[1])
    (gw.workdir / "models.toml").write_text('[[models]]\nname = "m"\nbase_url = "ftp://x"\n')
    redis = {"CHATGATE_REDIS_URL": REDIS_URL, "CHATGATE_REDIS_PREFIX": f"cg-{gw.workdir.name}:"}
    try:
        for args, env, said in (
            (("--port", "0"), {"CHATGATE_CONTEXT_TRIM": "bogus"}, "CHATGATE_CONTEXT_TRIM"),
            (("--port", "0"), {"CHATGATE_DEFAULT_PLAN": "nosuch"}, "CHATGATE_DEFAULT_PLAN"),
            (("--port", "0"), {"CHATGATE_CONFIG": str(gw.workdir / "models.toml")}, "base_url"),
            (("--port", taken), {}, f"cannot listen on 127.0.0.1:{taken}"),
            (("--port", taken, "--workers", "2"), redis, f"cannot listen on 127.0.0.1:{taken}"),
            (  # QA: "[Errno 2] No such file or directory", after the key was shown
                ("--port", "0"),
                {"CHATGATE_REDIS_URL": "rediss://127.0.0.1:6379/15?ssl_ca_certs=/nonexistent.pem"},
                "CHATGATE_REDIS_URL: its ssl_ca_certs file cannot be read",
            ),
        ):
            result = gw.cli("serve", *args, check=False, env=env, timeout=60)
            assert result.returncode == 2, (args, env, result.stderr)
            assert "shown once" not in result.stdout and "sk-cg-" not in result.stdout, args
            assert "Traceback" not in result.stderr, result.stderr  # one per worker, with 2
            assert said in result.stderr.strip().splitlines()[-1], result.stderr
            assert gw.cli_json("accounts", "list") == []  # no account: the next start makes it
    finally:
        held.close()
        drop_redis_prefix(redis["CHATGATE_REDIS_PREFIX"])


def test_a_database_that_never_answers_is_named_within_its_connect_timeout(gw: Gateway) -> None:
    """A PostgreSQL that takes the connection and never answers (a hung server, a firewall
    that drops): a minute (asyncpg's timeout), then "chatgate: error: " and nothing more."""
    silent = socket.socket()  # the kernel accepts for it; nothing is ever read or written
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    env = {
        **gw.env,
        "CHATGATE_DATABASE_URL": f"postgresql://postgres:pw@127.0.0.1:{port}/chatgate",
        "CHATGATE_DB_CONNECT_TIMEOUT": "1",
    }
    try:
        for args in (("accounts", "list"), ("serve", "--port", "0")):
            result = subprocess.run(
                [str(BIN / "chatgate"), *args],
                env=env,
                cwd=gw.workdir,
                capture_output=True,
                text=True,
                timeout=45,  # asyncpg's own minute fails the test here
            )
            assert result.returncode == 2, result.stderr
            line = result.stderr.strip()
            assert line.count("\n") == 0, line
            assert line.startswith("chatgate: error: database: TimeoutError: "), line
            assert f"127.0.0.1:{port} took the connection but did not answer within 1 s" in line
            assert ":pw@" not in line
    finally:
        silent.close()


def test_help_describes_the_command_and_names_every_one() -> None:
    """It showed the module's docstring, ``quotes`` and all, naming five of ten commands."""
    result = subprocess.run(
        [str(BIN / "chatgate"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "``" not in result.stdout and "serve | migrate" not in result.stdout
    description = result.stdout.split("\n\n")[1]
    assert description.startswith("chatgate, an OpenAI-compatible API gateway"), result.stdout
    for name in ("serve", "migrate", "accounts", "plans", "secret", "keys", "usage", "models"):
        assert f"\n    {name} " in result.stdout, name
    assert "\n    chat " in result.stdout and "\n    scan " in result.stdout


def test_an_upstream_key_variable_that_is_not_set_is_said_at_start(tmp_path: Path) -> None:
    """QA: a model whose ``api_key_env`` names a variable that is not set (a typo) called its
    upstream without a key, and nothing said so until the upstream's 401s."""
    config = tmp_path / "models.toml"
    config.write_text(
        '[[models]]\nname = "m"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "CHATGATE_TEST_NO_SUCH_KEY"\n'
    )
    gw = make_gateway(tmp_path / "gw", extra_env={"CHATGATE_CONFIG": str(config)}).start()
    gw.stop()
    assert "CHATGATE_TEST_NO_SUCH_KEY is not set (or empty)" in gw.logs()


def test_keys_made_before_the_secret_check_are_never_bound_to_a_new_secret(
    tmp_path: Path,
) -> None:
    """QA: a database of before migration 0006 (keys, no check of a secret) upgraded with its
    data directory's `secret` file missing was bound to a secret generated then, and every key
    refused, without a word. Without a secret set it is refused now (none generated); with one,
    bound with a warning that says how to undo it."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    old = make_gateway(tmp_path / "old", database_url=url, extra_env={"CHATGATE_SECRET": "o" * 40})
    old.cli("migrate")
    old.cli("accounts", "create", "early@example.com")
    key = old.cli_json("keys", "create", "--account", "early@example.com")["key"]
    _in_database(old, lambda conn: conn.execute(sa.text("DELETE FROM instance")))  # pre-0006

    lost = make_gateway(tmp_path / "lost", database_url=url)
    del lost.env["CHATGATE_SECRET"]  # no secret set, and no `secret` file in its data dir
    for args in (("migrate",), ("serve", "--port", "1")):
        refused = lost.cli(*args, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "holds 1 API key(s) made before chatgate recorded its server secret" in (
            refused.stderr
        )
        assert refused.stderr.strip().count("\n") == 0, refused.stderr
        assert not (lost.workdir / "data" / "secret").exists()  # none generated

    bound = old.cli("migrate")
    assert "bound the database's 1 API key(s)" in bound.stderr, bound.stderr
    assert "bound the database" not in old.cli("migrate").stderr  # once: checked from now on
    assert key.startswith("sk-cg-")
