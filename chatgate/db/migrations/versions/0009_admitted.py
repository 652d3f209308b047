"""Whether the limits admitted a request: ``usage_records.admitted`` and its count in the rollups.

A restart seeds the requests-per-day limits from the last day's rollups. It counted every
request recorded but a 429 as taken, and so also those refused before the limits (a 400, 403,
404, 413), which the running process had never charged: a client's malformed requests cost
its day's requests after a restart. The rollups now count the admitted requests themselves.

Rows of before this revision keep the old reading: a request admitted unless it was a 429.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "usage_records",
        sa.Column("admitted", sa.Boolean, nullable=False, server_default=sa.true()),
    )
    op.add_column(
        "usage_rollups",
        sa.Column("admitted", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute("UPDATE usage_records SET admitted = false WHERE status = 429")
    op.execute("UPDATE usage_rollups SET admitted = requests - rate_limited")


def downgrade() -> None:
    with op.batch_alter_table("usage_rollups", recreate="never") as batch:
        batch.drop_column("admitted")
    with op.batch_alter_table("usage_records", recreate="never") as batch:
        batch.drop_column("admitted")
