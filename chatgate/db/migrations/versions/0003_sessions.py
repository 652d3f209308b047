"""Sessions: conversations, their items (stored once) and stored responses.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SEQ_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("metadata", sa.JSON),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_conversations_account_id_accounts",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_conversations_account_id", "conversations", ["account_id"])
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])
    op.create_table(
        "session_items",
        sa.Column("seq", SEQ_TYPE, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("conversation_id", sa.String(64)),
        sa.Column("response_id", sa.String(64)),
        sa.Column("output", sa.Boolean, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_session_items"),
        sa.UniqueConstraint("id", name="uq_session_items_id"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_session_items_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_session_items_conversation_id_conversations",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_session_items_conversation_id", "session_items", ["conversation_id", "seq"])
    op.create_index("ix_session_items_response_id", "session_items", ["response_id", "seq"])
    op.create_table(
        "session_responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("previous_response_id", sa.String(64)),
        sa.Column("conversation_id", sa.String(64)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("last_seq", sa.BigInteger),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_session_responses"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_session_responses_account_id_accounts",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_session_responses_account_id", "session_responses", ["account_id"])
    op.create_index("ix_session_responses_created_at", "session_responses", ["created_at"])


def downgrade() -> None:
    op.drop_table("session_responses")
    op.drop_table("session_items")
    op.drop_table("conversations")
