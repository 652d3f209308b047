"""The session tables, on the shared :data:`chatgate.db.tables.metadata`.

- ``conversations``: one row per conversation, owned by an account. ``updated_at`` moves with
  every item added, and is what the retention setting prunes by.
- ``session_items``: every message or tool item, stored once. An item belongs to a conversation
  (``conversation_id``), to the stored response that consumed or produced it (``response_id``),
  or to both (a response made with ``conversation=``). ``seq`` orders items globally, so any
  history reads back in insertion order with one indexed query.
- ``session_responses``: stored Responses API objects (the JSON body as returned) and the
  links a history is rebuilt from: ``previous_response_id`` (a chain, read with one recursive
  query) and ``conversation_id`` + ``last_seq`` (the conversation as it was at that response).

A history is therefore never copied per turn: turn *n* adds only its own items.
Migration ``0003_sessions`` creates exactly these tables; a test keeps them equal.
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
    String,
    Table,
)

from chatgate.db.tables import metadata

ID_LEN = 64
ACCOUNT_ID_LEN = 40
MODEL_LEN = 200
TYPE_LEN = 32

# A 64-bit sequence on PostgreSQL; SQLite autoincrements only an ``INTEGER PRIMARY KEY``
# (which is 64-bit there anyway).
SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(ID_LEN), primary_key=True),
    Column(
        "account_id",
        String(ACCOUNT_ID_LEN),
        ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("metadata", JSON),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False, index=True),
)

session_items = Table(
    "session_items",
    metadata,
    Column("seq", SEQ_TYPE, primary_key=True, autoincrement=True),
    Column("id", String(ID_LEN), nullable=False, unique=True),
    Column(
        "account_id",
        String(ACCOUNT_ID_LEN),
        ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "conversation_id",
        String(ID_LEN),
        ForeignKey("conversations.id", ondelete="CASCADE"),
    ),
    # No foreign key: deleting a response keeps the items a conversation still holds.
    Column("response_id", String(ID_LEN)),
    Column("output", Boolean, nullable=False),  # produced by the model (not given as input)
    Column("type", String(TYPE_LEN), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

Index("ix_session_items_conversation_id", session_items.c.conversation_id, session_items.c.seq)
Index("ix_session_items_response_id", session_items.c.response_id, session_items.c.seq)

session_responses = Table(
    "session_responses",
    metadata,
    Column("id", String(ID_LEN), primary_key=True),
    Column(
        "account_id",
        String(ACCOUNT_ID_LEN),
        ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("previous_response_id", String(ID_LEN)),
    # No foreign key: a deleted conversation leaves its responses readable (not resumable).
    Column("conversation_id", String(ID_LEN)),
    Column("model", String(MODEL_LEN), nullable=False),
    Column("body", JSON, nullable=False),
    Column("last_seq", BigInteger),
    Column("created_at", BigInteger, nullable=False, index=True),
)

__all__ = ["conversations", "session_items", "session_responses"]
