"""The SQL of one usage batch: each record inserted once, its rollups added in the same
transaction.

Plain SQL text built once per dialect from the table definitions, whatever the batch size;
the rows travel as ONE parameter, a JSON array of arrays (orjson writes it in ~0.3 us a row;
the database unpacks it in C). Compiling a many-row ``insert().values([...])`` through
SQLAlchemy, as before, cost ~200 us of CPU per record (as much as serving the request);
binding one parameter per value cost ~5-15 us.

PostgreSQL takes the batch in ONE statement: the insert's RETURNING feeds the rollup upsert
in the same statement, so the new rows' ids never come back to Python and the rollups are
summed by the database. Done in Python (as SQLite still does: it has no data-modifying
CTE), reading 500 ids back and summing them cost ~3 us a record on the event loop.

PostgreSQL first tries a faster way for a batch, the usual one: ``COPY`` of the rows in binary
(asyncpg encodes them in C) inside a savepoint, then the upsert of rollups summed in Python.
The database spends half the CPU on it (4.2 against 9.5 ms of backend time a 500-row batch,
measured): no JSON to parse, no conflict check per row, the rows written in bulk. Only a
batch the ``COPY`` refuses (a request id already stored, as when a batch is written again
after a lost commit; a text longer than its column; a NUL) goes the general way, the
statement above, after the savepoint is rolled back: what is stored is the same either way.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from chatgate.usage.record import UsageRecord
from chatgate.usage.tables import (
    MINUTE,
    ROLLUP_SUMS,
    WIDTHS,
    to_nanos,
    usage_records,
    usage_rollups,
)

RECORD_COLUMNS: tuple[str, ...] = tuple(c.name for c in usage_records.c)
ROLLUP_KEY: tuple[str, ...] = tuple(c.name for c in usage_rollups.primary_key.columns)
ROLLUP_COLUMNS = ROLLUP_KEY + ROLLUP_SUMS
_SQL: dict[tuple[str, str], str] = {}


def _check_dialect(conn: AsyncConnection) -> str:
    name = conn.dialect.name
    if name not in ("postgresql", "sqlite"):
        raise RuntimeError(f"usage recording supports SQLite and PostgreSQL, not {name}")
    return name


def _rows_from_json(dialect: str, table: sa.Table, columns: Sequence[str]) -> str:
    """``SELECT`` of ``columns`` (typed) from the JSON array of arrays bound as the parameter.

    Text is cut to its column's length here, by the database: PostgreSQL's explicit cast to
    ``VARCHAR(n)`` truncates (the SQL standard's rule), SQLite takes a ``substr`` (it would
    store any length). So no value can make a batch fail for good, nor differ between the two.

    PostgreSQL reads the parameter as ``jsonb``: parsed once, each row's ``->>`` is then an
    index into it; as ``json`` each of a row's 16 ``->>`` parsed the row's text again, and
    the statement took twice the database's time (7.5 -> 3.9 ms a 500-row batch, measured
    on the benchmark's PostgreSQL). ``jsonb`` cannot hold a NUL: :func:`write_batch` takes
    NULs out first, as it must for PostgreSQL text anyway.
    """
    if dialect == "postgresql":
        pg = postgresql.dialect()  # type: ignore[no-untyped-call]
        values = ", ".join(
            f"(x->>{i})::{table.c[name].type.compile(dialect=pg)}" for i, name in enumerate(columns)
        )
        return f"SELECT {values} FROM jsonb_array_elements($1::jsonb) AS x"  # noqa: S608 - our columns
    picks = []
    for i, name in enumerate(columns):
        value = f"json_extract(value, '$[{i}]')"
        length = getattr(table.c[name].type, "length", None)
        picks.append(f"substr({value}, 1, {length})" if length else value)
    # "WHERE true": without a WHERE, SQLite would read the ON CONFLICT as part of a join.
    return f"SELECT {', '.join(picks)} FROM json_each(?) WHERE true"  # noqa: S608 - our columns


def _records_insert(dialect: str, returning: str) -> str:
    """Insert the raw rows bound as JSON, skipping request ids already stored."""
    source = _rows_from_json(dialect, usage_records, RECORD_COLUMNS)
    return (
        f"INSERT INTO {usage_records.name} ({', '.join(RECORD_COLUMNS)}) {source} "
        f"ON CONFLICT (request_id) DO NOTHING RETURNING {returning}"
    )


def _rollups_upsert(source: str) -> str:
    """Add the rollup increments ``source`` selects (one row per primary key)."""
    table = usage_rollups.name
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in ROLLUP_SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}) {source} "
        f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {updates}"
    )


# What the insert returns of the rows it really added: what their rollups are summed from.
_ADDED = (
    "created_at",
    "account_id",
    "key_id",
    "model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanousd",
    "status",
    "latency_ms",
    "admitted",
    "cached_tokens",
)


def _insert_sql(dialect: str) -> str:
    """Insert raw rows, skipping request ids already stored; returns :data:`_ADDED` of each
    row added."""
    sql = _SQL.get(("records", dialect))
    if sql is None:
        sql = _SQL["records", dialect] = _records_insert(dialect, ", ".join(_ADDED))
    return sql


def _upsert_sql(dialect: str) -> str:
    """Add rollup increments (one row per primary key, see :func:`_rollups`)."""
    sql = _SQL.get(("rollups", dialect))
    if sql is None:
        source = _rows_from_json(dialect, usage_rollups, ROLLUP_COLUMNS)
        sql = _SQL["rollups", dialect] = _rollups_upsert(source)
    return sql


def _row(rec: UsageRecord) -> tuple[Any, ...]:
    """One ``usage_records`` row, in :data:`RECORD_COLUMNS` order (text is cut to its column
    by the insert itself, see :func:`_rows_from_json`)."""
    return (
        rec.request_id,
        int(rec.created_at),
        rec.account_id,
        rec.key_id,
        rec.model,
        rec.backend,
        rec.endpoint,
        int(rec.prompt_tokens),
        int(rec.completion_tokens),
        to_nanos(rec.cost),
        float(rec.latency_ms),
        None if rec.ttft_ms is None else float(rec.ttft_ms),
        int(rec.status),
        rec.error_code,
        rec.conversation_id,
        bool(rec.streamed),
        bool(rec.admitted),
        int(rec.cached_tokens),
    )


def _without_nul(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with NUL characters taken out of its text (PostgreSQL text cannot hold one)."""
    return tuple(v.replace("\x00", "") if isinstance(v, str) else v for v in row)


def _sum_minutes(
    minutes: dict[tuple[Any, ...], list[float]], added: Iterable[Sequence[Any]]
) -> None:
    """Add the rows ``added`` (each as :data:`_ADDED`) to ``minutes``: one dict lookup a row."""
    for ts, acct, kid, model, endpoint, prompt, output, cost, status, ms, took, cached in added:
        key = (ts - ts % MINUTE, acct or "", kid or "", model, endpoint)
        acc = minutes.get(key)
        if acc is None:
            acc = minutes[key] = [0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0]
        acc[0] += 1
        acc[1] += prompt
        acc[2] += output
        acc[3] += cost
        acc[4] += status >= 400
        acc[5] += status == 429
        acc[6] += ms
        acc[7] += 1
        acc[8] += took
        acc[9] += cached


def _increments(minutes: dict[tuple[Any, ...], list[float]]) -> list[tuple[Any, ...]]:
    """Rollup increments (in :data:`ROLLUP_COLUMNS` order) of the per-minute sums ``minutes``.

    Each minute is added into its hour and day (every width is a multiple of a minute): one row
    per bucket x account x key x model x endpoint, however many requests a batch holds. Sorted
    by primary key (text in code point order, as the PostgreSQL statement sorts), so concurrent
    writers lock rollup rows in the same order (no deadlock between two processes upserting
    overlapping rows).
    """
    sums: dict[tuple[Any, ...], list[float]] = {}
    for (start, *rest), acc in minutes.items():
        for width in WIDTHS:
            key = (width, start - start % width, *rest)
            total = sums.get(key)
            if total is None:
                sums[key] = acc.copy()
            else:
                for i, value in enumerate(acc):
                    total[i] += value
    return [k + tuple(v) for k, v in sorted(sums.items())]


async def _rollups(added: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Rollup increments of the rows added (each as :data:`_ADDED`), summed per minute
    :data:`ROWS_PER_TURN` rows a turn of the event loop (see :func:`_increments`)."""
    minutes: dict[tuple[Any, ...], list[float]] = {}
    rows = iter(added)
    while turn := list(itertools.islice(rows, ROWS_PER_TURN)):  # no count kept per row
        _sum_minutes(minutes, turn)
        await asyncio.sleep(0)
    return _increments(minutes)


async def write_batch(conn: AsyncConnection, records: Sequence[UsageRecord]) -> int:
    """Insert ``records`` and add the new ones to the rollups, in the caller's transaction.

    Request ids already stored are skipped, and only the rows really added reach the rollups
    (PostgreSQL: a ``COPY`` and the upsert of their sums, or when the ``COPY`` refuses the
    batch one statement; SQLite: an insert returning the rows it added, then the upsert of
    their sums). Returns how many records were new.
    """
    dialect = _check_dialect(conn)
    rows: dict[str, tuple[Any, ...]] = {}
    for start in range(0, len(records), ROWS_PER_TURN):
        for rec in records[start : start + ROWS_PER_TURN]:
            row = _row(rec)
            rows.setdefault(row[0], row)  # the same id twice in one batch counts once
        if start + ROWS_PER_TURN < len(records):
            await asyncio.sleep(0)  # let requests through between slices of a big batch
    if not rows:
        return 0
    if dialect == "postgresql":
        copied = await _copy_pg(conn, list(rows.values()))
        if copied is not None:
            return copied
    payload = _json(rows.values())
    if "\\u0000" in payload:  # a NUL (or the text of an escaped one): rare, so looked for once
        payload = _json(_without_nul(row) for row in rows.values())
    if dialect == "postgresql":
        result = await conn.exec_driver_sql(_batch_sql_pg(), (payload,))
        return int(result.scalar_one())
    added = (await conn.exec_driver_sql(_insert_sql(dialect), (payload,))).all()
    increments = await _rollups(added)
    if increments:
        await conn.exec_driver_sql(_upsert_sql(dialect), (_json(increments),))
    return len(added)


ROWS_PER_TURN = 128
"""Rows a flush makes, or copies and sums, between two yields to the event loop: the batch's
size (how many transactions, savepoints and rollup upserts the database does for its records)
does not set how long a request arriving during a flush waits.

On PostgreSQL it is also the rows of one ``COPY``: a batch goes as several, one after the
other, so the database works on it in bursts of ~0.5 ms, and between two it waits for the
next. A whole batch in one ``COPY`` kept its backend busy for several milliseconds without a
break (asyncpg sends an asynchronous iterable's rows in one piece below 512 KiB). Where the
database shares cores with other processes (the gateway's host, a load generator, an
upstream), one woken then waited that long, often to the scheduler's next tick: the tail of
every request in flight at a flush (bench/ab.py at one connection: p99 1.78 against 2.61 ms
with all features; docs/benchmarks.md, "This round (2026-12-06, evening)")."""


def _batch_sql_pg() -> str:
    """PostgreSQL: insert the raw rows (skipping known request ids) and upsert the rollups of
    those really added, in one statement; it returns how many were added.

    The rollup rows are sorted by primary key (text in code point order, as :func:`_rollups`
    sorts them), so concurrent writers lock them in the same order: no deadlock between two
    processes upserting overlapping rows.
    """
    sql = _SQL.get(("batch", "postgresql"))
    if sql is not None:
        return sql
    widths = ", ".join(f"({w})" for w in WIDTHS)
    order = ", ".join(
        f'g.{c} COLLATE "C"' if isinstance(usage_rollups.c[c].type, sa.String) else f"g.{c}"
        for c in ROLLUP_KEY
    )
    sums = {
        "requests": "count(*)",
        "prompt_tokens": "sum(i.prompt_tokens)",
        "completion_tokens": "sum(i.completion_tokens)",
        "cost_nanousd": "sum(i.cost_nanousd)::bigint",
        "errors": "count(*) FILTER (WHERE i.status >= 400)",
        "rate_limited": "count(*) FILTER (WHERE i.status = 429)",
        "latency_ms_sum": "sum(i.latency_ms)",
        "timed_requests": "count(*)",
        "admitted": "count(*) FILTER (WHERE i.admitted)",
        "cached_tokens": "sum(i.cached_tokens)",
    }
    assert tuple(sums) == ROLLUP_SUMS, "the rollup columns changed: update the sums here"
    grouped = (
        "SELECT w.width, i.created_at - i.created_at % w.width AS bucket_start, "  # noqa: S608
        "coalesce(i.account_id, '') AS account_id, coalesce(i.key_id, '') AS key_id, "
        f"i.model, i.endpoint, {', '.join(f'{v} AS {k}' for k, v in sums.items())} "
        f"FROM new_rows AS i CROSS JOIN (VALUES {widths}) AS w (width) "
        "GROUP BY 1, 2, 3, 4, 5, 6"
    )
    returning = ", ".join(_ADDED)
    increments = f"SELECT g.* FROM ({grouped}) AS g ORDER BY {order}"  # noqa: S608
    sql = _SQL["batch", "postgresql"] = (
        f"WITH new_rows AS ({_records_insert('postgresql', returning)}), "  # noqa: S608
        f"rolled AS ({_rollups_upsert(increments)}) "
        "SELECT count(*) FROM new_rows"
    )
    return sql


_ADDED_OF_ROW = operator.itemgetter(*(RECORD_COLUMNS.index(name) for name in _ADDED))

# What makes the COPY refuse a batch that the general statement stores: a request id already
# stored (23505), a text longer than its column (22001), a NUL (22021). And a value asyncpg
# cannot encode (its own DataError is a ValueError; a number out of its column's range an
# OverflowError): the general statement decides then, as PostgreSQL's own refusal, which the
# recorder knows (a "data exception").
_COPY_REFUSED = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions.DataError,
    ValueError,
    OverflowError,
)


async def _copy_pg(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> int | None:
    """PostgreSQL's fast way (see the module's docstring): the rows by binary ``COPY`` and
    their rollups upserted, in a savepoint of the caller's transaction. Returns how many rows
    were added (all of them), or ``None`` when the ``COPY`` refused the batch and nothing of
    it was written (then the general statement must write it).

    The savepoint is opened through SQLAlchemy (which begins the caller's transaction on the
    connection first, if nothing has yet), the rest is sent on the asyncpg connection itself:
    SQLAlchemy's ``begin_nested()`` cost ~400 us of CPU a savepoint and a statement through it
    ~100 us, asyncpg's own ~35 us (measured on this machine)."""
    await conn.exec_driver_sql("SAVEPOINT usage_copy")
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    minutes: dict[tuple[Any, ...], list[float]] = {}
    try:
        # A COPY of ROWS_PER_TURN rows at a time, each its own statement: see the constant.
        for start in range(0, len(rows), ROWS_PER_TURN):
            part = rows[start : start + ROWS_PER_TURN]
            _sum_minutes(minutes, map(_ADDED_OF_ROW, part))
            await raw.copy_records_to_table(
                usage_records.name, records=part, columns=RECORD_COLUMNS
            )
    except _COPY_REFUSED:
        await raw.execute("ROLLBACK TO SAVEPOINT usage_copy")
        return None
    await raw.execute("RELEASE SAVEPOINT usage_copy")
    await raw.execute(_upsert_sql("postgresql"), _json(_increments(minutes)))
    return len(rows)


def _json(rows: Iterable[tuple[Any, ...]]) -> str:
    return orjson.dumps(list(rows)).decode()


__all__ = ["ROWS_PER_TURN", "write_batch"]
