"""The usage API on the real app (aiohttp TestServer) on SQLite and PostgreSQL: OpenAI's shape
(checked with the official SDK too), pagination, parameters, and that an account never reads
another account's usage through any endpoint or filter while an admin reads all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI

from chatgate.accounts import AccountStore
from chatgate.app import create_app
from chatgate.db.engine import create_engine, migrate
from chatgate.keys.store import KeyStore
from chatgate.settings import Settings
from chatgate.usage.record import UsageRecord
from chatgate.usage.recorder import UsageRecorder
from chatgate.usage.tables import DAY, HOUR
from tests.usage.factory import make_record

BASE = 1_767_225_600  # 2026-01-01T00:00Z
COMPLETIONS = "/v1/organization/usage/completions"


@dataclass
class World:
    server: TestServer
    a_key: str  # the secret keys (Bearer)
    b_key: str
    admin_key: str
    a_ids: list[str]  # key ids
    b_ids: list[str]
    a_records: list[UsageRecord]
    b_records: list[UsageRecord]

    async def get(self, path: str, key: str | None, **params: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.server.make_url(path), params=params, headers=headers) as resp,
        ):
            return resp.status, await resp.json()


@pytest.fixture(scope="module")
async def world(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """Accounts A, B and an admin with keys and usage; read-only for the tests, so shared."""
    tmp_path = tmp_path_factory.mktemp("usage-api")
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(tmp_path / "data"),
            "CHATGATE_DATABASE_URL": database_url,
            "CHATGATE_LOCAL_MODEL": "0",
        }
    )
    engine = create_engine(settings)
    await migrate(engine)
    accounts, keys = AccountStore(engine), KeyStore(engine, settings.resolved_secret())
    tag = tmp_path.name[-12:].lower().replace("_", "")
    a = await accounts.create(f"a-{tag}@example.com")
    b = await accounts.create(f"b-{tag}@example.com")
    admin = await accounts.create(f"admin-{tag}@example.com", plan="enterprise", is_admin=True)
    a1, a2 = await keys.create(a.id, name="a1"), await keys.create(a.id, name="a2")
    b1 = await keys.create(b.id, name="b1")
    admin_key = await keys.create(admin.id, name="admin")

    def records(account: str, key_ids: list[str], n: int) -> list[UsageRecord]:
        return [
            make_record(
                account_id=account,
                key_id=key_ids[i % len(key_ids)],
                model=("gpt-test", "gpt-other")[(i // 2) % 2],
                endpoint="embeddings" if i % 10 == 9 else "chat.completions",
                created_at=BASE + i * 600 + 7,  # every 10 minutes from 00:00
                prompt_tokens=100 + i,
                completion_tokens=i,
                status=429 if i % 7 == 6 else 200,
                error_code="rate_limit_exceeded" if i % 7 == 6 else None,
                cost=0.25,
            )
            for i in range(n)
        ]

    a_ids, b_ids = [a1.record.id, a2.record.id], [b1.record.id]
    a_records, b_records = records(a.id, a_ids, 200), records(b.id, b_ids, 150)
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for rec in a_records + b_records:
        recorder.record(rec)
    await recorder.close()
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        yield World(server, a1.key, b1.key, admin_key.key, a_ids, b_ids, a_records, b_records)
    finally:
        await server.close()
        await engine.dispose()


def completions_of(records: list[UsageRecord], start: int, end: int) -> tuple[int, int, int]:
    """(input tokens, output tokens, successful requests) of chat records in [start, end)."""
    chosen = [
        r for r in records if r.endpoint == "chat.completions" and start <= r.created_at < end
    ]
    return (
        sum(r.prompt_tokens for r in chosen),
        sum(r.completion_tokens for r in chosen),
        sum(r.status < 400 for r in chosen),
    )


def sums(page: dict[str, Any]) -> tuple[int, int, int]:
    results = [res for bucket in page["data"] for res in bucket["results"]]
    return (
        sum(r["input_tokens"] for r in results),
        sum(r["output_tokens"] for r in results),
        sum(r["num_model_requests"] for r in results),
    )


async def test_openai_shape_and_own_usage_only(world: World) -> None:
    end = BASE + 2 * DAY
    status, page = await world.get(
        COMPLETIONS, world.a_key, start_time=BASE, end_time=end, group_by="api_key_id,model"
    )
    assert status == 200, page
    assert page["object"] == "page" and page["has_more"] is False and page["next_page"] is None
    assert [(b["start_time"], b["end_time"]) for b in page["data"]] == [
        (BASE, BASE + DAY),
        (BASE + DAY, end),
    ]
    result = page["data"][0]["results"][0]
    assert result["object"] == "organization.usage.completions.result"
    assert {"input_tokens", "output_tokens", "num_model_requests", "model", "api_key_id"} <= set(
        result
    )
    keys = {r["api_key_id"] for b in page["data"] for r in b["results"]}
    assert keys == set(world.a_ids)
    assert sums(page) == completions_of(world.a_records, BASE, end)


async def test_no_filter_reaches_another_account(world: World) -> None:
    end = BASE + 2 * DAY
    for params in (
        {"api_key_ids": world.b_ids[0]},
        {"api_key_ids": ",".join(world.b_ids), "group_by": "api_key_id"},
        {"api_key_ids[]": world.b_ids[0], "models": "gpt-test"},
    ):
        status, page = await world.get(
            COMPLETIONS, world.a_key, start_time=BASE, end_time=end, **params
        )
        assert status == 200
        assert all(b["results"] == [] for b in page["data"]), params
    status, dash = await world.get("/api/usage", world.a_key, start_time=BASE, end_time=end)
    assert status == 200
    assert {r["api_key_id"] for r in dash["data"]} == set(world.a_ids)
    status, denied = await world.get(
        "/api/usage", world.a_key, start_time=BASE, end_time=end, account_id="acct_other"
    )
    assert status == 403 and denied["error"]["type"] == "permission_error"
    status, dash = await world.get(
        "/api/usage", world.a_key, start_time=BASE, end_time=end, api_key_id=world.b_ids[0]
    )
    assert status == 200 and dash["data"] == [] and dash["totals"]["requests"] == 0
    status, early = await world.get("/api/usage", world.a_key, end_time=1)  # since: 30 days
    assert status == 200 and early["start_time"] == 0  # was -2591999 (QA)


async def test_admin_reads_every_account(world: World) -> None:
    end = BASE + 2 * DAY
    status, page = await world.get(
        COMPLETIONS, world.admin_key, start_time=BASE, end_time=end, group_by="api_key_id"
    )
    assert status == 200
    keys = {r["api_key_id"] for b in page["data"] for r in b["results"]}
    assert set(world.a_ids + world.b_ids) <= keys
    status, page = await world.get(
        COMPLETIONS, world.admin_key, start_time=BASE, end_time=end, api_key_ids=world.b_ids
    )
    assert sums(page) == completions_of(world.b_records, BASE, end)
    b_account = world.b_records[0].account_id
    status, dash = await world.get(
        "/api/usage", world.admin_key, start_time=BASE, end_time=end, account_id=b_account
    )
    assert status == 200
    assert dash["totals"]["requests"] == len(world.b_records)
    assert dash["totals"]["rate_limited"] == sum(r.status == 429 for r in world.b_records)


async def test_dashboard_rows_per_day_model_key(world: World) -> None:
    end = BASE + 2 * DAY
    status, dash = await world.get("/api/usage", world.a_key, start_time=BASE, end_time=end)
    assert status == 200
    totals = dash["totals"]
    assert totals["requests"] == len(world.a_records)
    assert (
        totals["errors"] == totals["rate_limited"] == sum(r.status == 429 for r in world.a_records)
    )
    assert totals["cost"] == pytest.approx(0.25 * len(world.a_records))
    row = dash["data"][0]
    assert row["date"] == "2026-01-01" and row["api_key_name"] in ("a1", "a2")
    assert {(r["date"], r["model"], r["api_key_id"]) for r in dash["data"]} == {
        (day, model, key)
        for day in ("2026-01-01", "2026-01-02")
        for model in ("gpt-test", "gpt-other")
        for key in world.a_ids
    }


async def test_pages_follow_next_page(world: World) -> None:
    start, end = BASE + 30 * 60, BASE + 12 * HOUR  # not aligned: first bucket is clipped
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {
        "start_time": start,
        "end_time": end,
        "bucket_width": "1h",
        "limit": 5,
    }
    pages = 0
    while True:
        status, page = await world.get(COMPLETIONS, world.a_key, **params)
        assert status == 200, page
        pages += 1
        seen += page["data"]
        if not page["has_more"]:
            assert page["next_page"] is None
            break
        params["page"] = page["next_page"]
    assert pages == 3
    assert [b["start_time"] for b in seen] == [start] + [BASE + h * HOUR for h in range(1, 12)]
    assert seen[-1]["end_time"] == end
    _, whole = await world.get(
        COMPLETIONS, world.a_key, start_time=start, end_time=end, bucket_width="1h", limit=12
    )
    assert whole["data"] == seen
    assert sums(whole) == completions_of(world.a_records, start, end)


async def test_group_by_spellings_agree(world: World) -> None:
    base = f"{COMPLETIONS}?start_time={BASE}&end_time={BASE + DAY}"
    answers = []
    for query in (
        "&group_by=model,api_key_id",
        "&group_by=model&group_by=api_key_id",
        "&group_by[]=model&group_by[]=api_key_id",
    ):
        status, page = await world.get(base + query, world.a_key)
        assert status == 200
        answers.append(page)
    assert answers[0] == answers[1] == answers[2]
    assert all(r["model"] and r["api_key_id"] for r in answers[0]["data"][0]["results"])


async def test_embeddings_are_reported_apart(world: World) -> None:
    status, page = await world.get(
        "/v1/organization/usage/embeddings", world.a_key, start_time=BASE, end_time=BASE + DAY
    )
    assert status == 200
    embedded = [
        r
        for r in world.a_records
        if r.endpoint == "embeddings" and r.status < 400 and r.created_at < BASE + DAY
    ]
    assert sums(page)[2] == len(embedded)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "soon"}, "start_time"),
        ({"start_time": BASE, "end_time": BASE}, "end_time"),
        ({"start_time": BASE, "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": BASE, "bucket_width": "1h", "limit": 169}, "limit"),
        ({"start_time": BASE, "group_by": "project_id"}, "group_by"),
        ({"start_time": BASE, "page": "bm90LWEtY3Vyc29y"}, "page"),
        # beyond a database's 64-bit integers: were 500s (OverflowError on SQLite)
        ({"start_time": "9" * 20, "end_time": "1" + "0" * 20}, "start_time"),
        ({"start_time": 0, "end_time": "9" * 20}, "end_time"),
        ({"start_time": 0, "end_time": 253_402_300_800}, "end_time"),  # the year 10000
    ],
)
async def test_bad_parameters_are_400(world: World, params: dict[str, Any], param: str) -> None:
    status, body = await world.get(COMPLETIONS, world.a_key, **params)
    assert status == 400
    assert body["error"]["param"] == param


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "9" * 20 + "d"}, "since"),
        ({"since": "36501d"}, "since"),  # more than 100 years
        ({"start_time": "9" * 20, "end_time": "9" * 21}, "end_time"),
        ({"start_time": "9" * 20}, "start_time"),
    ],
)
async def test_dashboard_usage_bad_parameters_are_400(
    world: World, params: dict[str, Any], param: str
) -> None:
    status, body = await world.get("/api/usage", world.a_key, **params)
    assert status == 400, body
    assert body["error"]["param"] == param
    status, _ = await world.get("/api/usage", world.a_key, since="36500d")
    assert status == 200


async def test_needs_a_key(world: World) -> None:
    for path in (COMPLETIONS, "/api/usage"):
        status, body = await world.get(path, None, start_time=BASE)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_official_sdk_reads_it(world: World) -> None:
    client = AsyncOpenAI(
        api_key=world.a_key,
        admin_api_key=world.a_key,
        base_url=str(world.server.make_url("/v1")),
        max_retries=0,
    )
    async with client:
        page = await client.admin.organization.usage.completions(
            start_time=BASE, end_time=BASE + DAY, bucket_width="1h", limit=3, group_by=["model"]
        )
    assert len(page.data) == 3 and page.has_more
    models = {r.model for b in page.data for r in b.results if hasattr(r, "model")}
    assert models == {"gpt-test", "gpt-other"}
