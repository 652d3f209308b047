"""``chatgate scan PATH... [--git] [--revoke] [--json]``: find leaked chatgate keys.

    chatgate scan .                 # files under the current folder (.git skipped)
    chatgate scan . --git           # ... and every commit of the repository's history
    chatgate scan logs/ --revoke    # ... and revoke the live keys found (needs the database)

Reports ``path:line`` (``commit path:line`` for the history) and the key's hint, never the key.
Without ``--revoke`` the scan is offline: it needs no database and no server secret.

Exit status, as secret scanners do for CI: 0 when no key was found, 1 when keys were found
(revoked or not), 2 on an error (an unreadable path is reported and scanning goes on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore
from chatgate.keys.scan import (
    Finding,
    GitError,
    LeakedKey,
    git_toplevel,
    group_by_key,
    scan_git_history,
    scan_paths,
)
from chatgate.keys.store import KeyStore, SecretRevocation
from chatgate.settings import Settings

__all__ = ["add_parser", "cmd_scan"]

EXIT_FOUND = 1
_SAID = {
    "revoked": "revoked",
    "already_revoked": "was already revoked",
    "previous_secret_ended": "an old secret of a rotated key: cut off (the new one still works)",
    "unknown": "not a live key of this server (nothing to do)",
}


def add_parser(subparsers: Any) -> None:
    """Add ``scan`` to the ``chatgate`` command's subparsers."""
    scan = subparsers.add_parser(
        "scan",
        help="find chatgate keys in files and git history (and revoke them)",
        description=(
            "Find chatgate API keys (by format and checksum) in files and, with --git, in a "
            "repository's history. Prints path:line and the key's hint only. "
            "Exit status: 0 none found, 1 keys found, 2 error."
        ),
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to scan")
    scan.add_argument(
        "--git",
        action="store_true",
        help="also scan the history (git log -p --all) of the repositories at PATH",
    )
    scan.add_argument(
        "--revoke",
        action="store_true",
        help="revoke the live keys found (uses this server's database and secret)",
    )
    scan.add_argument("--json", action="store_true")
    scan.set_defaults(func=cmd_scan)


def _write(text: str = "") -> None:
    sys.stdout.write(text + "\n")


async def _revoke(settings: Settings, keys: list[LeakedKey]) -> list[dict[str, Any]]:
    """Revoke each key (by its hash), and describe what was done, owner included."""

    async def run(engine: AsyncEngine) -> list[dict[str, Any]]:
        store = KeyStore.from_settings(engine, settings)
        owners = AccountStore(engine)
        done: list[dict[str, Any]] = []
        for leaked in keys:
            result: SecretRevocation = await store.revoke_by_key(leaked.secret.reveal())
            entry: dict[str, Any] = {"hint": leaked.hint, "action": result.outcome}
            if result.record is not None:
                account = await owners.get(result.record.account_id)
                entry.update(
                    key_id=result.record.id,
                    key_name=result.record.name,
                    account_id=account.id,
                    account_email=account.email,
                )
            done.append(entry)
        return done

    # On a database migrate or serve set up, under its secret (a hash under another finds no
    # key); imported here: chatgate.cli imports this module to build its parser.
    from chatgate.cli import with_engine

    result: list[dict[str, Any]] = await with_engine(settings, run, secret=True)
    return result


def cmd_scan(settings: Settings, args: argparse.Namespace) -> None:
    """Scan, print the findings (and what ``--revoke`` did); exit 1 when keys were found."""
    problems: list[str] = []
    findings: list[Finding] = list(scan_paths(args.paths, problems))
    if args.git:
        repos: dict[str, None] = {}  # each repository once, however many PATHs are in it
        for path in args.paths:
            try:
                repos.setdefault(git_toplevel(path))
            except GitError as exc:
                problems.append(str(exc))
        for repo in repos:
            try:
                findings.extend(scan_git_history(repo))
            except GitError as exc:
                problems.append(str(exc))
    keys = group_by_key(findings)
    actions = asyncio.run(_revoke(settings, keys)) if args.revoke and keys else []

    if args.json:
        report: dict[str, Any] = {
            "findings": [f.to_dict() for f in findings],
            "keys": [{"hint": k.hint, "locations": len(k.findings)} for k in keys],
            "errors": problems,
        }
        if args.revoke:
            report["revocations"] = actions
        _write(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for finding in findings:
            _write(f"{finding.location}: {finding.hint}")
        for problem in problems:
            sys.stderr.write(f"chatgate: scan: {problem}\n")
        if not findings:
            _write("no chatgate keys found")
        else:
            plural = "s" if len(keys) != 1 else ""
            _write(f"\n{len(findings)} finding(s) of {len(keys)} distinct key{plural}")
        for entry in actions:
            owner = (
                f" [key {entry['key_id']} of {entry['account_email']}]" if "key_id" in entry else ""
            )
            _write(f"{entry['hint']}: {_SAID[entry['action']]}{owner}")
        if keys and not args.revoke:
            _write("run again with --revoke to revoke the live ones")
    if keys:
        raise SystemExit(EXIT_FOUND)
    if problems and not findings:
        raise SystemExit(2)
