"""Running the server process: migrate, first-start bootstrap, then aiohttp on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from aiohttp import web

from chatgate import errors
from chatgate.accounts import AccountStore, PlanStore
from chatgate.app import SERVER_OPTIONS, create_app
from chatgate.backends.router import Router
from chatgate.db.engine import create_engine, migrate, schema
from chatgate.db.instance import SecretMismatch, bind_secret
from chatgate.keys.store import IssuedKey, KeyStore
from chatgate.ratelimit.resp import RespClient
from chatgate.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESPAWN_DELAY = 1.0  # seconds before replacing a worker that died before it served
ADMIN_EMAIL = "admin@localhost"


async def prepare(
    settings: Settings, *, migrate_first: bool, bootstrap: bool, listen: bool = False
) -> IssuedKey | None:
    """Migrate (or, with ``migrate_first`` off, refuse a database behind this code's
    migrations), refuse a server secret other than the database's (:mod:`chatgate.db.instance`),
    a default plan the database does not hold and, with ``listen``, an address the server
    cannot listen on (:func:`check_listen`), and on the very first start create the admin
    account and one key."""
    engine = create_engine(settings)
    try:
        if migrate_first:
            await migrate(engine)
        else:
            found = await schema(engine)
            if found.state == "behind":  # every query needing the new schema would fail
                raise ServeError(
                    f"{found.lag()}: run `chatgate migrate` first (or serve without --no-migrate)"
                )
        try:
            await bind_secret(engine, settings)
        except SecretMismatch as exc:
            raise ServeError(str(exc)) from None
        try:  # every dashboard sign-up gets it: one that is not there failed each, unlogged
            await PlanStore(engine).get(settings.default_plan)
        except errors.NotFound:
            raise ServeError(
                "CHATGATE_DEFAULT_PLAN (or default_plan in [server]) names no plan in the "
                f"database: `{settings.default_plan[:64]}` (see `chatgate plans list`)"
            ) from None
        if listen:
            check_listen(settings)
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
    if settings.redis_url:  # its URL and TLS files (a CA file that is not there, say)
        RespClient(settings.redis_url)
    for name in sorted({m.api_key_env for m in settings.models if m.api_key_env}):
        if name not in settings.upstream_keys:  # QA: a typo in the variable, no word of it
            log.warning(
                "%s is not set (or empty): the models whose api_key_env names it call their "
                "upstream without a key",
                name,
            )
    first = asyncio.run(
        prepare(settings, migrate_first=migrate_first, bootstrap=bootstrap, listen=True)
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
    # Where the workers share their metrics, so that a scrape (which reaches one) sums them.
    metrics_dir = Path(tempfile.mkdtemp(prefix="chatgate-metrics-"))
    try:
        _supervise(settings, workers, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, workers: int, metrics_dir: Path) -> None:
    """Run ``workers`` processes on the port until SIGTERM/SIGINT (forwarded to them all).

    A worker that dies after it began serving (an OOM kill, a crash) is logged and replaced,
    as gunicorn and uvicorn replace theirs, and so is a replacement that dies before it serves
    (after a second). One of the first workers that fails before it serves is a failed start:
    the others are stopped and the command fails, as one process would. Each worker
    stops when this process dies (even by SIGKILL: the kernel sends it SIGTERM), so a
    supervisor's restart never finds the old workers still serving on the port beside the
    new ones.
    """
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> the read end of its "serving" pipe
    stopping = False

    def spawn() -> int:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: serve, then leave without running the parent's atexit hooks
            # Not the parent's forwarding (a respawned worker is forked after it is set).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for fd in (ready_r, *children.values()):
                os.close(fd)
            code = 0
            try:
                _die_with(parent)
                _run(
                    settings,
                    reuse_port=True,
                    serving=lambda: os.write(ready_w, b"1"),
                    metrics_dir=metrics_dir,
                )
            except OSError as exc:  # the port taken since the check: one line, no traceback
                log.error("worker %d failed: %s", os.getpid(), exc)
                code = 1
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        os.close(ready_w)
        children[pid] = ready_r
        return pid

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    starting = {spawn() for _ in range(workers)}  # the first ones, until each serves
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    while children:
        try:
            pid, status = os.wait()
        except InterruptedError:
            continue
        ready_r = children.pop(pid, None)
        if ready_r is None:
            continue
        os.set_blocking(ready_r, False)
        try:
            served = os.read(ready_r, 1) == b"1"
        except BlockingIOError:
            served = False
        os.close(ready_r)
        code = os.waitstatus_to_exitcode(status)
        first = pid in starting
        starting.discard(pid)
        if stopping:
            failed += code != 0
        elif first and not served:  # the server's start failed, which another would repeat
            failed += 1
            forward(signal.SIGTERM, None)
        else:  # it served, or it replaced one that had (a replacement killed as it starts)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            if served:
                log.error("worker %d stopped (%s); starting another", pid, how)
            else:  # not at once: a cause that lasts (the port taken since) is not a busy loop
                log.error(
                    "worker %d failed to start (%s); starting another in %g s",
                    pid,
                    how,
                    RESPAWN_DELAY,
                )
                time.sleep(RESPAWN_DELAY)  # a stop signal meanwhile runs forward, then we see it
            if stopping:
                continue
            new = spawn()
            if stopping:  # the stop came as it was forked: it missed the forwarding
                os.kill(new, signal.SIGTERM)
    if failed:  # as one process's failure: a supervisor must not read it as a clean stop
        raise ServeError(f"{failed} of {workers} workers failed (see the log above)")


def _die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` dies (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing), and stop now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died between the fork and the call
        os.kill(os.getpid(), signal.SIGTERM)


def check_listen(settings: Settings) -> None:
    """Bind the address the server will listen on, as aiohttp binds it, and let it go: a port
    in use is one line (a :class:`ServeError`), not a traceback from every worker. Bound
    alone, without ``SO_REUSEPORT`` even for ``--workers N`` (whose workers share it after):
    the workers of another ``serve --workers`` on the port let ours in beside them, and the
    two servers split its traffic (QA)."""
    if settings.port == 0:  # any free port
        return
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host lacks: asyncio passes over it too
                continue
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None


def _run(
    settings: Settings,
    *,
    reuse_port: bool,
    serving: Callable[[], object] | None = None,
    metrics_dir: Path | None = None,
) -> None:
    """Serve ``settings`` until a stop signal; ``serving`` is called once it listens."""
    loop = uvloop.new_event_loop()

    def started(text: str) -> None:
        log.info("%s", text.strip())
        if serving is not None and "Running on" in text:
            serving()

    _stop_on_signals(loop)
    web.run_app(
        create_app(settings, metrics_dir=metrics_dir),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=started,
        loop=loop,
        # aiohttp takes 0 for "no limit" (a stalled stream held the stop for the upstream's
        # timeout: QA); the setting's 0 means "cut them off at once".
        shutdown_timeout=settings.shutdown_timeout or 0.001,
        # A client gone cancels its handler: a stream stops reading its upstream and frees its
        # limits at once, not at its next write (or idle timeout) while the upstream is silent.
        handler_cancellation=True,
        reuse_port=reuse_port,
        # aiohttp's default of 128 pending connections drops SYNs in a burst of new clients,
        # and each dropped one costs that client a 1 s retransmission.
        backlog=1024,
        handle_signals=False,  # ours: a second stop signal must not cut the first one's stop
        **SERVER_OPTIONS,
    )


def _stop_on_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Stop gracefully on the first SIGTERM or SIGINT; later ones change nothing (SIGKILL
    cuts a stop short). aiohttp's own handlers raise at each signal, and a second one, which
    arrives during the stop, cancelled the requests it was finishing: each worker of ``serve
    --workers`` gets two when its process group is signalled (systemd's default, Ctrl+C,
    ``timeout``), the group's and its parent's forwarding."""

    def stop() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _ignore)
        raise web.GracefulExit()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


def _ignore() -> None:
    log.info("stopping already: a stop signal is ignored")
