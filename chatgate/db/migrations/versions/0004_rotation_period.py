"""Scheduled rotation: an optional rotation period (seconds) per API key.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER in place for everything; adding a column it can, and
    # batch_alter_table keeps the same migration valid on both databases.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rotation_period", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rotation_period")
