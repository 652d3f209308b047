"""Dashboard sessions end server-side: a session epoch per account, moved on by logging out.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows start at 0, the epoch of every cookie made before this column existed.
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("session_epoch", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    # Not by copying the table (batch mode's way on SQLite): api_keys and the sessions refer to
    # accounts, and SQLite refuses to drop a table that rows refer to. SQLite drops a plain
    # column itself (3.35 and later), as PostgreSQL does.
    with op.batch_alter_table("accounts", recreate="never") as batch:
        batch.drop_column("session_epoch")
