"""Latency in the usage rollups: the sum of the requests' latencies and how many it holds.

``timed_requests`` counts the requests in ``latency_ms_sum``: rows rolled up before this
revision hold none (their average is unknown, not 0), and a row that began before it and
grew after averages over the requests timed since.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "usage_rollups",
        sa.Column("latency_ms_sum", sa.Double, nullable=False, server_default="0"),
    )
    op.add_column(
        "usage_rollups",
        sa.Column("timed_requests", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_rollups", recreate="never") as batch:
        batch.drop_column("timed_requests")
        batch.drop_column("latency_ms_sum")
