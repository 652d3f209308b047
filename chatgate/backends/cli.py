"""``chatgate models list | check``: the configured models, and a probe of every deployment.

``check`` builds the router from the same settings the server reads, starts it (the local model
loads), probes every deployment at once (``GET /models`` upstream, within the deployment's
connect and first-byte timeouts) and prints a table, or ``--json``. It exits 1 when any
deployment fails its probe, so it can gate a deploy script. Upstream keys are used, never shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from chatgate.settings import Settings

if TYPE_CHECKING:  # the router (aiohttp) is imported by the commands: every CLI call loads this
    from chatgate.backends.router import DeploymentCheck

CHECK_COLUMNS = ("model", "deployment", "backend", "upstream_model", "ok", "latency_ms", "detail")
LIST_COLUMNS = ("model", "deployment", "backend", "upstream_model", "priority", "weight")


async def run_check(settings: Settings) -> list[DeploymentCheck]:
    """Start a router for ``settings``, probe every deployment, close it."""
    from chatgate.backends.router import Router

    router = Router(settings)
    try:
        await router.start()
        return await router.check()
    finally:
        await router.close()


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_check(settings: Settings, args: argparse.Namespace) -> None:
    from chatgate.cli import table

    results = asyncio.run(run_check(settings))
    rows = [r.to_dict() for r in results]
    if args.json:
        _write(json.dumps(rows, indent=2))
    else:
        _write(table(rows, CHECK_COLUMNS))
    if not all(r.ok for r in results):
        raise SystemExit(1)


def cmd_list(settings: Settings, args: argparse.Namespace) -> None:
    from chatgate.backends.router import Router
    from chatgate.cli import table

    rows = [{k: status.to_dict()[k] for k in LIST_COLUMNS} for status in Router(settings).status()]
    _write(json.dumps(rows, indent=2) if args.json else table(rows, LIST_COLUMNS))


def add_parser(subparsers: Any) -> None:
    """Add ``models list`` and ``models check`` to the ``chatgate`` command's subparsers."""
    models = subparsers.add_parser("models", help="list and check the configured models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every deployment of every public model")
    listing.set_defaults(func=cmd_list)
    check = actions.add_parser(
        "check", help="probe every deployment and print a table (exit 1 if any fails)"
    )
    check.set_defaults(func=cmd_check)
    for parser in (listing, check):
        parser.add_argument("--json", action="store_true")


__all__ = ["add_parser", "run_check"]
