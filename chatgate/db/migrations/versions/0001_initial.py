"""Plans, accounts, API keys and the invalidation feed; seeds the free, pro and enterprise plans.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SEED_PLANS = [
    # name, rpm, tpm, rpd, concurrency, monthly_tokens (None = unlimited)
    ("free", 20, 40_000, 1_000, 4, 1_000_000),
    ("pro", 600, 400_000, 50_000, 32, 50_000_000),
    ("enterprise", None, None, None, None, None),
]


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("rpd", sa.Integer),
        sa.Column("concurrency", sa.Integer),
        sa.Column("monthly_tokens", sa.BigInteger),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_plans"),
        sa.UniqueConstraint("name", name="uq_plans_name"),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("plan_id", sa.Integer, nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("password_hash", sa.String(256)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("email", name="uq_accounts_email"),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name="fk_accounts_plan_id_plans"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(32), nullable=False),
        sa.Column("prev_hash", sa.String(64)),
        sa.Column("prev_valid_until", sa.BigInteger),
        sa.Column("models", sa.JSON),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("rpd", sa.Integer),
        sa.Column("concurrency", sa.Integer),
        sa.Column("monthly_tokens", sa.BigInteger),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("rotated_at", sa.BigInteger),
        sa.Column("last_used_at", sa.BigInteger),
        sa.Column("expires_at", sa.BigInteger),
        sa.Column("revoked_at", sa.BigInteger),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_api_keys_account_id_accounts"
        ),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_index("ix_api_keys_prev_hash", "api_keys", ["prev_hash"])
    op.create_table(
        "invalidations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_invalidations"),
    )
    op.create_index("ix_invalidations_created_at", "invalidations", ["created_at"])
    now = int(time.time())
    op.bulk_insert(
        plans,
        [
            {
                "name": name,
                "rpm": rpm,
                "tpm": tpm,
                "rpd": rpd,
                "concurrency": conc,
                "monthly_tokens": monthly,
                "created_at": now,
            }
            for name, rpm, tpm, rpd, conc, monthly in SEED_PLANS
        ],
    )


def downgrade() -> None:
    op.drop_table("invalidations")
    op.drop_table("api_keys")
    op.drop_table("accounts")
    op.drop_table("plans")
