"""Storage of conversations, their items and stored responses (SQLite or PostgreSQL).

Ownership: every read and write is filtered by ``account_id``. Another account's id is
indistinguishable from an id that does not exist: both answer :class:`~chatgate.errors.NotFound`
(404), never 403, so ids cannot be probed across accounts.

Items are stored once. A turn adds its own input and output items; a history is rebuilt by
reading the items of a conversation, or of a chain of responses (one recursive query for the
chain, one query for its items), in ``seq`` order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatgate import errors
from chatgate.db.engine import try_xact_lock
from chatgate.sessions.tables import conversations, session_items, session_responses

__all__ = [
    "MAX_ITEMS_PER_REQUEST",
    "MAX_PAGE",
    "Conversation",
    "Item",
    "ItemPage",
    "Pruned",
    "SessionStore",
    "StoredResponse",
    "conversation_not_found",
    "response_not_found",
]

MAX_PAGE = 100
MAX_ITEMS_PER_REQUEST = 20  # as OpenAI: at most 20 items per create / add call
Order = Literal["asc", "desc"]


def conversation_not_found(conversation_id: str) -> errors.NotFound:
    """OpenAI's 404 for a conversation that does not exist (or belongs to someone else)."""
    return errors.NotFound(
        f"Conversation with id '{conversation_id[:80]}' not found.", param="conversation_id"
    )


def response_not_found(response_id: str, param: str = "response_id") -> errors.NotFound:
    """OpenAI's 404 for a response that does not exist (or belongs to someone else)."""
    return errors.NotFound(f"Response with id '{response_id[:80]}' not found.", param=param)


def previous_response_not_found(
    response_id: str, message: str | None = None
) -> errors.InvalidRequest:
    """OpenAI's answer to a ``previous_response_id`` it cannot continue: a 400 with code
    ``previous_response_not_found`` (not the 404 of ``GET /v1/responses/{id}``). Clients know
    it: on it they send the whole conversation again instead of the id."""
    return errors.InvalidRequest(
        message or f"Previous response with id '{response_id[:80]}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def item_not_found(item_id: str) -> errors.NotFound:
    return errors.NotFound(f"Item with id '{item_id[:80]}' not found.", param="item_id")


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation: an id, its owner and its metadata (the items are read separately)."""

    id: str
    account_id: str
    metadata: dict[str, str]
    created_at: int
    updated_at: int

    def to_openai(self) -> dict[str, Any]:
        """The ``conversation`` object of OpenAI's API."""
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Item:
    """One stored item (a message, a function call or its output), in OpenAI's shape."""

    seq: int
    id: str
    type: str
    data: dict[str, Any]
    output: bool
    conversation_id: str | None
    response_id: str | None

    def to_openai(self) -> dict[str, Any]:
        """The item as the API returns it."""
        return {**self.data, "id": self.id}


@dataclass(frozen=True, slots=True)
class ItemPage:
    """One page of a listing and whether more follow."""

    items: list[Item]
    has_more: bool


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A stored Responses API object and the links its history is rebuilt from."""

    id: str
    account_id: str
    model: str
    body: dict[str, Any]
    previous_response_id: str | None
    conversation_id: str | None
    created_at: int


PRUNE_SLICE = 500
"""Conversations (or stored responses) a retention pass deletes per transaction."""
PRUNE_LOCK = 0x63676174_65737072  # PostgreSQL advisory lock key of the pass ("cgatespr")


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one retention pass removed."""

    conversations: int
    responses: int
    items: int


async def _remove_conversations(
    conn: AsyncConnection, ids: list[str], account_id: str | None = None
) -> tuple[int, int]:
    """Delete the conversations ``ids`` and their items, except those a stored response still
    uses (they stay its, unlinked from the conversation: "items in the conversation will not
    be deleted", as OpenAI says of a conversation's deletion); (conversations, items) removed.
    ``account_id``: only that account's (a caller's delete; the retention pass takes any)."""
    mine = () if account_id is None else (session_items.c.account_id == account_id,)
    held = session_items.c.conversation_id.in_(ids)
    # Unlinked first: the foreign key would cascade the conversation's deletion to them.
    await conn.execute(
        session_items.update()
        .where(held, session_items.c.response_id.is_not(None), *mine)
        .values(conversation_id=None)
    )
    items = await conn.execute(session_items.delete().where(held, *mine))
    owned = () if account_id is None else (conversations.c.account_id == account_id,)
    gone = await conn.execute(conversations.delete().where(conversations.c.id.in_(ids), *owned))
    return int(gone.rowcount or 0), int(items.rowcount or 0)


async def _remove_responses(
    conn: AsyncConnection, ids: list[str], account_id: str | None = None
) -> tuple[int, int]:
    """Delete the stored responses ``ids`` and their items that no conversation holds (those
    that one does stay its, unlinked from the response); (responses, items) removed.
    ``account_id``: only that account's (a caller's delete; the retention pass takes any)."""
    mine = () if account_id is None else (session_items.c.account_id == account_id,)
    made = session_items.c.response_id.in_(ids)
    items = await conn.execute(
        session_items.delete().where(made, session_items.c.conversation_id.is_(None), *mine)
    )
    await conn.execute(session_items.update().where(made, *mine).values(response_id=None))
    owned = () if account_id is None else (session_responses.c.account_id == account_id,)
    gone = await conn.execute(
        session_responses.delete().where(session_responses.c.id.in_(ids), *owned)
    )
    return int(gone.rowcount or 0), int(items.rowcount or 0)


def _now() -> int:
    return int(time.time())


def _item(row: Any) -> Item:
    return Item(
        seq=int(row.seq),
        id=row.id,
        type=row.type,
        data=dict(row.data),
        output=bool(row.output),
        conversation_id=row.conversation_id,
        response_id=row.response_id,
    )


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row.id,
        account_id=row.account_id,
        metadata=dict(row.metadata or {}),
        created_at=int(row.created_at),
        updated_at=int(row.updated_at),
    )


async def _owned(
    conn: AsyncConnection,
    table: sa.Table,
    row_id: str,
    account_id: str,
    not_found: Callable[[], errors.InvalidRequest],
    *where: sa.ColumnElement[bool],
) -> sa.Row[Any]:
    """The row of ``table`` with this id that ``account_id`` owns (and matches ``where``);
    else ``not_found()`` is raised: someone else's row is the same 404 as a missing one."""
    row = (
        await conn.execute(
            sa.select(table).where(table.c.id == row_id, table.c.account_id == account_id, *where)
        )
    ).first()
    if row is None:
        raise not_found()
    return row


def _item_rows(
    account_id: str,
    items: Sequence[Mapping[str, Any]],
    *,
    conversation_id: str | None,
    response_id: str | None,
    output: bool,
    now: int,
) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        data = {k: v for k, v in item.items() if k != "id"}
        rows.append(
            {
                "id": str(item["id"]),
                "account_id": account_id,
                "conversation_id": conversation_id,
                "response_id": response_id,
                "output": output,
                "type": str(item.get("type", "message"))[:32],
                "data": data,
                "created_at": now,
            }
        )
    return rows


class SessionStore:
    """Conversations, items and stored responses, scoped to their owning account."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- conversations ---------------------------------------------------------------------

    async def create_conversation(
        self,
        account_id: str,
        conversation_id: str,
        *,
        metadata: Mapping[str, str] | None = None,
        items: Sequence[Mapping[str, Any]] = (),
    ) -> tuple[Conversation, list[Item]]:
        """Create a conversation, with its first items (each must carry a fresh ``id``)."""
        now = _now()
        async with self._engine.begin() as conn:
            await conn.execute(
                conversations.insert().values(
                    id=conversation_id,
                    account_id=account_id,
                    metadata=dict(metadata or {}),
                    created_at=now,
                    updated_at=now,
                )
            )
            added = await self._insert_items(
                conn,
                _item_rows(
                    account_id,
                    items,
                    conversation_id=conversation_id,
                    response_id=None,
                    output=False,
                    now=now,
                ),
            )
        return Conversation(conversation_id, account_id, dict(metadata or {}), now, now), added

    async def get_conversation(self, account_id: str, conversation_id: str) -> Conversation:
        """The conversation, if ``account_id`` owns it; else 404."""
        async with self._engine.connect() as conn:
            return await self._conversation(conn, account_id, conversation_id)

    async def update_conversation(
        self, account_id: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Conversation:
        """Replace the conversation's metadata (a use: retention counts from here)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                conversations.update()
                .where(
                    conversations.c.id == conversation_id,
                    conversations.c.account_id == account_id,
                )
                .values(metadata=dict(metadata), updated_at=_now())
            )
            if result.rowcount == 0:
                raise conversation_not_found(conversation_id)
            return await self._conversation(conn, account_id, conversation_id)

    async def delete_conversation(self, account_id: str, conversation_id: str) -> None:
        """Delete the conversation and its items, except those a stored response still uses
        (its input items stay listed, as :meth:`delete_response` keeps a conversation's)."""
        async with self._engine.begin() as conn:
            # A write first: it locks the row, so a turn being stored into the conversation
            # either finishes before (and its items are seen below) or finds it gone.
            await self._touch(conn, account_id, conversation_id, _now())
            # Items removed explicitly rather than by ON DELETE CASCADE alone (SQLite enforces
            # it only with foreign_keys=ON, which a foreign connection may not have set).
            await _remove_conversations(conn, [conversation_id], account_id)

    async def add_items(
        self, account_id: str, conversation_id: str, items: Sequence[Mapping[str, Any]]
    ) -> list[Item]:
        """Append input items to a conversation (each with a fresh ``id``)."""
        now = _now()
        async with self._engine.begin() as conn:
            await self._touch(conn, account_id, conversation_id, now)
            return await self._insert_items(
                conn,
                _item_rows(
                    account_id,
                    items,
                    conversation_id=conversation_id,
                    response_id=None,
                    output=False,
                    now=now,
                ),
            )

    async def append_turn(
        self,
        account_id: str,
        conversation_id: str,
        inputs: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
    ) -> list[Item]:
        """Append one finished turn (its inputs, then the model's outputs) to a conversation."""
        now = _now()
        async with self._engine.begin() as conn:
            await self._touch(conn, account_id, conversation_id, now)
            rows = _item_rows(
                account_id,
                inputs,
                conversation_id=conversation_id,
                response_id=None,
                output=False,
                now=now,
            )
            rows += _item_rows(
                account_id,
                outputs,
                conversation_id=conversation_id,
                response_id=None,
                output=True,
                now=now,
            )
            return await self._insert_items(conn, rows)

    async def list_items(
        self,
        account_id: str,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Order = "desc",
    ) -> ItemPage:
        """A page of a conversation's items (newest first by default, as OpenAI)."""
        async with self._engine.connect() as conn:
            await self._conversation(conn, account_id, conversation_id)
            listed = session_items.c.conversation_id == conversation_id
            return await self._page(conn, account_id, (listed,), after, limit, order)

    async def get_item(self, account_id: str, conversation_id: str, item_id: str) -> Item:
        """One item of a conversation."""
        async with self._engine.connect() as conn:
            await self._conversation(conn, account_id, conversation_id)
            row = await _owned(
                conn,
                session_items,
                item_id,
                account_id,
                lambda: item_not_found(item_id),
                session_items.c.conversation_id == conversation_id,
            )
        return _item(row)

    async def delete_item(
        self, account_id: str, conversation_id: str, item_id: str
    ) -> Conversation:
        """Remove one item from a conversation; returns the conversation (as OpenAI does). A
        use: retention counts from here."""
        async with self._engine.begin() as conn:
            await self._touch(conn, account_id, conversation_id, _now())  # else 404
            conversation = await self._conversation(conn, account_id, conversation_id)
            result = await conn.execute(
                session_items.delete().where(
                    session_items.c.id == item_id,
                    session_items.c.conversation_id == conversation_id,
                    session_items.c.account_id == account_id,
                )
            )
            if result.rowcount == 0:
                raise item_not_found(item_id)
        return conversation

    async def conversation_items(self, account_id: str, conversation_id: str) -> list[Item]:
        """Every item of a conversation, oldest first (the history a new turn continues); a
        404 names the ``conversation`` field that a new turn gives the id in."""
        async with self._engine.connect() as conn:
            try:
                await self._conversation(conn, account_id, conversation_id)
            except errors.NotFound as exc:
                exc.param = "conversation"
                raise
            rows = await conn.execute(
                sa.select(session_items)
                .where(
                    session_items.c.conversation_id == conversation_id,
                    session_items.c.account_id == account_id,
                )
                .order_by(session_items.c.seq)
            )
            return [_item(r) for r in rows]

    # -- stored responses ------------------------------------------------------------------

    async def save_response(
        self,
        account_id: str,
        body: Mapping[str, Any],
        *,
        inputs: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        store: bool = True,
    ) -> bool:
        """Record one finished response: its items, and the response itself when ``store``.

        With a conversation, the items are appended to it whether or not the response is
        stored (that is what the conversation is for); without one and without ``store``,
        nothing is written. False when the conversation was deleted while the turn ran (the
        answer has been paid for and goes out all the same): the response is then stored as
        a deletion just after the turn would have left it (its items its own, continuing from
        it ``previous_response_not_found``), and without ``store`` nothing is written.
        """
        if not store and conversation_id is None:
            return True
        response_id = str(body["id"])
        now = _now()
        async with self._engine.begin() as conn:
            linked = conversation_id
            if conversation_id is not None:
                try:
                    await self._touch(conn, account_id, conversation_id, now)
                except errors.NotFound:
                    linked = None
                    if not store:
                        return False
            owner = response_id if store else None
            rows = _item_rows(
                account_id,
                inputs,
                conversation_id=linked,
                response_id=owner,
                output=False,
                now=now,
            )
            rows += _item_rows(
                account_id,
                outputs,
                conversation_id=linked,
                response_id=owner,
                output=True,
                now=now,
            )
            added = await self._insert_items(conn, rows)
            if not store:
                return True
            last_seq = added[-1].seq if added else None
            if last_seq is None and linked is not None:
                last_seq = await self._max_seq(conn, linked)
            await conn.execute(
                session_responses.insert().values(
                    id=response_id,
                    account_id=account_id,
                    previous_response_id=previous_response_id,
                    conversation_id=conversation_id,
                    model=str(body.get("model", ""))[:200],
                    body=dict(body),
                    last_seq=last_seq,
                    created_at=int(body.get("created_at") or now),
                )
            )
        return linked == conversation_id

    async def get_response(
        self, account_id: str, response_id: str, *, param: str = "response_id"
    ) -> StoredResponse:
        """A stored response, if ``account_id`` owns it; else 404."""
        async with self._engine.connect() as conn:
            row = await _owned(
                conn,
                session_responses,
                response_id,
                account_id,
                lambda: response_not_found(response_id, param),
            )
        return StoredResponse(
            id=row.id,
            account_id=row.account_id,
            model=row.model,
            body=dict(row.body),
            previous_response_id=row.previous_response_id,
            conversation_id=row.conversation_id,
            created_at=int(row.created_at),
        )

    async def delete_response(self, account_id: str, response_id: str) -> None:
        """Delete a stored response and its items, except those a conversation still holds."""
        async with self._engine.begin() as conn:
            removed, _ = await _remove_responses(conn, [response_id], account_id)
            if removed == 0:
                raise response_not_found(response_id)

    async def response_history(self, account_id: str, response_id: str) -> list[Item]:
        """The items a response continues from: its chain of previous responses, oldest first.

        The chain is followed with one recursive query. When its first response was made in a
        conversation, the conversation's items up to that response come first. A chain that
        cannot be followed whole is ``previous_response_not_found``: the response is not this
        account's, or one it continues from was deleted (or pruned), or so was the conversation
        it began in. Continuing with what is left would answer without part of the history.
        """
        responses = session_responses.c
        async with self._engine.connect() as conn:
            chain = (
                sa.select(
                    responses.id,
                    responses.previous_response_id,
                    responses.conversation_id,
                    responses.last_seq,
                )
                .where(responses.id == response_id, responses.account_id == account_id)
                .cte("chain", recursive=True)
            )
            chain = chain.union_all(
                sa.select(
                    responses.id,
                    responses.previous_response_id,
                    responses.conversation_id,
                    responses.last_seq,
                )
                .join(chain, responses.id == chain.c.previous_response_id)
                .where(responses.account_id == account_id)
            )
            links = (await conn.execute(sa.select(chain))).all()
            if not links:
                raise previous_response_not_found(response_id)
            ids = [link.id for link in links]
            known = set(ids)  # the root: the link whose previous is not in the chain
            root = next(link for link in links if link.previous_response_id not in known)
            if root.previous_response_id is not None:
                raise previous_response_not_found(
                    response_id,
                    f"Response with id '{response_id[:80]}' continues from response "
                    f"'{root.previous_response_id[:80]}', which was deleted.",
                )
            if root.conversation_id is not None:
                # Its items went with a deleted conversation: the chain would go on without them.
                await _owned(
                    conn,
                    conversations,
                    root.conversation_id,
                    account_id,
                    lambda: previous_response_not_found(
                        response_id,
                        f"Response with id '{response_id[:80]}' continues conversation "
                        f"'{root.conversation_id}', which was deleted.",
                    ),
                )
            condition: sa.ColumnElement[bool] = session_items.c.response_id.in_(ids)
            if root.conversation_id is not None and root.last_seq is not None:
                condition = sa.or_(
                    condition,
                    sa.and_(
                        session_items.c.conversation_id == root.conversation_id,
                        session_items.c.seq <= root.last_seq,
                    ),
                )
            rows = await conn.execute(
                sa.select(session_items)
                .where(session_items.c.account_id == account_id, condition)
                .order_by(session_items.c.seq)
            )
            return [_item(r) for r in rows]

    async def response_input_items(
        self,
        account_id: str,
        response_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Order = "desc",
    ) -> ItemPage:
        """A page of the input items one stored response was given."""
        await self.get_response(account_id, response_id)
        listed = (session_items.c.response_id == response_id, session_items.c.output.is_(False))
        async with self._engine.connect() as conn:
            return await self._page(conn, account_id, listed, after, limit, order)

    # -- retention -------------------------------------------------------------------------

    async def prune(self, older_than: int, *, slice_size: int = PRUNE_SLICE) -> Pruned:
        """Delete conversations idle since before ``older_than`` (unix seconds), their items,
        and stored responses created before it (with items no conversation holds).

        ``slice_size`` conversations (then responses), oldest first, a transaction, until none
        is left: the first pass after months of use is not one transaction over millions of
        items. On PostgreSQL one process prunes at a time (an advisory lock); the others
        return at once, having removed nothing.
        """
        removed = [0, 0]  # conversations, responses
        items = 0
        old_conversations = (
            sa.select(conversations.c.id)
            .where(conversations.c.updated_at < older_than)
            .order_by(conversations.c.updated_at)
            .limit(slice_size)
            # PostgreSQL: one a turn is being stored into waits for the next pass; the rest
            # are locked, so a turn that comes now finds them gone (see save_response).
            .with_for_update(skip_locked=True)
        )
        old_responses = (
            sa.select(session_responses.c.id)
            .where(session_responses.c.created_at < older_than)
            .order_by(session_responses.c.created_at)
            .limit(slice_size)
        )
        for kind, (old, remove) in enumerate(
            ((old_conversations, _remove_conversations), (old_responses, _remove_responses))
        ):
            while True:
                async with self._engine.begin() as conn:
                    if not await try_xact_lock(conn, PRUNE_LOCK):
                        return Pruned(removed[0], removed[1], items)
                    ids = list((await conn.execute(old)).scalars())
                    if ids:
                        rows, their_items = await remove(conn, ids)
                        removed[kind] += rows
                        items += their_items
                if len(ids) < slice_size:
                    break
        return Pruned(removed[0], removed[1], items)

    # -- helpers ---------------------------------------------------------------------------

    async def _conversation(
        self, conn: AsyncConnection, account_id: str, conversation_id: str
    ) -> Conversation:
        row = await _owned(
            conn,
            conversations,
            conversation_id,
            account_id,
            lambda: conversation_not_found(conversation_id),
        )
        return _conversation(row)

    async def _touch(
        self, conn: AsyncConnection, account_id: str, conversation_id: str, now: int
    ) -> None:
        """Mark the conversation as used now (retention counts from here); 404 if not ours."""
        result = await conn.execute(
            conversations.update()
            .where(
                conversations.c.id == conversation_id,
                conversations.c.account_id == account_id,
            )
            .values(updated_at=now)
        )
        if result.rowcount == 0:
            raise conversation_not_found(conversation_id)

    async def _max_seq(self, conn: AsyncConnection, conversation_id: str) -> int | None:
        value = (
            await conn.execute(
                sa.select(sa.func.max(session_items.c.seq)).where(
                    session_items.c.conversation_id == conversation_id
                )
            )
        ).scalar()
        return None if value is None else int(value)

    async def _page(
        self,
        conn: AsyncConnection,
        account_id: str,
        listed: tuple[sa.ColumnElement[bool], ...],
        after: str | None,
        limit: int,
        order: Order,
    ) -> ItemPage:
        """A page of the account's items that meet ``listed``, after the item ``after`` (a
        cursor, as OpenAI's pagination), which must be one of them: one of another
        conversation would set the page by an unrelated position."""
        limit = max(1, min(limit, MAX_PAGE))
        mine = (session_items.c.account_id == account_id, *listed)
        seq = session_items.c.seq
        query = sa.select(session_items).where(*mine)
        if after is not None:
            cursor = (
                await conn.execute(sa.select(seq).where(session_items.c.id == after, *mine))
            ).scalar()
            if cursor is None:
                raise errors.InvalidRequest(
                    f"Invalid 'after': no item with id '{after[:80]}'.", param="after"
                )
            query = query.where(seq > cursor if order == "asc" else seq < cursor)
        query = query.order_by(seq.asc() if order == "asc" else seq.desc()).limit(limit + 1)
        rows = (await conn.execute(query)).all()
        return ItemPage([_item(r) for r in rows[:limit]], len(rows) > limit)

    async def _insert_items(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[Item]:
        if not rows:
            return []
        result = await conn.execute(
            session_items.insert().returning(session_items.c.seq, sort_by_parameter_order=True),
            rows,
        )
        seqs = [int(r[0]) for r in result.all()]
        return [
            Item(
                seq=seq,
                id=row["id"],
                type=row["type"],
                data=row["data"],
                output=row["output"],
                conversation_id=row["conversation_id"],
                response_id=row["response_id"],
            )
            for seq, row in zip(seqs, rows, strict=True)
        ]
