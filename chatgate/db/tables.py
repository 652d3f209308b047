"""Table definitions (SQLAlchemy Core). Times are UTC unix seconds (integers), as OpenAI's.

Alembic migrations under ``migrations/versions`` create exactly these; a test keeps them equal.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# A plan's limits; NULL means unlimited.
plans = Table(
    "plans",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("rpd", Integer),
    Column("concurrency", Integer),
    Column("monthly_tokens", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("monthly_budget_cents", BigInteger),  # US cents a month at the models' prices
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("plan_id", Integer, ForeignKey("plans.id"), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("password_hash", String(256)),
    Column("created_at", BigInteger, nullable=False),
    # Dashboard sessions carry the epoch they began in; logging out moves it on, which ends
    # every session of the account (the cookie itself is stateless).
    Column("session_epoch", Integer, nullable=False, default=0, server_default="0"),
)

# Never the key itself: ``key_hash`` is HMAC-SHA256(server secret, key). ``prev_hash`` is the
# secret replaced by the last rotation, valid until ``prev_valid_until``.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False, default=""),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("hint", String(32), nullable=False),
    Column("prev_hash", String(64), index=True),
    Column("prev_valid_until", BigInteger),
    Column("models", JSON),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("rpd", Integer),
    Column("concurrency", Integer),
    Column("monthly_tokens", BigInteger),
    Column("monthly_budget_cents", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("rotated_at", BigInteger),
    Column("last_used_at", BigInteger),
    Column("expires_at", BigInteger),
    Column("revoked_at", BigInteger),
    # Scheduled rotation: due ``rotation_period`` seconds after ``rotated_at`` (or creation).
    Column("rotation_period", BigInteger),
)

# Change feed read by every server process: a row per key/account/plan change, so caches
# in other processes drop stale entries within one poll interval (the CLI writes here too).
invalidations = Table(
    "invalidations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("ref", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

Index("ix_invalidations_created_at", invalidations.c.created_at)

# Facts about this installation that every node must agree on, by name. ``secret_check``: a
# key derived from the server secret (never the secret), recorded by the first start, so that
# a node started with another secret refuses to serve (see chatgate.db.instance).
instance = Table(
    "instance",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# A dashboard form's "runs once" token (chatgate.dashboard.render.once_token), taken in the
# transaction that makes or rotates the key it was for: the same form sent again, to any
# process, finds it here and changes nothing. Rows older than a login's lifetime are pruned
# (no session that could send them again lasts longer).
once_tokens = Table(
    "once_tokens",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("created_at", BigInteger, nullable=False),
)

Index("ix_once_tokens_created_at", once_tokens.c.created_at)
