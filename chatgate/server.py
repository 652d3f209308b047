"""Running the server process: migrate, first-start bootstrap, then aiohttp on uvloop."""

from __future__ import annotations

import asyncio
import logging

import uvloop
from aiohttp import web

from chatgate.accounts import AccountStore
from chatgate.app import create_app
from chatgate.db.engine import create_engine, migrate
from chatgate.keys.store import IssuedKey, KeyStore
from chatgate.settings import Settings

log = logging.getLogger(__name__)
ADMIN_EMAIL = "admin@localhost"


async def prepare(settings: Settings, *, migrate_first: bool, bootstrap: bool) -> IssuedKey | None:
    """Migrate, and on the very first start create the admin account and one key."""
    engine = create_engine(settings)
    try:
        if migrate_first:
            await migrate(engine)
        if not bootstrap:
            return None
        accounts = AccountStore(engine)
        if await accounts.count():
            return None
        admin = await accounts.create(ADMIN_EMAIL, plan="enterprise", is_admin=True)
        return await KeyStore(engine, settings.resolved_secret()).create(admin.id, name="first key")
    finally:
        await engine.dispose()


def serve(settings: Settings, *, migrate_first: bool = True, bootstrap: bool = True) -> None:
    """Serve until SIGINT/SIGTERM; a graceful stop finishes open requests and flushes state."""
    first = asyncio.run(prepare(settings, migrate_first=migrate_first, bootstrap=bootstrap))
    if first is not None:
        # The one time this key exists outside the caller: print it, never log it.
        print(
            f"chatgate: first start: created the admin account {ADMIN_EMAIL} and an API key.\n"
            "This key is shown once. Store it now, e.g. in an environment variable:\n\n"
            f"    export CHATGATE_API_KEY={first.key}\n",
            flush=True,
        )
    loop = uvloop.new_event_loop()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda text: log.info("%s", text.strip()),
        loop=loop,
        shutdown_timeout=10.0,
    )
