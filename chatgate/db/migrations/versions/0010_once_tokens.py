"""A dashboard form that makes or rotates a key runs once, across processes: ``once_tokens``.

Its token was kept only in the session cookie, so the same POST sent again with the cookie of
before (a double submit, a retry after a lost answer, a replay) made a second key or rotated
twice. The key's transaction now inserts the token here, under a unique key.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "once_tokens",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_once_tokens")),
    )
    op.create_index(op.f("ix_once_tokens_created_at"), "once_tokens", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_once_tokens_created_at"), table_name="once_tokens")
    op.drop_table("once_tokens")
