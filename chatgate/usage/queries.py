"""Usage reports, read from the rollups (never the raw table), and the raw export.

A time range ``[start, end)`` is answered to the second: its whole minutes from the rollups,
covered by the coarsest buckets that fit inside them (whole days in the middle, whole hours
next to them, minutes at the edges; see :func:`cover`), and the part-minutes at its two ends
from the raw records (at most two minutes of them, on the ``created_at`` index). So a report
over any range reads a few hundred rollup rows at most, equals the sum of the raw records in
it, and ranges that meet add up to their union. (A part-minute older than the raw records'
retention reads as empty: the rollups cannot split a minute.)

Scope: every query takes ``account_id``; ``None`` means every account (admins only — the
callers decide that). Records without an account (rejected before authentication) are stored
under ``""`` and reported with ``account_id`` ``None``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.db.tables import accounts, api_keys, plans
from chatgate.usage.tables import (
    DAY,
    HOUR,
    MINUTE,
    ROLLUP_SUMS,
    WIDTHS,
    to_usd,
    usage_records,
    usage_rollups,
)

Group = Literal["bucket", "account", "key", "model", "endpoint"]
By = Literal["day", "key", "model"]
EXPORT_COLUMNS = (
    "request_id",
    "created_at",
    "account_id",
    "key_id",
    "model",
    "backend",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cost",
    "latency_ms",
    "ttft_ms",
    "status",
    "error_code",
    "conversation_id",
    "streamed",
)
_GROUP_COLUMNS = {
    "account": "account_id",
    "key": "key_id",
    "model": "model",
    "endpoint": "endpoint",
}


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: one beginning like a formula
    (``=``, ``+``, ``-``, ``@``, tab, CR; OWASP's CSV injection) gets a leading ``'``."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Sums for one group; a field not grouped by is ``None``."""

    bucket_start: int | None
    account_id: str | None
    key_id: str | None
    model: str | None
    endpoint: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nanousd: int  # exact; ``cost`` is the same in US dollars
    errors: int  # answers with status >= 400 (rate-limited ones included)
    rate_limited: int  # answers with status 429
    latency_ms_sum: float = 0.0  # of the timed requests (see usage.tables.usage_rollups)
    timed_requests: int = 0
    admitted: int = 0  # requests the limits let through (what a restart seeds them with)
    cached_tokens: int = 0  # of prompt_tokens, read from an upstream's prompt cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def avg_latency_ms(self) -> float | None:
        """The requests' mean latency, first byte in to last byte out (None: none timed)."""
        return self.latency_ms_sum / self.timed_requests if self.timed_requests else None

    @property
    def cost(self) -> float:
        return to_usd(self.cost_nanousd)

    @property
    def succeeded(self) -> int:
        return self.requests - self.errors

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total_tokens"] = self.total_tokens
        out["cost"] = self.cost
        out["avg_latency_ms"] = self.avg_latency_ms
        for raw in ("cost_nanousd", "latency_ms_sum", "timed_requests", "admitted"):
            del out[raw]
        return out


@dataclass(frozen=True, slots=True)
class Report:
    """Rows of a report and their totals (a row with every group field ``None``)."""

    start: int
    end: int
    rows: list[UsageRow]
    totals: UsageRow

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_time": self.start,
            "end_time": self.end,
            "data": [r.to_dict() for r in self.rows],
            "totals": self.totals.to_dict(),
        }


def cover(start: int, end: int, max_width: int = DAY) -> list[tuple[int, int, int]]:
    """``(width, lo, hi)`` segments of rollup buckets that exactly tile the whole minutes of
    ``[start, end)`` (:func:`whole_minutes`). Only widths up to ``max_width`` are used, so
    every bucket read lies inside one output bucket of that width."""
    lo, hi = whole_minutes(start, end)
    return _cover(lo, hi, sorted((w for w in WIDTHS if w <= max_width), reverse=True))


def whole_minutes(start: int, end: int) -> tuple[int, int]:
    """The whole minutes inside ``[start, end)``: ``lo`` its first minute's start (``start``
    up to a minute), ``hi`` the end of its last (``end`` down to one); ``lo >= hi`` when it
    holds none."""
    return -(-start // MINUTE) * MINUTE, end - end % MINUTE


def part_minutes(start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` outside its whole minutes: what the raw records answer.
    (Rounded to whole minutes, ranges that met inside a minute both counted it: QA's two
    adjacent hours held one minute's 1,500 requests twice.)"""
    if start >= end:
        return []
    lo, hi = whole_minutes(start, end)
    if lo >= hi:  # no whole minute: one part, or two if it spans a minute's start
        return [(a, b) for a, b in ((start, min(lo, end)), (max(lo, start), end)) if a < b]
    return [(a, b) for a, b in ((start, lo), (hi, end)) if a < b]


def _cover(start: int, end: int, widths: Sequence[int]) -> list[tuple[int, int, int]]:
    if start >= end or not widths:
        return []
    width, finer = widths[0], widths[1:]
    lo = -(-start // width) * width
    hi = end // width * width
    if lo >= hi:
        return _cover(start, end, finer)
    return [*_cover(start, lo, finer), (width, lo, hi), *_cover(hi, end, finer)]


_SUM_TYPE: dict[str, Callable[[Any], Any]] = {
    name: float if isinstance(usage_rollups.c[name].type, sa.Float) else int for name in ROLLUP_SUMS
}
"""Each rollup sum's Python type: the fields of :class:`UsageRow` a report fills, by name."""


def _sum_row(group: dict[str, Any], sums: Sequence[Any]) -> UsageRow:
    """A report's row: its group's values and the sums (in :data:`ROLLUP_SUMS` order)."""

    def text(value: Any) -> str | None:
        return value or None  # "" (no account/key/model) reads as None

    return UsageRow(
        bucket_start=group.get("bucket"),
        account_id=text(group.get("account")),
        key_id=text(group.get("key")),
        model=group.get("model"),
        endpoint=group.get("endpoint"),
        **{
            name: _SUM_TYPE[name](value or 0) for name, value in zip(ROLLUP_SUMS, sums, strict=True)
        },
    )


def total(rows: Sequence[UsageRow]) -> UsageRow:
    """The sum of ``rows`` (group fields ``None``)."""
    return UsageRow(
        bucket_start=None,
        account_id=None,
        key_id=None,
        model=None,
        endpoint=None,
        **{name: sum(getattr(r, name) for r in rows) for name in ROLLUP_SUMS},
    )


async def usage_rows(
    engine: AsyncEngine,
    *,
    start: int,
    end: int,
    group_by: Collection[Group] = (),
    bucket_width: int = DAY,
    account_id: str | None,
    key_ids: Collection[str] | None = None,
    models: Collection[str] | None = None,
    endpoints: Collection[str] | None = None,
) -> list[UsageRow]:
    """Sums over ``[start, end)`` grouped by ``group_by``, in one query: the whole minutes from
    the rollups, the part-minutes at the ends from the raw records (see the module's
    docstring).

    ``bucket`` groups by time buckets of ``bucket_width`` seconds (aligned to UTC; ``bucket_start``
    is the aligned start). ``account_id=None`` reads every account. Rows come sorted by group.
    """
    if bucket_width not in WIDTHS:
        raise ValueError(f"bucket_width must be one of {WIDTHS}")
    segments = cover(start, end, bucket_width if "bucket" in group_by else DAY)
    parts = part_minutes(start, end)
    if not segments and not parts:
        return []
    # The width goes in as a literal: PostgreSQL matches the GROUP BY expression to the
    # selected one by text, and two bind parameters ($1, $2) would not match.
    width: sa.ColumnElement[int] = sa.literal_column(str(int(bucket_width)))
    names = [n for n in ("bucket", "account", "key", "model", "endpoint") if n in group_by]
    selects: list[sa.Select[Any]] = []
    if segments:
        t = usage_rollups
        groups: dict[str, sa.ColumnElement[Any]] = {
            n: t.c[_GROUP_COLUMNS[n]] for n in names if n != "bucket"
        }
        groups["bucket"] = t.c.bucket_start - t.c.bucket_start % width
        where = [
            sa.or_(
                *(
                    sa.and_(t.c.width == w, t.c.bucket_start >= lo, t.c.bucket_start < hi)
                    for w, lo, hi in segments
                )
            ),
            *_filters(t, account_id, key_ids, models, endpoints),
        ]
        sums = [sa.func.sum(t.c[s]) for s in ROLLUP_SUMS]
        selects.append(_grouped(names, groups, sums, where))
    if parts:
        r = usage_records
        groups = {n: r.c[_GROUP_COLUMNS[n]] for n in names if n != "bucket"}
        for n in ("account", "key"):  # stored as NULL raw, as "" in the rollups
            if n in groups:
                groups[n] = sa.func.coalesce(groups[n], "")
        groups["bucket"] = r.c.created_at - r.c.created_at % width
        where = [
            sa.or_(*(sa.and_(r.c.created_at >= a, r.c.created_at < b) for a, b in parts)),
            *_filters(r, account_id, key_ids, models, endpoints),
        ]
        selects.append(_grouped(names, groups, _raw_sums(r), where))
    union = selects[0] if len(selects) == 1 else sa.union_all(*selects)
    both = union.subquery()
    outer = [both.c[n] for n in names]
    stmt = (
        sa.select(*outer, *(sa.func.sum(both.c[s]) for s in ROLLUP_SUMS))
        .group_by(*outer)
        .order_by(*outer)
    )
    async with engine.connect() as conn:
        result = await conn.execute(stmt)
        out = []
        for row in result:
            group = dict(zip(names, row[: len(names)], strict=True))
            out.append(_sum_row(group, row[len(names) :]))
    return out


def _filters(
    table: sa.Table,
    account_id: str | None,
    key_ids: Collection[str] | None,
    models: Collection[str] | None,
    endpoints: Collection[str] | None,
) -> list[sa.ColumnElement[bool]]:
    """The report's filters on ``table`` (the rollups or the raw records: same column names)."""
    out: list[sa.ColumnElement[bool]] = []
    if account_id is not None:
        out.append(table.c.account_id == account_id)
    if key_ids is not None:
        out.append(table.c.key_id.in_(list(key_ids)))
    if models is not None:
        out.append(table.c.model.in_(list(models)))
    if endpoints is not None:
        out.append(table.c.endpoint.in_(list(endpoints)))
    return out


def _grouped(
    names: Sequence[str],
    groups: dict[str, sa.ColumnElement[Any]],
    sums: Sequence[sa.ColumnElement[Any]],
    where: Sequence[sa.ColumnElement[bool]],
) -> sa.Select[Any]:
    """One side of a report: its group columns (labelled by name) and sums (by sum name)."""
    keys = [groups[n].label(n) for n in names]
    labelled = [expr.label(name) for expr, name in zip(sums, ROLLUP_SUMS, strict=True)]
    return sa.select(*keys, *labelled).where(*where).group_by(*(groups[n] for n in names))


def _raw_sums(r: sa.Table) -> list[sa.ColumnElement[Any]]:
    """The rollups' sums (:data:`ROLLUP_SUMS`, in order) over raw records, as the writer
    adds them up (``chatgate.usage.batch``)."""

    def count_of(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    sums = {
        "requests": sa.func.count(),
        "prompt_tokens": sa.func.sum(r.c.prompt_tokens),
        "completion_tokens": sa.func.sum(r.c.completion_tokens),
        "cost_nanousd": sa.func.sum(r.c.cost_nanousd),
        "errors": count_of(r.c.status >= 400),
        "rate_limited": count_of(r.c.status == 429),
        "latency_ms_sum": sa.func.sum(r.c.latency_ms),
        "timed_requests": sa.func.count(),
        "admitted": count_of(r.c.admitted.is_(True)),
        "cached_tokens": sa.func.sum(r.c.cached_tokens),
    }
    assert tuple(sums) == ROLLUP_SUMS, "the rollup columns changed: update the sums here"
    return list(sums.values())


Change = tuple[str, str]
"""An invalidation feed event that can change limits: ``("account", id)`` or ``("plan", id)``
(a key's own limits are set once, when it is made)."""


def _accounts_changed(change: Change) -> sa.ColumnElement[bool]:
    """The rollup rows of the accounts a change touches: the account, or every account on the
    plan (each an index range of the rollups, by account)."""
    kind, ref = change
    t = usage_rollups
    if kind == "plan":
        plan_id = int(ref) if ref.isascii() and ref.isdigit() else -1
        return t.c.account_id.in_(sa.select(accounts.c.id).where(accounts.c.plan_id == plan_id))
    return t.c.account_id == ref


async def _limited_sums(
    engine: AsyncEngine,
    limit: str,
    width: int,
    start: int,
    total: sa.ColumnElement[Any],
    *by: sa.ColumnElement[Any],
    change: Change | None = None,
) -> tuple[list[Any], list[Any]]:
    """``total`` summed over the rollups of ``width`` since ``start``, grouped also ``by``:
    rows (id, the limit, *by, sum) of the accounts whose plan sets ``limit`` (a column of
    ``plans``), and of the keys that set it themselves (the same column of ``api_keys``); with
    ``change``, only those of the accounts it touches."""
    t = usage_rollups
    recent = [t.c.width == width, t.c.bucket_start >= start]
    if change is not None:
        recent.append(_accounts_changed(change))
    by_account = (
        sa.select(t.c.account_id, plans.c[limit], *by, total)
        .join(accounts, accounts.c.id == t.c.account_id)
        .join(plans, plans.c.id == accounts.c.plan_id)
        .where(*recent, plans.c[limit].is_not(None))
        .group_by(t.c.account_id, plans.c[limit], *by)
    )
    by_key = (
        sa.select(t.c.key_id, api_keys.c[limit], *by, total)
        .join(api_keys, api_keys.c.id == t.c.key_id)
        .where(*recent, api_keys.c[limit].is_not(None))
        .group_by(t.c.key_id, api_keys.c[limit], *by)
    )
    async with engine.connect() as conn:
        account_rows = list(await conn.execute(by_account))
        key_rows = list(await conn.execute(by_key))
    return account_rows, key_rows


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """Tokens recorded since a time, of the accounts whose plan has a monthly quota and of the
    keys with one of their own (what the quota counters must hold)."""

    accounts: dict[str, int]
    keys: dict[str, int]


async def quota_usage(engine: AsyncEngine, start: int, change: Change | None = None) -> QuotaUsage:
    """Prompt plus completion tokens recorded since ``start`` (a month's first second: whole
    days of the rollups), per account on a plan with a monthly quota and per key with a quota
    of its own (with ``change``, of what it touches); two grouped queries over the daily
    rollups."""
    t = usage_rollups
    used = sa.func.sum(t.c.prompt_tokens + t.c.completion_tokens)
    found = await _limited_sums(engine, "monthly_tokens", DAY, start, used, change=change)
    return QuotaUsage(*({str(ident): int(n) for ident, _, n in rows} for rows in found))


async def budget_usage(engine: AsyncEngine, start: int, change: Change | None = None) -> QuotaUsage:
    """What was spent since ``start`` (a month's first second), in nano-dollars, per account
    on a plan with a monthly budget and per key with a budget of its own (with ``change``, of
    what it touches); two grouped queries over the daily rollups."""
    spent = sa.func.sum(usage_rollups.c.cost_nanousd)
    found = await _limited_sums(engine, "monthly_budget_cents", DAY, start, spent, change=change)
    return QuotaUsage(*({str(ident): int(n) for ident, _, n in rows} for rows in found))


@dataclass(frozen=True, slots=True)
class HourlyRequests:
    """Requests admitted per hour since a time, of the accounts whose plan has a daily limit
    and of the keys with one of their own: per id, the limit and (hour start, requests)."""

    accounts: dict[str, tuple[int, list[tuple[int, int]]]]
    keys: dict[str, tuple[int, list[tuple[int, int]]]]


async def hourly_requests(
    engine: AsyncEngine, start: int, change: Change | None = None
) -> HourlyRequests:
    """Requests the limits admitted per hour since ``start`` (an hour's first second): not
    those they refused (a 429 took nothing) nor those refused before them (a 400, 403, 404,
    413: never charged either), per account on a plan with a daily limit and per key with one
    of its own (with ``change``, of what it touches); two grouped queries over the hourly
    rollups."""
    t = usage_rollups
    taken = sa.func.sum(t.c.admitted)
    found: list[dict[str, tuple[int, list[tuple[int, int]]]]] = []
    sums = await _limited_sums(engine, "rpd", HOUR, start, taken, t.c.bucket_start, change=change)
    for rows in sums:
        per_id: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        for ident, limit, hour, count in rows:
            per_id.setdefault(str(ident), (int(limit), []))[1].append((int(hour), int(count)))
        found.append(per_id)
    return HourlyRequests(*found)


async def report(
    engine: AsyncEngine,
    *,
    start: int,
    end: int,
    by: By = "day",
    account_id: str | None,
    key_id: str | None = None,
) -> Report:
    """The CLI's report: one row per day, key or model, with totals."""
    group: dict[By, list[Group]] = {"day": ["bucket"], "key": ["key"], "model": ["model"]}
    rows = await usage_rows(
        engine,
        start=start,
        end=end,
        group_by=group[by],
        bucket_width=DAY,
        account_id=account_id,
        key_ids=None if key_id is None else [key_id],
    )
    return Report(start, end, rows, total(rows))


async def key_names(engine: AsyncEngine, key_ids: Collection[str]) -> dict[str, tuple[str, str]]:
    """``{key_id: (name, hint)}`` for display (hints are safe to show; keys are never stored)."""
    if not key_ids:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.hint).where(
                api_keys.c.id.in_(list(key_ids))
            )
        )
        return {r.id: (r.name, r.hint) for r in rows}


async def export_records(
    engine: AsyncEngine,
    *,
    start: int,
    end: int,
    account_id: str | None,
    key_id: str | None = None,
    page_size: int = 5_000,
) -> AsyncIterator[dict[str, Any]]:
    """Raw records in ``[start, end)`` by time, as dicts with :data:`EXPORT_COLUMNS`.

    Read in pages (keyset on ``created_at, request_id``) so a large export holds one page in
    memory and no long-running cursor or transaction.
    """
    t = usage_records
    after: tuple[int, str] | None = None
    while True:
        conditions: list[sa.ColumnElement[bool]] = [t.c.created_at >= start, t.c.created_at < end]
        if account_id is not None:
            conditions.append(t.c.account_id == account_id)
        if key_id is not None:
            conditions.append(t.c.key_id == key_id)
        if after is not None:
            conditions.append(sa.tuple_(t.c.created_at, t.c.request_id) > sa.tuple_(*after))
        stmt = (
            sa.select(t)
            .where(*conditions)
            .order_by(t.c.created_at, t.c.request_id)
            .limit(page_size)
        )
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        for row in rows:
            out = dict(row)
            out["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
            out["cost"] = to_usd(row["cost_nanousd"])
            yield {c: out[c] for c in EXPORT_COLUMNS}
        if len(rows) < page_size:
            return
        after = (rows[-1]["created_at"], rows[-1]["request_id"])


__all__ = [
    "EXPORT_COLUMNS",
    "Change",
    "HourlyRequests",
    "QuotaUsage",
    "Report",
    "UsageRow",
    "budget_usage",
    "cover",
    "csv_safe",
    "export_records",
    "hourly_requests",
    "key_names",
    "quota_usage",
    "report",
    "total",
    "usage_rows",
]
