"""The usage tables, on the shared :data:`chatgate.db.tables.metadata`.

- ``usage_records``: one raw row per request, keyed by its request id (the idempotency key:
  a record written twice is stored once). Pruned after the retention period.
- ``usage_rollups``: sums per bucket (``width`` 60, 3600 or 86400 seconds) x account x key x
  model x endpoint, kept up to date by the recorder in the same transaction as the raw rows.
  Reports and the usage API read only these, never the raw table. Kept forever.

"No account / no key" is stored as ``""`` in the rollups (not NULL) so the primary key can hold
it: NULLs are never equal, so an upsert on a NULL column would never find its row.

Migration ``0002_usage`` creates exactly these tables; a test keeps them equal.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
)

from chatgate.db.tables import metadata

# Column sizes, shared with the recorder, which clips text to them so that a long model name
# can never make a whole batch fail (and stay stuck in the spool) on PostgreSQL.
ID_LEN = 64
MODEL_LEN = 200
BACKEND_LEN = 32
ENDPOINT_LEN = 32
ERROR_CODE_LEN = 64

# Costs are stored as whole nano-dollars (1e-9 USD): sums of many small prices stay exact
# (floats drift), a price of $0.10 per million tokens is still 100 per token, and a BIGINT
# holds $9.2 billion.
NANOS_PER_USD = 1_000_000_000
NANOS_PER_CENT = NANOS_PER_USD // 100  # a monthly budget is set in cents

# Rollup widths in seconds: minute, hour, day (UTC).
MINUTE, HOUR, DAY = 60, 3600, 86400
WIDTHS = (MINUTE, HOUR, DAY)

usage_records = Table(
    "usage_records",
    metadata,
    Column("request_id", String(ID_LEN), primary_key=True),
    Column("created_at", BigInteger, nullable=False),
    Column("account_id", String(ID_LEN)),
    Column("key_id", String(ID_LEN)),
    Column("model", String(MODEL_LEN), nullable=False),
    Column("backend", String(BACKEND_LEN), nullable=False),
    Column("endpoint", String(ENDPOINT_LEN), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_nanousd", BigInteger, nullable=False),
    Column("latency_ms", Double, nullable=False),
    Column("ttft_ms", Double),
    Column("status", SmallInteger, nullable=False),
    Column("error_code", String(ERROR_CODE_LEN)),
    Column("conversation_id", String(ID_LEN)),
    Column("streamed", Boolean, nullable=False),
    # Whether the limits let it through (and took it): not a request refused before them (a
    # 400, 403, 404, 413) or by them (a 429). NULL: recorded before migration 0009, not known.
    Column("admitted", Boolean),
    # Of prompt_tokens, those the upstream read from its prompt cache (priced apart, see
    # ModelConfig.cost). 0 before migration 0011: not known.
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
)

# Pruning and exports scan by time; an account's export by account then time.
Index("ix_usage_records_created_at", usage_records.c.created_at)
Index("ix_usage_records_account_id", usage_records.c.account_id, usage_records.c.created_at)

usage_rollups = Table(
    "usage_rollups",
    metadata,
    Column("width", Integer, primary_key=True),
    Column("bucket_start", BigInteger, primary_key=True),
    Column("account_id", String(ID_LEN), primary_key=True),
    Column("key_id", String(ID_LEN), primary_key=True),
    Column("model", String(MODEL_LEN), primary_key=True),
    Column("endpoint", String(ENDPOINT_LEN), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_nanousd", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("rate_limited", BigInteger, nullable=False),
    # The average latency: the sum over ``timed_requests`` (those rolled up since migration
    # 0008, which added both; a row of before has none).
    Column("latency_ms_sum", Double, nullable=False, server_default="0"),
    Column("timed_requests", BigInteger, nullable=False, server_default="0"),
    # Requests the limits admitted (see ``usage_records.admitted``): what a restart seeds
    # the requests-per-day limits with. Counted since migration 0009, which filled in the
    # hourly rows of the two days before it (the seed reads the last day's).
    Column("admitted", BigInteger, nullable=False, server_default="0"),
    Column("cached_tokens", BigInteger, nullable=False, server_default="0"),  # since 0011
)
ROLLUP_SUMS: tuple[str, ...] = tuple(c.name for c in usage_rollups.c if not c.primary_key)
"""The rollups' summed columns, in order: what a batch adds and what a report sums."""

# An account's reports: its rows of one width over a time range.
Index(
    "ix_usage_rollups_account_id",
    usage_rollups.c.account_id,
    usage_rollups.c.width,
    usage_rollups.c.bucket_start,
)


def to_nanos(usd: float) -> int:
    """US dollars as whole nano-dollars."""
    return round(usd * NANOS_PER_USD)


def to_usd(nanos: int) -> float:
    """Nano-dollars as US dollars."""
    return nanos / NANOS_PER_USD


def cents_up(nanos: int) -> int:
    """Nano-dollars in whole US cents, rounded up: a spend is never shown below what it is."""
    return -(-nanos // NANOS_PER_CENT)


def cents_text(cents: int) -> str:
    """US cents as a price: ``$1,234.56``."""
    return f"${cents // 100:,}.{cents % 100:02d}"


def usd_text(nanos: int) -> str:
    """A cost as a usage table shows it, rounded up as :func:`cents_up` rounds a spend: in
    cents (``$1,234.57``), or below a cent to four places (``$0.0013``), so that a cheap
    model's cost does not read as nothing."""
    if nanos <= 0 or nanos >= NANOS_PER_CENT:
        return cents_text(cents_up(max(nanos, 0)))
    return f"$0.{-(-nanos // 100_000):04d}"  # ten-thousandths of a dollar


__all__ = [
    "DAY",
    "HOUR",
    "MINUTE",
    "NANOS_PER_CENT",
    "NANOS_PER_USD",
    "ROLLUP_SUMS",
    "WIDTHS",
    "cents_text",
    "cents_up",
    "to_nanos",
    "to_usd",
    "usage_records",
    "usage_rollups",
    "usd_text",
]
