"""Running the server process: migrate, first-start bootstrap, then aiohttp on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import uvloop
from aiohttp import web

from chatgate.accounts import AccountStore
from chatgate.app import SERVER_OPTIONS, create_app
from chatgate.backends.router import Router
from chatgate.db.engine import create_engine, migrate, schema
from chatgate.db.instance import SecretMismatch, check_secret
from chatgate.keys.store import IssuedKey, KeyStore
from chatgate.settings import Settings

log = logging.getLogger(__name__)
ADMIN_EMAIL = "admin@localhost"


async def prepare(
    settings: Settings, *, migrate_first: bool, bootstrap: bool, reuse_port: bool | None = None
) -> IssuedKey | None:
    """Migrate (or, with ``migrate_first`` off, refuse a database behind this code's
    migrations), refuse a server secret other than the database's (:mod:`chatgate.db.instance`)
    and, given ``reuse_port``, an address the server cannot listen on (:func:`check_listen`),
    and on the very first start create the admin account and one key."""
    engine = create_engine(settings)
    try:
        if migrate_first:
            await migrate(engine)
        else:
            found = await schema(engine)
            if found.state == "behind":  # every query needing the new schema would fail
                where = f"at migration {found.revision}" if found.revision else "empty"
                raise ServeError(
                    f"the database is {where}; this chatgate needs migration {found.head}: "
                    "run `chatgate migrate` first (or serve without --no-migrate)"
                )
        try:
            await check_secret(engine, settings.resolved_secret(), settings.secret_previous)
        except SecretMismatch as exc:
            raise ServeError(str(exc)) from None
        if reuse_port is not None:
            check_listen(settings, reuse_port=reuse_port)
        if not bootstrap:
            return None
        accounts = AccountStore(engine)
        if await accounts.count():
            return None
        admin = await accounts.create(ADMIN_EMAIL, plan="enterprise", is_admin=True)
        return await KeyStore.from_settings(engine, settings).create(admin.id, name="first key")
    finally:
        await engine.dispose()


class ServeError(Exception):
    """The server cannot start as asked (reported as one line by the CLI)."""


def serve(
    settings: Settings, *, migrate_first: bool = True, bootstrap: bool = True, workers: int = 1
) -> None:
    """Serve until SIGINT/SIGTERM; a graceful stop finishes open requests and flushes state.

    With ``workers`` > 1, that many processes share the port (SO_REUSEPORT); in-process limits
    would then multiply by N, so Redis is required.
    """
    if workers < 1:
        raise ServeError("--workers must be at least 1")
    if not 0 <= settings.port <= 65535:  # uvloop would bind the number modulo 65536
        raise ServeError(f"the port must be a number from 0 to 65535, not {settings.port}")
    if workers > 1 and not settings.redis_url:
        raise ServeError(
            "--workers N > 1 needs CHATGATE_REDIS_URL: in-process rate limits would be "
            "per process, multiplying every limit by N"
        )
    # Whatever would stop the start is found before the first start makes its admin account:
    # its key, shown once, was printed and then lost with the process that failed. (Every
    # setting is checked when it is read, the model tables here as the app plans them, the
    # address in prepare.)
    Router(settings)
    first = asyncio.run(
        prepare(settings, migrate_first=migrate_first, bootstrap=bootstrap, reuse_port=workers > 1)
    )
    if first is not None:
        # The one time this key exists outside the caller: print it, never log it.
        print(
            f"chatgate: first start: created the admin account {ADMIN_EMAIL} and an API key.\n"
            "This key is shown once. Store it now, e.g. in an environment variable:\n\n"
            f"    export CHATGATE_API_KEY={first.key}\n\n"
            f"To use the dashboard (/dashboard/) as the admin, set a password first:\n"
            f"    chatgate accounts set-password {ADMIN_EMAIL}\n",
            flush=True,
        )
    if workers == 1:
        _run(settings, reuse_port=False)
        return
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, then leave without running the parent's atexit hooks
            code = 0
            try:
                _run(settings, reuse_port=True)
            except OSError as exc:  # the port taken since the check: one line, no traceback
                log.error("worker %d failed: %s", os.getpid(), exc)
                code = 1
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        failed += os.waitstatus_to_exitcode(status) != 0
    if failed:  # as one process's failure: a supervisor must not read it as a clean stop
        raise ServeError(f"{failed} of {workers} workers failed (see the log above)")


def check_listen(settings: Settings, *, reuse_port: bool) -> None:
    """Bind the address the server will listen on, as aiohttp binds it, and let it go: a port
    in use is one line (a :class:`ServeError`), not a traceback from every worker."""
    if settings.port == 0:  # any free port
        return
    try:
        infos = socket.getaddrinfo(
            settings.host or None, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host lacks: asyncio passes over it too
                continue
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None


def _run(settings: Settings, *, reuse_port: bool) -> None:
    loop = uvloop.new_event_loop()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda text: log.info("%s", text.strip()),
        loop=loop,
        shutdown_timeout=settings.shutdown_timeout,
        # A client gone cancels its handler: a stream stops reading its upstream and frees its
        # limits at once, not at its next write (or idle timeout) while the upstream is silent.
        handler_cancellation=True,
        reuse_port=reuse_port,
        # aiohttp's default of 128 pending connections drops SYNs in a burst of new clients,
        # and each dropped one costs that client a 1 s retransmission.
        backlog=1024,
        **SERVER_OPTIONS,
    )
