"""SessionStore on SQLite and PostgreSQL: ownership (404, never 403), items stored once,
response chains, deletion, retention, and the migration matching the table definitions."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.db.tables import metadata
from chatgate.ids import new_id
from chatgate.sessions.responses import normalize_input, normalize_items
from chatgate.sessions.store import SessionStore
from chatgate.sessions.tables import conversations, session_items, session_responses

SESSION_TABLES = {"conversations", "session_items", "session_responses"}


def user(text: str) -> list[dict[str, Any]]:
    return normalize_input(text)


def assistant(text: str) -> list[dict[str, Any]]:
    return normalize_items([{"role": "assistant", "content": text}])


def texts(items: Any) -> list[str]:
    return [item.data["content"][0]["text"] for item in items]


async def count(engine: AsyncEngine, where: Any) -> int:
    async with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(session_items).where(where)
        return int((await conn.execute(query)).scalar() or 0)


async def test_migration_matches_tables(engine: AsyncEngine) -> None:
    def diff(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [
            d
            for d in compare_metadata(context, metadata)
            if any(name in repr(d) for name in SESSION_TABLES)
        ]

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_conversation_items_and_ownership(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    alice, bob = two_accounts
    conv, first = await store.create_conversation(
        alice, new_id("conv"), metadata={"topic": "t"}, items=user("one")
    )
    assert conv.to_openai()["object"] == "conversation"
    assert conv.metadata == {"topic": "t"}
    await store.add_items(alice, conv.id, assistant("two") + user("three"))
    items = await store.conversation_items(alice, conv.id)
    assert texts(items) == ["one", "two", "three"]
    assert [i.seq for i in items] == sorted(i.seq for i in items)

    page = await store.list_items(alice, conv.id, limit=2)  # newest first by default
    assert texts(page.items) == ["three", "two"] and page.has_more
    rest = await store.list_items(alice, conv.id, limit=2, after=page.items[-1].id)
    assert texts(rest.items) == ["one"] and not rest.has_more
    asc = await store.list_items(alice, conv.id, order="asc")
    assert texts(asc.items) == ["one", "two", "three"]

    # A cursor must be an item of the listing: one of another conversation is a 400.
    other, _ = await store.create_conversation(alice, new_id("conv"), items=user("elsewhere"))
    with pytest.raises(errors.InvalidRequest) as bad:
        await store.list_items(alice, other.id, after=first[0].id, order="desc")
    assert bad.value.param == "after"

    # Another account: every operation is a 404, exactly as for an unknown id.
    for call in (
        store.get_conversation(bob, conv.id),
        store.list_items(bob, conv.id),
        store.conversation_items(bob, conv.id),
        store.add_items(bob, conv.id, user("intrusion")),
        store.update_conversation(bob, conv.id, {"x": "y"}),
        store.get_item(bob, conv.id, first[0].id),
        store.delete_item(bob, conv.id, first[0].id),
        store.delete_conversation(bob, conv.id),
        store.append_turn(bob, conv.id, user("q"), assistant("a")),
    ):
        with pytest.raises(errors.NotFound) as info:
            await call
        assert info.value.status == 404
    assert len(await store.conversation_items(alice, conv.id)) == 3

    updated = await store.update_conversation(alice, conv.id, {"topic": "u"})
    assert updated.metadata == {"topic": "u"}
    await store.delete_item(alice, conv.id, first[0].id)
    assert texts(await store.conversation_items(alice, conv.id)) == ["two", "three"]
    with pytest.raises(errors.NotFound):
        await store.get_item(alice, conv.id, first[0].id)


async def test_deleting_a_conversation_removes_its_items(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("a") + user("b"))
    await store.append_turn(alice, conv.id, user("c"), assistant("d"))
    assert await count(engine, session_items.c.conversation_id == conv.id) == 4
    await store.delete_conversation(alice, conv.id)
    assert await count(engine, session_items.c.conversation_id == conv.id) == 0
    with pytest.raises(errors.NotFound):
        await store.get_conversation(alice, conv.id)
    with pytest.raises(errors.NotFound):
        await store.delete_conversation(alice, conv.id)


def response_body(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "model": "gpt-test", "created_at": 1}


async def test_response_chain_stores_each_item_once(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    alice, bob = two_accounts
    r1, r2, r3 = new_id("resp"), new_id("resp"), new_id("resp")
    await store.save_response(alice, response_body(r1), inputs=user("q1"), outputs=assistant("a1"))
    await store.save_response(
        alice,
        response_body(r2),
        inputs=user("q2"),
        outputs=assistant("a2"),
        previous_response_id=r1,
    )
    await store.save_response(
        alice,
        response_body(r3),
        inputs=user("q3"),
        outputs=assistant("a3"),
        previous_response_id=r2,
    )
    assert texts(await store.response_history(alice, r3)) == ["q1", "a1", "q2", "a2", "q3", "a3"]
    # A branch from r1 sees only r1.
    assert texts(await store.response_history(alice, r1)) == ["q1", "a1"]
    # Stored once: three turns, six item rows, not 2 + 4 + 6.
    owned = session_items.c.response_id.in_([r1, r2, r3])
    assert await count(engine, owned) == 6

    with pytest.raises(errors.InvalidRequest) as info:
        await store.response_history(bob, r3)
    assert (info.value.status, info.value.code) == (400, "previous_response_not_found")
    assert info.value.param == "previous_response_id"
    with pytest.raises(errors.NotFound):
        await store.get_response(bob, r1)
    with pytest.raises(errors.NotFound):
        await store.delete_response(bob, r1)

    stored = await store.get_response(alice, r2)
    assert stored.body["id"] == r2 and stored.previous_response_id == r1
    inputs = await store.response_input_items(alice, r2)
    assert texts(inputs.items) == ["q2"]

    await store.delete_response(alice, r3)
    with pytest.raises(errors.NotFound):
        await store.get_response(alice, r3)
    assert await count(engine, session_items.c.response_id == r3) == 0


async def test_a_chain_with_a_response_deleted_is_not_continued(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    """Deleting a response in the middle of a chain left the later ones continuing from what
    was after it: a turn answered without the start of its history, and no error said so."""
    alice, _ = two_accounts
    r1, r2, r3 = new_id("resp"), new_id("resp"), new_id("resp")
    await store.save_response(alice, response_body(r1), inputs=user("q1"), outputs=assistant("a1"))
    for rid, previous, n in ((r2, r1, 2), (r3, r2, 3)):
        await store.save_response(
            alice,
            response_body(rid),
            inputs=user(f"q{n}"),
            outputs=assistant(f"a{n}"),
            previous_response_id=previous,
        )
    await store.delete_response(alice, r1)
    for continued in (r2, r3):
        with pytest.raises(errors.InvalidRequest) as info:
            await store.response_history(alice, continued)
        assert (info.value.status, info.value.code) == (400, "previous_response_not_found")
        assert r1 in info.value.message and continued in info.value.message
    assert (await store.get_response(alice, r3)).id == r3  # still readable, as a conversation's


async def test_unstored_response_writes_nothing(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    alice, _ = two_accounts
    rid = new_id("resp")
    await store.save_response(
        alice, response_body(rid), inputs=user("x"), outputs=assistant("y"), store=False
    )
    with pytest.raises(errors.NotFound):
        await store.get_response(alice, rid)
    assert await count(engine, session_items.c.response_id == rid) == 0


async def test_response_in_conversation_then_chained(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("c0"))
    r1 = new_id("resp")
    await store.save_response(
        alice,
        response_body(r1),
        inputs=user("q1"),
        outputs=assistant("a1"),
        conversation_id=conv.id,
    )
    await store.add_items(alice, conv.id, user("later"))  # after r1: not part of r1's history
    r2 = new_id("resp")
    await store.save_response(
        alice,
        response_body(r2),
        inputs=user("q2"),
        outputs=assistant("a2"),
        previous_response_id=r1,
    )
    assert texts(await store.response_history(alice, r2)) == ["c0", "q1", "a1", "q2", "a2"]
    assert texts(await store.conversation_items(alice, conv.id)) == ["c0", "q1", "a1", "later"]
    # Deleting r1 keeps the conversation's copy of its items (they are the conversation's).
    await store.delete_response(alice, r1)
    assert texts(await store.conversation_items(alice, conv.id)) == ["c0", "q1", "a1", "later"]


async def test_a_response_of_a_deleted_conversation_cannot_be_continued(
    store: SessionStore, two_accounts: tuple[str, str]
) -> None:
    """Deleting a conversation deletes the items its responses did not bring: continuing one
    of them is a 400, not a turn that silently goes out without part of its history."""
    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("c0"))
    r1, r2 = new_id("resp"), new_id("resp")
    await store.save_response(
        alice,
        response_body(r1),
        inputs=user("q1"),
        outputs=assistant("a1"),
        conversation_id=conv.id,
    )
    await store.save_response(
        alice,
        response_body(r2),
        inputs=user("q2"),
        outputs=assistant("a2"),
        previous_response_id=r1,
    )
    assert texts(await store.response_history(alice, r2)) == ["c0", "q1", "a1", "q2", "a2"]
    await store.delete_conversation(alice, conv.id)
    assert (await store.get_response(alice, r1)).id == r1  # still readable
    for continued in (r1, r2):
        with pytest.raises(errors.InvalidRequest) as info:
            await store.response_history(alice, continued)
        assert (info.value.status, info.value.code) == (400, "previous_response_not_found")
        assert info.value.param == "previous_response_id"
        assert conv.id in info.value.message


async def test_deleting_a_conversation_keeps_its_stored_responses_items(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """As OpenAI: "Items in the conversation will not be deleted." A stored response made in
    it kept 200 but listed no input items; now they stay its (the conversation's own items
    and its chat turns go), as a deleted response leaves a conversation its items. Another
    account's conversation and responses are untouched."""
    alice, bob = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("c0"))
    rid = new_id("resp")
    await store.save_response(
        alice,
        response_body(rid),
        inputs=user("q1"),
        outputs=assistant("a1"),
        conversation_id=conv.id,
    )
    await store.append_turn(alice, conv.id, user("chat"), assistant("turn"))
    theirs, _ = await store.create_conversation(bob, new_id("conv"), items=user("b0"))
    bobs = new_id("resp")
    await store.save_response(
        bob,
        response_body(bobs),
        inputs=user("bq"),
        outputs=assistant("ba"),
        conversation_id=theirs.id,
    )
    with pytest.raises(errors.NotFound):
        await store.delete_conversation(bob, conv.id)

    await store.delete_conversation(alice, conv.id)
    assert texts((await store.response_input_items(alice, rid)).items) == ["q1"]
    assert await count(engine, session_items.c.response_id == rid) == 2  # its input and output
    assert await count(engine, session_items.c.conversation_id == conv.id) == 0
    with pytest.raises(errors.NotFound):
        await store.get_conversation(alice, conv.id)
    # Deleting the response now removes them, as one never made in a conversation.
    await store.delete_response(alice, rid)
    assert await count(engine, session_items.c.response_id == rid) == 0
    assert texts(await store.conversation_items(bob, theirs.id)) == ["b0", "bq", "ba"]
    assert texts((await store.response_input_items(bob, bobs)).items) == ["bq"]


async def test_a_turn_stored_into_a_deleted_conversation_keeps_its_response(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """A conversation deleted while a turn ran: storing the turn raised a 404 after the answer
    was paid for. Now the response is stored as a deletion just after the turn would leave
    it (readable, its input items listed, not continued), and the caller is told so."""
    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("c0"))
    await store.delete_conversation(alice, conv.id)
    rid, unstored = new_id("resp"), new_id("resp")
    kept = await store.save_response(
        alice, response_body(rid), inputs=user("q"), outputs=assistant("a"), conversation_id=conv.id
    )
    assert kept is False
    stored = await store.get_response(alice, rid)
    assert stored.conversation_id == conv.id
    assert texts((await store.response_input_items(alice, rid)).items) == ["q"]
    with pytest.raises(errors.InvalidRequest) as info:
        await store.response_history(alice, rid)
    assert info.value.code == "previous_response_not_found" and conv.id in info.value.message
    kept = await store.save_response(
        alice,
        response_body(unstored),
        inputs=user("q"),
        outputs=assistant("a"),
        conversation_id=conv.id,
        store=False,
    )
    assert kept is False
    with pytest.raises(errors.NotFound):
        await store.get_response(alice, unstored)
    assert await count(engine, session_items.c.conversation_id == conv.id) == 0


async def test_retention_keeps_the_items_of_a_response_it_keeps(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """An idle conversation pruned while a response made in it is kept (a retention that
    counts the response younger): the response keeps its items, as after a deletion."""
    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("c0"))
    rid = new_id("resp")
    await store.save_response(
        alice, response_body(rid), inputs=user("q"), outputs=assistant("a"), conversation_id=conv.id
    )
    await _aged(engine, conversations, [conv.id], "updated_at", 1_100)
    await _aged(engine, session_responses, [rid], "created_at", 3_000)
    pruned = await store.prune(2_000)
    assert pruned.conversations >= 1
    with pytest.raises(errors.NotFound):
        await store.get_conversation(alice, conv.id)
    assert texts((await store.response_input_items(alice, rid)).items) == ["q"]
    assert await count(engine, session_items.c.response_id == rid) == 2


async def test_retention_prunes_idle_conversations_and_old_responses(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    alice, _ = two_accounts
    old_conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("old"))
    new_conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("new"))
    old_resp = new_id("resp")
    await store.save_response(alice, response_body(old_resp), inputs=user("q"), outputs=[])
    long_ago = int(time.time()) - 90 * 86400
    async with engine.begin() as conn:
        await conn.execute(
            conversations.update()
            .where(conversations.c.id == old_conv.id)
            .values(updated_at=long_ago)
        )
        await conn.execute(
            session_responses.update()
            .where(session_responses.c.id == old_resp)
            .values(created_at=long_ago)
        )
    pruned = await store.prune(int(time.time()) - 30 * 86400)
    assert pruned.conversations >= 1 and pruned.responses >= 1
    with pytest.raises(errors.NotFound):
        await store.get_conversation(alice, old_conv.id)
    with pytest.raises(errors.NotFound):
        await store.get_response(alice, old_resp)
    assert await count(engine, session_items.c.conversation_id == old_conv.id) == 0
    assert await count(engine, session_items.c.response_id == old_resp) == 0
    assert texts(await store.conversation_items(alice, new_conv.id)) == ["new"]


async def _aged(engine: AsyncEngine, table: sa.Table, ids: list[str], column: str, at: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(table.update().where(table.c.id.in_(ids)).values({column: at}))


async def test_retention_goes_in_slices_oldest_first(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """Five idle conversations and three old responses, two a transaction: all removed with
    their items (counted exactly), the conversation a kept response's item belongs to keeps it,
    and nothing newer is touched. The times are in 1970, so no other test's rows qualify."""
    alice, _ = two_accounts
    old = [
        await store.create_conversation(alice, new_id("conv"), items=user(f"o{i}"))
        for i in range(5)
    ]
    kept, _ = await store.create_conversation(alice, new_id("conv"), items=user("kept"))
    responses = [new_id("resp") for _ in range(3)]
    for rid in responses:
        await store.save_response(alice, response_body(rid), inputs=user("q"), outputs=[])
    in_kept = new_id("resp")  # an old response whose items the kept conversation holds
    await store.save_response(
        alice, response_body(in_kept), inputs=user("k"), outputs=[], conversation_id=kept.id
    )
    await _aged(engine, conversations, [c.id for c, _ in old], "updated_at", 1_000)
    await _aged(engine, session_responses, [*responses, in_kept], "created_at", 1_000)
    pruned = await store.prune(2_000, slice_size=2)
    assert (pruned.conversations, pruned.responses, pruned.items) == (5, 4, 5 + 3)
    for conv, _ in old:
        with pytest.raises(errors.NotFound):
            await store.get_conversation(alice, conv.id)
    assert texts(await store.conversation_items(alice, kept.id)) == ["kept", "k"]
    assert await count(engine, session_items.c.response_id.in_([*responses, in_kept])) == 0
    assert await store.prune(2_000, slice_size=2) == type(pruned)(0, 0, 0)


async def test_one_process_prunes_at_a_time(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """PostgreSQL: while another session holds the retention's lock, a pass removes nothing
    and returns at once; once it is free, the pass does the work."""
    if engine.dialect.name != "postgresql":
        pytest.skip("an advisory lock is PostgreSQL's")
    from chatgate.sessions.store import PRUNE_LOCK

    alice, _ = two_accounts
    conv, _ = await store.create_conversation(alice, new_id("conv"), items=user("old"))
    await _aged(engine, conversations, [conv.id], "updated_at", 1_500)
    async with engine.begin() as other:
        await other.execute(sa.select(sa.func.pg_advisory_xact_lock(PRUNE_LOCK)))
        pruned = await store.prune(2_000)
        assert (pruned.conversations, pruned.items) == (0, 0)
        assert texts(await store.conversation_items(alice, conv.id)) == ["old"]
    pruned = await store.prune(2_000)
    assert (pruned.conversations, pruned.items) == (1, 1)


async def test_changing_metadata_or_deleting_an_item_is_a_use(
    store: SessionStore, engine: AsyncEngine, two_accounts: tuple[str, str]
) -> None:
    """Retention counts from a conversation's last use. A metadata change or an item deleted
    left its time as it was, and the next pass removed a conversation just edited; adding
    items and turns already counted. Another account's attempt changes nothing (404)."""
    alice, bob = two_accounts
    edited, _ = await store.create_conversation(alice, new_id("conv"), items=user("e"))
    trimmed, [first] = await store.create_conversation(alice, new_id("conv"), items=user("t"))
    idle, _ = await store.create_conversation(alice, new_id("conv"), items=user("i"))
    await _aged(engine, conversations, [edited.id, trimmed.id, idle.id], "updated_at", 1_000)
    with pytest.raises(errors.NotFound):
        await store.update_conversation(bob, edited.id, {"by": "bob"})
    with pytest.raises(errors.NotFound):
        await store.delete_item(bob, trimmed.id, first.id)
    for conv in (edited, trimmed):
        assert (await store.get_conversation(alice, conv.id)).updated_at == 1_000
    await store.update_conversation(alice, edited.id, {"still": "in use"})
    await store.delete_item(alice, trimmed.id, first.id)
    await store.prune(2_000)
    with pytest.raises(errors.NotFound):
        await store.get_conversation(alice, idle.id)
    assert (await store.get_conversation(alice, edited.id)).metadata == {"still": "in use"}
    assert await store.conversation_items(alice, trimmed.id) == []
