"""The ``chatgate`` command: serve | migrate | accounts | plans | secret | keys | usage |
models | chat | scan (:data:`DESCRIPTION` is what ``--help`` says of it).

Every command reads its settings once (``CHATGATE_DATA_DIR``, ``CHATGATE_DATABASE_URL``, ...),
prints a readable table (or ``--json``), and reports an error as one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.accounts import LIMIT_FIELDS, AccountStore, PlanStore
from chatgate.backends.cli import add_parser as add_models_parser
from chatgate.client.chat import add_parser as add_chat_parser
from chatgate.db.engine import Schema, create_engine, migrate, schema
from chatgate.db.instance import (
    NoSecretCheck,
    SecretMismatch,
    adopt_secret,
    bind_secret,
    check_secret,
)
from chatgate.keys import format as keyfmt
from chatgate.keys.cli_scan import add_parser as add_scan_parser
from chatgate.keys.store import KeyStore
from chatgate.notify import Notifier
from chatgate.settings import Given, Settings
from chatgate.timefmt import iso, parse_duration
from chatgate.usage.cli import add_parser as add_usage_parser

DESCRIPTION = (
    "chatgate, an OpenAI-compatible API gateway: run the server, and manage its database, "
    "accounts, plans, keys and usage. Settings come from CHATGATE_* variables and "
    "chatgate.toml (see the README); errors are one line on stderr, with exit code 2."
)
log = logging.getLogger("chatgate.cli")


class CLIError(Exception):
    """A user mistake, reported as one line on stderr with exit code 2."""


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(
    args: argparse.Namespace, data: Any, columns: Sequence[str], *, times: Sequence[str] = ()
) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    rows = data if isinstance(data, list) else [data]
    shown = [{**r, **{t: iso(r.get(t)) for t in times}} for r in rows]
    print(table(shown, columns))


def _limit(text: str) -> int | None:
    if text.lower() in ("none", "unlimited", "-"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'unlimited': {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a limit cannot be negative")
    return value


async def with_engine(
    settings: Settings, fn: Callable[[AsyncEngine], Awaitable[Any]], *, secret: bool = False
) -> Any:
    """``fn`` on the database, which must be one ``chatgate migrate`` (or ``serve``) set up:
    a new one (no chatgate tables, or a SQLite file that is not there) or one behind this
    code's migrations is refused, and nothing is created, neither the SQLite file nor the data
    directory. Only ``migrate`` and ``serve`` create, migrate and bind a database to a secret:
    a mistyped CHATGATE_DATA_DIR or DATABASE_URL made a new database, and showed it empty.
    With ``secret``, the server secret must be the database's (a key made here must work on
    the servers); it is never generated here either."""
    _refuse_no_sqlite_file(settings)
    engine = create_engine(settings)
    try:
        found = await schema(engine)
        if found.state == "behind":
            lag = found.lag(f" ({_safe_url(settings)})")
            raise CLIError(f"{lag}: run 'chatgate migrate' first")
        if found.state == "ahead":  # used as it is, as migrate and serve use it
            log.warning(
                "the database is at migration %s, newer than this chatgate's %s",
                found.revision,
                found.head,
            )
        if secret:
            stored = settings.stored_secret()
            if stored is None:
                raise CLIError(
                    f"no server secret: CHATGATE_SECRET is not set and {settings.data_dir} "
                    "holds no file `secret`; give this command the servers' CHATGATE_SECRET"
                )
            try:
                await check_secret(engine, stored, settings.secret_previous, record=False)
            except (SecretMismatch, NoSecretCheck) as exc:
                raise CLIError(str(exc)) from None
        return await fn(engine)
    finally:
        await engine.dispose()


def _refuse_no_sqlite_file(settings: Settings) -> None:
    """A SQLite database that is not there is refused before an engine would make it."""
    if not settings.effective_database_url.startswith("sqlite"):
        return  # (create_engine names a URL of any other kind: make_url's words name none)
    url = make_url(settings.effective_database_url)
    path = url.database or ""
    if url.get_backend_name() == "sqlite" and path != ":memory:" and not Path(path).exists():
        raise CLIError(
            f"there is no database at {path} (CHATGATE_DATA_DIR, CHATGATE_DATABASE_URL): run "
            "'chatgate migrate' first"
        )


# -- commands -----------------------------------------------------------------------------

KEY_COLUMNS = ("id", "name", "hint", "status", "models", "created_at", "last_used_at", "expires_at")
KEY_TIMES = (
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "rotated_at",
    "prev_valid_until",
    "rotation_due_at",
)
DUE_COLUMNS = ("id", "account_id", "name", "hint", "rotated_at", "rotation_due_at")
ACCOUNT_COLUMNS = ("id", "email", "plan", "is_admin", "disabled", "created_at")


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    async def run() -> tuple[str | None, Schema]:
        engine = create_engine(settings)
        try:
            # What it started from, read where it ran: two started together both said they
            # had migrated it, one having waited for the other (QA).
            started = await migrate(engine)
            found = await schema(engine)
            # As serve's start does: the database is bound to this secret (generated into the
            # data directory if none is set), so the servers given the same one can use it.
            await bind_secret(engine, settings)
            return started, found
        finally:
            await engine.dispose()

    try:
        started, found = asyncio.run(run())
    except SecretMismatch as exc:
        raise CLIError(str(exc)) from None
    if found.state == "ahead":  # a newer chatgate migrated it: left alone (see migrate)
        print(
            f"database is at migration {found.revision}, newer than this chatgate's "
            f"{found.head}: left as it is ({_safe_url(settings)})"
        )
        return
    if started is not None:  # ("" a new database: it had no chatgate tables)
        was = f"migration {started}" if started else "empty"
        print(f"database migrated from {was} to {found.head} ({_safe_url(settings)})")
        return
    print(f"database is up to date ({_safe_url(settings)})")


def cmd_secret(settings: Settings, args: argparse.Namespace) -> None:
    # The secret given, never one made up here (QA: run without CHATGATE_SECRET, with a
    # mistyped data dir, it generated one and bound the shared database to it: every node
    # then refused to restart).
    async def run(engine: AsyncEngine) -> bool:
        secret = settings.stored_secret()
        if secret is None:
            raise CLIError(
                f"no server secret: CHATGATE_SECRET is not set and {settings.data_dir} holds "
                "no file `secret`; give this command the new CHATGATE_SECRET"
            )
        try:
            await check_secret(engine, secret, None, record=False)
        except (SecretMismatch, NoSecretCheck):
            await adopt_secret(engine, secret)
            return True
        return False

    if not asyncio.run(with_engine(settings, run)):
        print("the database takes this CHATGATE_SECRET already: nothing changed")
        return
    print(
        "the database now takes this CHATGATE_SECRET; nodes with another refuse to start, and "
        "keys hashed under the old one no longer match (re-issue them: chatgate keys rotate "
        "KEY_ID --grace 0)"
    )


def cmd_accounts(settings: Settings, args: argparse.Namespace) -> None:
    password = ""
    if args.action == "set-password":
        password = _read_password(args.password_stdin, args.email)

    async def run(engine: AsyncEngine) -> Any:
        store = AccountStore(engine, Notifier.from_settings(settings))  # changes wake servers
        if args.action == "create":
            return (await store.create(args.email, plan=args.plan, is_admin=args.admin)).to_dict()
        if args.action == "set-plan":
            account = await store.by_email(args.email)
            return (await store.set_plan(account.id, args.plan)).to_dict()
        if args.action == "set-password":
            from chatgate.dashboard.passwords import PasswordStore

            account = await store.by_email(args.email)
            await PasswordStore(engine).set_password(account.id, password)
            return account.to_dict()
        return [a.to_dict() for a in await store.list()]

    _emit(args, asyncio.run(with_engine(settings, run)), ACCOUNT_COLUMNS, times=("created_at",))


def _read_password(from_stdin: bool, email: str) -> str:
    """A new password from stdin (scripts) or typed twice at a prompt; never an argument.
    The dashboard's rules apply (:func:`chatgate.dashboard.passwords.password_problem`)."""
    import getpass

    from chatgate.dashboard.passwords import password_problem

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")  # a CRLF line too (Windows, a heredoc)
    else:
        # getpass falls back to reading stdin when it is not a terminal, and dies of EOFError
        # (or termios.error) at its end: a piped password goes through --password-stdin.
        if not sys.stdin.isatty():
            raise CLIError(
                "stdin is not a terminal to type a password at: give it on stdin with "
                "--password-stdin"
            )
        try:
            password = getpass.getpass("New password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at the prompt
            raise CLIError("no password was typed") from None
        if again != password:
            raise CLIError("the two passwords differ")
    problem = password_problem(password, email)
    if problem is not None:
        raise CLIError(problem[0].lower() + problem[1:])
    return password


def cmd_plans(settings: Settings, args: argparse.Namespace) -> None:
    async def run(engine: AsyncEngine) -> Any:
        store = PlanStore(engine, Notifier.from_settings(settings))  # changes wake servers
        limits = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f, ...) is not ...}
        if args.action == "create":
            return (await store.create(args.name, **limits)).to_dict()
        if args.action == "update":
            return (await store.update(args.name, **limits)).to_dict()
        return [p.to_dict() for p in await store.list()]

    _emit(args, asyncio.run(with_engine(settings, run)), ("name", *LIMIT_FIELDS))


def cmd_keys(settings: Settings, args: argparse.Namespace) -> None:
    async def run(engine: AsyncEngine) -> Any:
        keys = KeyStore.from_settings(engine, settings)
        accounts = AccountStore(engine)
        if args.action == "create":
            # Read as the API reads them.
            from chatgate.backends.router import Router
            from chatgate.dashboard.services import check_models, parse_expiry

            account = await accounts.by_email(args.account)
            expires = parse_expiry(args.expires_in)  # "0", "never": no expiry
            served = [m.name for m in Router(settings).models()]
            wanted = [name for given in args.models or () for name in given.split(",")]
            models = check_models(served, wanted) if args.models else None
            period = parse_duration(args.rotate_every) if args.rotate_every else None
            return (
                await keys.create(
                    account.id,
                    name=args.name,
                    expires_at=expires,
                    models=models,
                    limits={f: getattr(args, f) for f in LIMIT_FIELDS},
                    rotation_period=period,
                )
            ).to_dict()
        if args.action == "revoke":
            return (await keys.revoke(args.id)).to_dict()
        if args.action == "rotate":
            from chatgate.dashboard.services import parse_grace

            grace = parse_grace(args.grace, settings.rotation_grace)  # 0 to 30 days, as the API
            return (await keys.rotate(args.id, grace_seconds=grace)).to_dict()
        account_id = (await accounts.by_email(args.account)).id if args.account else None
        if args.action == "due":
            return [k.to_dict() for k in await keys.due(account_id)]
        return [k.to_dict() for k in await keys.list(account_id)]

    try:
        # A key made here must work on the servers: the same secret as the database's.
        data = asyncio.run(with_engine(settings, run, secret=True))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.action in ("create", "rotate") and not args.json:
        print(table([{**data, **{t: iso(data.get(t)) for t in KEY_TIMES}}], KEY_COLUMNS))
        print(f"\nAPI key (shown once, store it now):\n\n    {data['key']}\n")
        if data.get("grace_cut_short") is not None:
            print(
                "The secret an earlier rotation replaced, which was to work until "
                f"{iso(data['grace_cut_short'])}, stopped working now (one previous secret is "
                "kept)."
            )
        return
    if args.action == "due" and not args.json and not data:
        print("no key is due for rotation")
        return
    _emit(
        args,
        data,
        DUE_COLUMNS
        if args.action == "due"
        else KEY_COLUMNS + (("revoked_at",) if args.action == "revoke" else ()),
        times=KEY_TIMES,
    )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from chatgate.server import serve

    if args.host is not None:  # "" too: refused as CHATGATE_HOST="" is (it listened on the default)
        empty = Given("an address to listen on").problem(args.host)
        if empty is not None:
            raise CLIError(f"--host must be {empty}")
        settings = _replace(settings, host=args.host)
    if args.port is not None:  # 0 too: any free port (the log says which)
        settings = _replace(settings, port=args.port)
    from chatgate.server import ServeError

    if args.no_migrate:  # it would refuse an empty database, after making it (and its folder)
        _refuse_no_sqlite_file(settings)
    try:
        serve(settings, migrate_first=not args.no_migrate, bootstrap=True, workers=args.workers)
    except ServeError as exc:
        raise CLIError(str(exc)) from None


def _replace(settings: Settings, **changes: Any) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def _safe_url(settings: Settings) -> str:
    """The database URL without its password, for messages."""
    url = make_url(settings.effective_database_url)  # as written: postgresql://, not +asyncpg
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatgate", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the API server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-migrate", action="store_true", help="do not migrate at start")
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (N > 1 needs Redis)"
    )
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="create or upgrade the database").set_defaults(func=cmd_migrate)

    acc = sub.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="action", required=True
    )
    p = acc.add_parser("create")
    p.add_argument("email")
    p.add_argument("--plan", default="free")
    p.add_argument("--admin", action="store_true")
    p = acc.add_parser("list")
    p = acc.add_parser("set-plan")
    p.add_argument("email")
    p.add_argument("plan")
    p = acc.add_parser("set-password", help="set the dashboard password (asks for it)")
    p.add_argument("email")
    p.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    for p in acc.choices.values():
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_accounts)

    pl = sub.add_parser("plans", help="manage plans").add_subparsers(dest="action", required=True)
    pl.add_parser("list")
    for action in ("create", "update"):
        p = pl.add_parser(action)
        p.add_argument("name")
        for field in LIMIT_FIELDS:
            p.add_argument(
                "--" + field.replace("_", "-"),
                dest=field,
                type=_limit,
                default=...,
                metavar="N",
                help="a whole number, or 'unlimited'",
            )
    for p in pl.choices.values():
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_plans)

    sc = sub.add_parser("secret", help="the server secret").add_subparsers(
        dest="action", required=True
    )
    sc.add_parser(
        "adopt", help="make this CHATGATE_SECRET the database's (after a clean break)"
    ).set_defaults(func=cmd_secret)

    ks = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    p = ks.add_parser("create")
    p.add_argument("--account", required=True, help="the owner's email")
    p.add_argument("--name", default="")
    p.add_argument("--expires-in", help="e.g. 30d, 12h; 0 or never: no expiry (the default)")
    p.add_argument(  # given twice, both count (QA: the last one alone did, silently)
        "--models",
        action="append",
        help="comma-separated model names this key may use (may be given more than once)",
    )
    p.add_argument("--rotate-every", help="scheduled rotation period, e.g. 90d")
    for field in LIMIT_FIELDS:  # held beside the account's plan, which binds still
        p.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=_limit,
            metavar="N",
            help="a limit of this key's own (default: its plan's alone)",
        )
    p = ks.add_parser("list")
    p.add_argument("--account", help="only this account's keys (email)")
    p = ks.add_parser("due", help="active keys past their rotation period")
    p.add_argument("--account", help="only this account's keys (email)")
    p = ks.add_parser("revoke")
    p.add_argument("id")
    p = ks.add_parser("rotate")
    p.add_argument("id")
    p.add_argument("--grace", help="how long the old secret keeps working, e.g. 24h, 0")
    for p in ks.choices.values():
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_keys)
    add_usage_parser(sub)
    add_models_parser(sub)
    add_chat_parser(sub)
    add_scan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if args.command != "serve":  # migrate's list of migrations: serve's log alone shows it
            logging.getLogger("alembic").setLevel(logging.WARNING)
        # serve shows each migration it runs, not alembic's list of its own plugins (INFO)
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        # Never the SQLite driver's DEBUG: it logs every statement with its values (stored key
        # hashes, password hashes, conversations). DEBUG is chatgate's own detail.
        logging.getLogger("aiosqlite").setLevel(logging.INFO)
        args.func(settings, args)
    except errors.APIError as exc:
        print(f"chatgate: error: {exc.message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"chatgate: error: database: {errors.first_line(exc)}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, OSError) as exc:
        # As an APIError's: a key pasted into an argument is shown as its hint.
        print(f"chatgate: error: {keyfmt.unkeyed(errors.first_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
