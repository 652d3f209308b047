"""Prefixed random identifiers (``acct_…``, ``key_…``), as OpenAI names its objects."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``prefix_`` + 24 hex characters."""
    return f"{prefix}_{secrets.token_hex(12)}"
