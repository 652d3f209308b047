"""Cached prompt tokens: ``usage_records.cached_tokens`` and their sum in the rollups.

OpenAI reports the part of a prompt it read from its prompt cache
(``usage.prompt_tokens_details.cached_tokens``) and bills it at a discount; a model's
``cached_input_price_per_mtok`` prices it so. Rows of before hold 0: not known, and priced
as input then. Both columns have a server default, so adding them is a change to the
catalogue only, and a node of before (which names its columns) still writes during an upgrade.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "usage_records",
        sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column(
        "usage_rollups",
        sa.Column("cached_tokens", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_rollups", recreate="never") as batch:
        batch.drop_column("cached_tokens")
    with op.batch_alter_table("usage_records", recreate="never") as batch:
        batch.drop_column("cached_tokens")
