"""Usage: raw per-request records and their per-minute/hour/day rollups.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("account_id", sa.String(64)),
        sa.Column("key_id", sa.String(64)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger, nullable=False),
        sa.Column("latency_ms", sa.Double, nullable=False),
        sa.Column("ttft_ms", sa.Double),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("conversation_id", sa.String(64)),
        sa.Column("streamed", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_usage_records"),
    )
    op.create_index("ix_usage_records_created_at", "usage_records", ["created_at"])
    op.create_index("ix_usage_records_account_id", "usage_records", ["account_id", "created_at"])
    op.create_table(
        "usage_rollups",
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("bucket_start", sa.BigInteger, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("rate_limited", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "width",
            "bucket_start",
            "account_id",
            "key_id",
            "model",
            "endpoint",
            name="pk_usage_rollups",
        ),
    )
    op.create_index(
        "ix_usage_rollups_account_id", "usage_rollups", ["account_id", "width", "bucket_start"]
    )


def downgrade() -> None:
    op.drop_table("usage_rollups")
    op.drop_table("usage_records")
