"""Sessions: conversations and stored responses, kept server-side for any backend.

- :mod:`.tables` — the tables (conversations, items stored once, stored responses).
- :mod:`.store` — :class:`SessionStore`: reads and writes, always scoped to one account.
- :mod:`.trim` — fitting a history into the model's context window (the ``context_trim``
  policy).
- :mod:`.responses` — the Responses API translated to and from chat completions.
- :mod:`.chat` — :func:`prepare_chat` / :class:`ChatSession`: the history for one turn, and
  storing the turn after it succeeded (``/v1/chat/completions`` with ``conversation``).
"""

from __future__ import annotations

from chatgate.sessions.chat import ChatSession, build_context, prepare_chat, sessions_store
from chatgate.sessions.store import Conversation, Item, ItemPage, SessionStore, StoredResponse
from chatgate.sessions.trim import Trimmed, policy_from_settings, trim_messages

__all__ = [
    "ChatSession",
    "Conversation",
    "Item",
    "ItemPage",
    "SessionStore",
    "StoredResponse",
    "Trimmed",
    "build_context",
    "policy_from_settings",
    "prepare_chat",
    "sessions_store",
    "trim_messages",
]
