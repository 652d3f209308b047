"""The usage page's data: a period, per-day series by key or model, totals, and the CSV.

Everything is read through :mod:`chatgate.usage.queries` (the rollups), one query per series.
"""

from __future__ import annotations

import calendar
import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.dashboard import charts
from chatgate.usage import queries
from chatgate.usage.tables import DAY, HOUR, cents_up

By = Literal["key", "model", "account"]
PERIODS = (("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"), ("month", "This month"))
MAX_DAYS = 400
CSV_COLUMNS = (
    "date",
    "key_id",
    "key",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "errors",
    "rate_limited",
    "cost",
    "avg_latency_ms",  # blank where no request was timed
)


@dataclass(frozen=True, slots=True)
class Period:
    """Whole UTC days ``[start, end)`` and how the picker names them."""

    start: int
    end: int
    name: str
    note: str = ""
    """What was changed in the range asked for, to say so on the page (empty: nothing)."""

    @property
    def days(self) -> list[int]:
        return list(range(self.start, self.end, DAY))

    @property
    def labels(self) -> list[str]:
        return [time.strftime("%m-%d", time.gmtime(d)) for d in self.days]

    @property
    def query(self) -> str:
        """The query string that asks for this period again."""
        if self.name == "custom":
            return f"from={self.first}&to={self.last}"
        return f"period={self.name}"

    @property
    def first(self) -> str:
        return _date(self.start)

    @property
    def last(self) -> str:
        return _date(self.end - DAY)


def _date(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _parse_date(text: str) -> int | None:
    try:
        return calendar.timegm(time.strptime(text.strip(), "%Y-%m-%d"))
    except ValueError:
        return None


def period_from(query: dict[str, str], *, now: float | None = None) -> Period:
    """The period a request asks for: ``?period=7d|30d|90d|month`` or ``?from=&to=`` dates.

    A range is read as far as it can be, and its :attr:`Period.note` says how: dates given the
    wrong way round are swapped, days after today left out, a range longer than
    :data:`MAX_DAYS` cut to its last days; a date that is not one shows the last 30 days.
    """
    today = int(now if now is not None else time.time()) // DAY * DAY
    asked_from, asked_to = query.get("from", ""), query.get("to", "")
    note = ""
    start_q, end_q = _parse_date(asked_from), _parse_date(asked_to)
    if (asked_from or asked_to) and (start_q is None or end_q is None):
        shown = " to ".join(_quoted(t) for t in (asked_from, asked_to) if t)
        note = f"{shown} is not a range of dates (YYYY-MM-DD): showing the last 30 days."
        query = {}  # the default period
    elif start_q is not None and end_q is not None:
        notes = []
        if start_q > end_q:
            start_q, end_q = end_q, start_q
            notes.append("The dates were the wrong way round: swapped.")
        if end_q > today:
            notes.append("Days after today were left out.")
            end_q = today
            start_q = min(start_q, today)
        if start_q < end_q - (MAX_DAYS - 1) * DAY:
            start_q = end_q - (MAX_DAYS - 1) * DAY
            notes.append(f"A range shows at most {MAX_DAYS} days: its last {MAX_DAYS}.")
        return Period(start_q, end_q + DAY, "custom", " ".join(notes))
    name = query.get("period", "30d")
    if name == "month":
        t = time.gmtime(today)
        return Period(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)), today + DAY, name)
    days = {"7d": 7, "30d": 30, "90d": 90}.get(name)
    if days is None:
        name, days = "30d", 30
    return Period(today - (days - 1) * DAY, today + DAY, name, note)


def _quoted(text: str) -> str:
    """A date as typed, shortened, for a note."""
    return "“" + (text if len(text) <= 20 else text[:20] + "…") + "”"


@dataclass(frozen=True, slots=True)
class UsageView:
    """What the usage page shows."""

    period: Period
    by: By
    totals: queries.UsageRow
    requests_chart: Markup
    tokens_chart: Markup
    errors_chart: Markup
    table: list[tuple[str, queries.UsageRow]]
    daily: list[tuple[str, queries.UsageRow]]


def _series(
    period: Period, rows: Sequence[queries.UsageRow], label: dict[str, str], field: str
) -> dict[str, list[int]]:
    index = {day: i for i, day in enumerate(period.days)}
    out: dict[str, list[int]] = {}
    for row in rows:
        name = label.get(_group(row), _group(row) or "(none)")
        values = out.setdefault(name, [0] * len(index))
        i = index.get(row.bucket_start or 0)
        if i is not None:
            values[i] += int(getattr(row, field))
    return out


def _group(row: queries.UsageRow) -> str:
    return row.key_id or row.model or row.account_id or ""


async def labels_for(
    engine: AsyncEngine, by: By, ids: set[str], emails: dict[str, str] | None = None
) -> dict[str, str]:
    """Display names: ``name (sk-cg-Ab3d…9xYz)`` for keys, emails for accounts."""
    if by == "key":
        names = await queries.key_names(engine, ids)
        return {k: f"{n or 'unnamed'} ({h})" for k, (n, h) in names.items()}
    if by == "account":
        return {a: (emails or {}).get(a, a) for a in ids}
    return {m: m for m in ids}


async def build(
    engine: AsyncEngine,
    period: Period,
    *,
    account_id: str | None,
    by: By,
    emails: dict[str, str] | None = None,
) -> UsageView:
    """Query the rollups and draw the charts for ``period``."""
    rows = await queries.usage_rows(
        engine,
        start=period.start,
        end=period.end,
        group_by=["bucket", by],
        bucket_width=DAY,
        account_id=account_id,
    )
    label = await labels_for(engine, by, {_group(r) for r in rows if _group(r)}, emails)
    what = {"key": "key", "model": "model", "account": "account"}[by]
    index = {day: i for i, day in enumerate(period.days)}
    daily_rows = [queries.total([r for r in rows if r.bucket_start == d]) for d in period.days]
    # Stacked, the two make a day's errors (429s are errors, as in the exports).
    other = [r.errors - r.rate_limited for r in daily_rows]
    limited = [r.rate_limited for r in daily_rows]
    grouped: dict[str, list[queries.UsageRow]] = {}
    for row in rows:
        if row.bucket_start in index:
            grouped.setdefault(_group(row), []).append(row)
    table = sorted(
        ((label.get(g, g or "(none)"), queries.total(rs)) for g, rs in grouped.items()),
        key=lambda item: (-item[1].requests, item[0]),
    )
    return UsageView(
        period=period,
        by=by,
        totals=queries.total(daily_rows),
        requests_chart=charts.stacked_days(
            f"Requests per day by {what}", period.labels, _series(period, rows, label, "requests")
        ),
        tokens_chart=charts.stacked_days(
            f"Tokens per day by {what}",
            period.labels,
            _series(period, rows, label, "total_tokens"),
        ),
        errors_chart=charts.stacked_days(
            "Errors per day (429s and others)",
            period.labels,
            {"other errors": other, "429 rate limited": limited},
            colors=charts.ERROR_COLORS,
            ranked=False,
            empty="No errors in this period",
        ),
        table=table,
        daily=[(_date(d), r) for d, r in zip(period.days, daily_rows, strict=True)],
    )


async def csv_text(engine: AsyncEngine, period: Period, *, account_id: str | None) -> str:
    """One CSV row per day x key x model in ``period`` (keys by id, name and hint)."""
    rows = await queries.usage_rows(
        engine,
        start=period.start,
        end=period.end,
        group_by=["bucket", "key", "model"],
        bucket_width=DAY,
        account_id=account_id,
    )
    names = await queries.key_names(engine, {r.key_id for r in rows if r.key_id})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        name, hint = names.get(r.key_id or "", ("", ""))
        writer.writerow(
            [
                _date(r.bucket_start or 0),
                r.key_id or "",
                _csv_safe(f"{name} ({hint})" if hint else name),
                _csv_safe(r.model or ""),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.total_tokens,
                r.errors,
                r.rate_limited,
                f"{r.cost:.6f}",
                "" if r.avg_latency_ms is None else f"{r.avg_latency_ms:.1f}",
            ]
        )
    return out.getvalue()


_csv_safe = queries.csv_safe  # user-chosen text: a key's name, a model's


@dataclass(frozen=True, slots=True)
class PlanUse:
    """What an account used against its plan: today (rpd) and this calendar month (quota)."""

    requests_today: int
    tokens_today: int
    requests_month: int
    tokens_month: int
    cents_month: int = 0
    """What this month cost at the models' prices, in US cents (rounded up)."""
    admitted_today: int = 0
    """Today's requests the limits took, what the requests-per-day limit counts (not those
    refused before it, a malformed body, or by it, a 429)."""


async def plan_use(engine: AsyncEngine, account_id: str, *, now: float | None = None) -> PlanUse:
    """Today's and this month's sums for ``account_id`` (UTC days and months)."""
    moment = int(now if now is not None else time.time())
    today = moment // DAY * DAY
    t = time.gmtime(moment)
    month = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    # Today's from the hourly rollups, as the requests-per-day limits are seeded: a day's row
    # counts ``admitted`` only since migration 0009 (which filled in the hourly rows alone),
    # and on an upgrade's day it showed fewer requests than the limit counted (QA: 5 of 17).
    by_hour: tuple[queries.Group, ...] = ("bucket",)
    day_rows = await queries.usage_rows(
        engine,
        start=today,
        end=today + DAY,
        group_by=by_hour,
        bucket_width=HOUR,
        account_id=account_id,
    )
    month_rows = await queries.usage_rows(
        engine, start=month, end=today + DAY, account_id=account_id
    )
    day, mon = queries.total(day_rows), queries.total(month_rows)
    cents = cents_up(mon.cost_nanousd)  # the budget's unit
    return PlanUse(
        day.requests, day.total_tokens, mon.requests, mon.total_tokens, cents, day.admitted
    )
