"""A monthly budget in US cents, on plans and on keys (``monthly_budget_cents``).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("plans", sa.Column("monthly_budget_cents", sa.BigInteger))
    op.add_column("api_keys", sa.Column("monthly_budget_cents", sa.BigInteger))


def downgrade() -> None:
    # SQLite drops a plain column itself (3.35 and later), as PostgreSQL does; batch mode's
    # copy of the table would fail: rows of other tables refer to both.
    with op.batch_alter_table("api_keys", recreate="never") as batch:
        batch.drop_column("monthly_budget_cents")
    with op.batch_alter_table("plans", recreate="never") as batch:
        batch.drop_column("monthly_budget_cents")
