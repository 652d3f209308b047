"""Whether the limits admitted a request: ``usage_records.admitted`` and its count in the rollups.

A restart seeds the requests-per-day limits from the last day's hourly rollups. It counted
every request recorded but a 429 as taken, and so also those refused before the limits (a 400,
403, 404, 413), which the running process had never charged: a client's malformed requests
cost its day's requests after a restart. The rollups now count the admitted requests.

Nothing is rewritten that the seed does not read: the raw rows of before have no value (NULL:
not known), and of the rollups only the hourly rows of the last two days are filled in, with
the old reading (admitted unless a 429); older rows and other widths count from here on. So the
migration is quick on a large install: adding a column without a default is a change to the
catalogue only, and the update reads an index range.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

HOUR = 3600
BACKFILLED = 2 * 86400
"""Seconds of hourly rollups filled in: the seed reads the last 24 hours'."""


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("admitted", sa.Boolean))
    op.add_column(
        "usage_rollups",
        sa.Column("admitted", sa.BigInteger, nullable=False, server_default="0"),
    )
    since = (int(time.time()) - BACKFILLED) // HOUR * HOUR
    op.execute(
        sa.text(
            "UPDATE usage_rollups SET admitted = requests - rate_limited "
            "WHERE width = :hour AND bucket_start >= :since"
        ).bindparams(hour=HOUR, since=since)
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_rollups", recreate="never") as batch:
        batch.drop_column("admitted")
    with op.batch_alter_table("usage_records", recreate="never") as batch:
        batch.drop_column("admitted")
