"""``chatgate usage`` (a report from the rollups) and ``chatgate usage export`` (raw records).

    chatgate usage [--account EMAIL] [--key KEY_ID] [--since 7d] [--by day|key|model]
                   [--format table|csv|json]
    chatgate usage export [--since 30d] [--account EMAIL] [--key KEY_ID] --output FILE|-

Like every command: a readable table by default, errors as one line on stderr with exit 2
(``ValueError`` and API errors, which :func:`chatgate.cli.main` reports).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.settings import Settings
from chatgate.timefmt import iso, parse_duration, until_now
from chatgate.usage.queries import (
    EXPORT_COLUMNS,
    Report,
    csv_safe,
    export_records,
    key_names,
    report,
)
from chatgate.usage.tables import to_nanos, usd_text

NUMBERS = (
    "requests",
    "errors",
    "rate_limited",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",  # of the prompt tokens, read from an upstream's prompt cache
    "cost",
    "avg_latency_ms",  # None (blank, null, "-") where no request was timed
)
FIRST_COLUMNS = {"day": ("day",), "key": ("key_id", "name"), "model": ("model",)}


def add_parser(subparsers: Any) -> None:
    """Add ``usage`` and ``usage export`` to the ``chatgate`` command's subparsers."""
    usage = subparsers.add_parser(
        "usage",
        help="usage reports and exports",
        description="Usage per day, key or model from the rollups, with totals.",
    )
    usage.add_argument(
        "--account", metavar="EMAIL", help="only this account; default: all accounts"
    )
    usage.add_argument("--key", metavar="KEY_ID", help="only this API key (its id)")
    usage.add_argument(
        "--since",
        metavar="DURATION",
        help="how far back, e.g. 24h, 7d (default 7d; 30d for export)",
    )
    usage.add_argument("--by", choices=("day", "key", "model"), default="day")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.set_defaults(func=cmd_usage)
    actions = usage.add_subparsers(dest="usage_action", metavar="{export}")
    export = actions.add_parser(
        "export",
        help="write raw usage records as CSV",
        description="Raw usage records (one per request) as CSV. --account, --key and --since "
        "go before or after 'export'.",
    )
    # Own dests: argparse copies a subcommand's defaults over the parent's same-named options.
    # Those given before 'export' count too (QA: they were dropped, and every account exported).
    export.add_argument("--since", dest="export_since", metavar="DURATION", help="default 30d")
    export.add_argument(
        "--account", dest="export_account", metavar="EMAIL", help="only this account"
    )
    export.add_argument("--key", dest="export_key", metavar="KEY_ID", help="only this API key")
    export.add_argument("--output", "-o", required=True, help="a file, or - for stdout")
    export.set_defaults(func=cmd_usage_export)


async def _account_id(engine: AsyncEngine, email: str | None) -> str | None:
    if not email:
        return None
    from chatgate.accounts import AccountStore

    return (await AccountStore(engine).by_email(email)).id


def cmd_usage(settings: Settings, args: argparse.Namespace) -> None:
    """Print the report (``--format``), with a totals row for table and CSV."""
    # Imported here: chatgate.cli imports this module to build its parser.
    from chatgate.cli import table, with_engine

    span = parse_duration(args.since or "7d")
    end = until_now()

    async def run(engine: AsyncEngine) -> tuple[Report, dict[str, tuple[str, str]]]:
        account_id = await _scope(engine, args.account, args.key)
        result = await report(
            engine, start=end - span, end=end, by=args.by, account_id=account_id, key_id=args.key
        )
        names = await key_names(engine, {r.key_id for r in result.rows if r.key_id})
        return result, names

    result, names = asyncio.run(with_engine(settings, run))
    if args.format == "json":
        _out(json.dumps(_json(result, args.by, names), indent=2))
        return
    columns = (*FIRST_COLUMNS[args.by], *NUMBERS)
    rows = [_flat(r.to_dict(), args.by, names) for r in result.rows]
    totals = {**{c: "" for c in FIRST_COLUMNS[args.by]}, **_numbers(result.totals.to_dict())}
    totals[FIRST_COLUMNS[args.by][0]] = "total"
    if args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        # Names and models are user-chosen: none may be a spreadsheet formula.
        writer.writerows([*({k: _cell(v) for k, v in r.items()} for r in rows), totals])
        sys.stdout.write(out.getvalue())
        return
    # Costs as the dashboard shows them (rounded up, so a cheap model's is not $0.0000: QA
    # read 0.0001 here against $0.0002 there); CSV and JSON keep them exact.
    shown = [
        {**r, "cost": usd_text(to_nanos(r["cost"])), "avg_latency_ms": _ms(r["avg_latency_ms"])}
        for r in [*rows, totals]
    ]
    named = [f"account {args.account}"] * bool(args.account) + [f"key {args.key}"] * bool(args.key)
    scope = f" for {' and '.join(named)}" if named else " (all accounts)"
    _out(f"usage {iso(end - span)} .. {iso(end)}{scope}")
    _out(table(shown, columns))


async def _scope(engine: AsyncEngine, email: str | None, key: str | None) -> str | None:
    """The account id of ``--account`` (report and export alike); an unknown key is a 404."""
    account_id = await _account_id(engine, email)
    if key and not await key_names(engine, {key}):
        raise errors.NotFound(f"No key with the id `{key}` (see `chatgate keys list`).")
    return account_id


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _numbers(data: dict[str, Any]) -> dict[str, Any]:
    return {n: data[n] for n in NUMBERS}


def _flat(data: dict[str, Any], by: str, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    row: dict[str, Any] = _numbers(data)
    if by == "day":
        row["day"] = iso(data["bucket_start"])[:10]
    elif by == "key":
        row["key_id"] = data["key_id"] or "-"
        row["name"] = names.get(data["key_id"] or "", ("", ""))[0]
    else:
        row["model"] = data["model"] or "-"
    return row


def _json(result: Report, by: str, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        "start_time": result.start,
        "end_time": result.end,
        "by": by,
        "data": [_flat(r.to_dict(), by, names) for r in result.rows],
        "totals": _numbers(result.totals.to_dict()),
    }


def _once(args: argparse.Namespace, name: str) -> str | None:
    """An export option given before 'export' or after it; both, and different: an error."""
    before: str | None = getattr(args, name)
    after: str | None = getattr(args, f"export_{name}")
    if before is not None and after is not None and before != after:
        raise errors.InvalidRequest(
            f"--{name} given twice, before and after 'export': give it once"
        )
    return after if after is not None else before


def cmd_usage_export(settings: Settings, args: argparse.Namespace) -> None:
    """Write raw records as CSV to ``--output`` (a file written whole, then renamed, or ``-``)."""
    from chatgate.cli import with_engine

    span = parse_duration(_once(args, "since") or "30d")
    account, key = _once(args, "account"), _once(args, "key")
    end = until_now()

    async def run(engine: AsyncEngine, out: IO[str]) -> int:
        account_id = await _scope(engine, account, key)
        writer = csv.DictWriter(out, fieldnames=("time", *EXPORT_COLUMNS), lineterminator="\n")
        writer.writeheader()
        count = 0
        async for rec in export_records(  # the window of `chatgate usage --since`
            engine, start=end - span, end=end, account_id=account_id, key_id=key
        ):
            cells = {k: _cell(v) for k, v in rec.items()}  # model, ids: user-chosen text
            writer.writerow({"time": _iso_seconds(rec["created_at"]), **cells})
            count += 1
        return count

    if args.output == "-":
        try:
            asyncio.run(with_engine(settings, lambda engine: run(engine, sys.stdout)))
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader stopped early (``| head``): not an error. Point stdout at /dev/null
            # so the interpreter's own flush at exit does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    target = Path(args.output)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as fh:
            count = asyncio.run(with_engine(settings, lambda engine: run(engine, fh)))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _out(f"{count} usage records written to {target}")


def _cell(value: Any) -> Any:
    """A CSV cell: text that a spreadsheet would run as a formula is escaped (numbers are not;
    ``-``, the report's "none", is no formula)."""
    return csv_safe(value) if isinstance(value, str) and value != "-" else value


def _iso_seconds(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


__all__ = ["add_parser", "cmd_usage", "cmd_usage_export"]
