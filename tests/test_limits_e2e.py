"""Limits end to end: two real gateway processes sharing PostgreSQL and Redis admit no more
than the limit together; the official SDK sees RateLimitError and its retry succeeds; a Redis
outage is handled fail-open or fail-closed as configured, and both recover."""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests

from chatgate.usage.spool import Spool
from tests.helpers import REDIS_URL, Gateway, Upstream, drop_redis_prefix, make_gateway
from tests.redisserver import RedisServer
from tests.usage.factory import make_record

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def account_with_plan(gw: Gateway, **limits: int) -> str:
    name = "p" + secrets.token_hex(4)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in limits.items()]
    gw.cli("plans", "create", name, *args)
    email = f"{name}@example.com"
    gw.cli("accounts", "create", email, "--plan", name)
    return str(gw.cli_json("keys", "create", "--account", email)["key"])


async def burst(urls: list[str], key: str, n: int, body: dict[str, Any] = BODY) -> list[int]:
    """``n`` concurrent requests spread over ``urls``; their statuses."""
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            url = urls[i % len(urls)] + "/v1/chat/completions"
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_two_processes_admit_exactly_the_daily_limit(pair: list[Gateway]) -> None:
    key = account_with_plan(pair[0], rpd=37)
    statuses = asyncio.run(burst([gw.url for gw in pair], key, 200))
    assert statuses.count(200) == 37
    assert statuses.count(429) == 163


def test_two_processes_per_minute_limit(pair: list[Gateway]) -> None:
    # GCRA refills continuously: a burst lasting t seconds may admit N + t*N/60 more.
    key = account_with_plan(pair[0], rpm=50)
    started = time.monotonic()
    statuses = asyncio.run(burst([gw.url for gw in pair], key, 200))
    elapsed = time.monotonic() - started
    assert 50 <= statuses.count(200) <= 50 + int(elapsed * 50 / 60) + 1
    assert statuses.count(200) + statuses.count(429) == 200


def test_rate_limit_answer_shape(pair: list[Gateway]) -> None:
    key = account_with_plan(pair[0], rpm=4)
    headers = {"Authorization": f"Bearer {key}"}
    # An admitted request whose upstream fails still says where the limits stand.
    failed = requests.post(
        pair[0].url + "/v1/chat/completions",
        json={**BODY, "model": "gpt-dead"},
        headers=headers,
        timeout=30,
    )
    assert failed.status_code == 502
    assert failed.headers["x-ratelimit-limit-requests"] == "4"
    assert failed.headers["x-ratelimit-remaining-requests"] == "3"
    ok = [
        requests.post(
            pair[i % 2].url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
        )
        for i in range(3)
    ]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "4"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    assert ok[-1].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = requests.post(
        pair[1].url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
    )
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "Limit 4, Used 4, Requested 1" in error["message"]
    assert "requests per min (RPM)" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["retry-after-ms"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_and_quota(pair: list[Gateway]) -> None:
    key = account_with_plan(pair[0], tpm=50)
    body = {**BODY, "max_tokens": 1000}
    resp = requests.post(
        pair[0].url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert resp.status_code == 429  # can never fit: "Request too large"
    assert resp.json()["error"]["type"] == "tokens"
    assert "Request too large" in resp.json()["error"]["message"]
    # Naming no max_tokens, it is not too large: the server's default output budget (4,096)
    # is held only as far as the limit allows, and the answer's real tokens are charged.
    unnamed = requests.post(
        pair[0].url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert unnamed.status_code == 200, unnamed.text
    # All 50 were held; the answer, settled before it left, says what its real tokens left.
    used = unnamed.json()["usage"]["total_tokens"]
    assert int(unnamed.headers["x-ratelimit-remaining-tokens"]) == 50 - used

    key = account_with_plan(pair[0], monthly_tokens=10)
    refused = requests.post(
        pair[0].url + "/v1/chat/completions",
        json={**BODY, "max_tokens": 100},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
    # Nothing used yet: the message says what would fit, not only "exceeded".
    message = refused.json()["error"]["message"]
    assert "Used 0," in message and "10 tokens are left this month" in message
    assert "smaller max_tokens" in message


async def stream_burst(urls: list[str], key: str, n: int) -> list[int | None]:
    """``n`` concurrent streamed requests; each one's total tokens from its usage chunk."""
    body = {**BODY, "stream": True, "max_tokens": 10, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int | None:
            async with session.post(
                urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=headers
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    assert resp.status == 429
                    return None
                usage = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
                return int(usage[-1]["usage"]["total_tokens"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_monthly_quota_under_concurrent_streams(pair: list[Gateway]) -> None:
    quota = 600
    key = account_with_plan(pair[0], monthly_tokens=quota)
    results = asyncio.run(stream_burst([gw.url for gw in pair], key, 120))
    used = [r for r in results if r is not None]
    reservation = 40  # generous bound on prompt tokens counted + max_tokens (10)
    assert sum(used) <= quota + reservation  # never over by more than one reservation
    assert len(used) >= quota // reservation  # and no false 429 far below the quota
    assert results.count(None) == 120 - len(used) > 0


def test_openai_sdk_rate_limit_error_and_retry(pair: list[Gateway]) -> None:
    key = account_with_plan(pair[0], rpm=60)
    statuses = asyncio.run(burst([pair[0].url], key, 60))
    assert statuses.count(200) >= 60 - 1
    strict = openai.OpenAI(base_url=pair[1].url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(3):  # the bucket refills one request per second
            strict.chat.completions.create(**BODY)
    assert info.value.code == "rate_limit_exceeded"
    patient = openai.OpenAI(base_url=pair[1].url + "/v1", api_key=key, max_retries=4)
    reply = patient.chat.completions.create(**BODY)  # waits retry-after, then succeeds
    assert reply.choices[0].message.content


def test_plan_change_takes_effect_without_restart(pair: list[Gateway]) -> None:
    key = account_with_plan(pair[0], rpd=1)
    headers = {"Authorization": f"Bearer {key}"}
    url = pair[1].url + "/v1/chat/completions"
    assert requests.post(url, json=BODY, headers=headers, timeout=10).status_code == 200
    assert requests.post(url, json=BODY, headers=headers, timeout=10).status_code == 429
    email = [
        a
        for a in pair[0].cli_json("accounts", "list")
        if a["plan"] not in ("free", "pro", "enterprise")
    ][-1]["email"]
    pair[0].cli("accounts", "set-plan", email, "enterprise")
    time.sleep(1.0)
    assert requests.post(url, json=BODY, headers=headers, timeout=10).status_code == 200


def test_redis_outage_fail_open_and_closed(
    own_redis: RedisServer, pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    url = own_redis.url
    gws = {
        mode: make_gateway(
            tmp_path / mode,
            database_url=pg_url,
            upstream=upstream,
            extra_env={
                "CHATGATE_REDIS_URL": url,
                "CHATGATE_RATELIMIT_FAIL_OPEN": flag,
            },
        ).start()
        for mode, flag in (("open", "1"), ("closed", "0"))
    }
    try:
        key = account_with_plan(gws["open"], rpm=1000)
        headers = {"Authorization": f"Bearer {key}"}

        def status(mode: str) -> int:
            return requests.post(
                gws[mode].url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
            ).status_code

        assert status("open") == 200 and status("closed") == 200
        own_redis.stop()
        assert status("open") == 200
        closed = requests.post(
            gws["closed"].url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
        )
        assert closed.status_code == 503 and closed.json()["error"]["type"] == "server_error"
        own_redis.start()
        time.sleep(1.5)  # the failover cool-down
        assert status("open") == 200 and status("closed") == 200
    finally:
        for gw in gws.values():
            gw.stop()


def test_a_key_carries_tighter_limits_of_its_own(pair: list[Gateway]) -> None:
    """README: "a key may carry tighter ones". The operator gives them with ``keys create``,
    the account with ``POST /api/keys``; the key is held to them and its plan binds still."""
    plan = "p" + secrets.token_hex(4)
    pair[0].cli("plans", "create", plan, "--rpm=100", "--rpd=3")
    email = f"{plan}@example.com"
    pair[0].cli("accounts", "create", email, "--plan", plan)
    tight = pair[0].cli_json("keys", "create", "--account", email, "--rpm", "2")
    assert tight["rpm"] == 2 and tight["tpm"] is None  # the record shows the key's own limits
    loose = pair[0].cli_json("keys", "create", "--account", email, "--rpd", "1000")
    url = pair[1].url + "/v1/chat/completions"

    def post(key: str) -> requests.Response:
        return requests.post(url, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=10)

    answers = [post(tight["key"]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"  # the key's, the tighter
    assert "Limit 2, Used 2, Requested 1" in answers[2].json()["error"]["message"]
    # Another key of the account is not held to it; the plan's rpd (3) binds a looser key.
    assert post(loose["key"]).status_code == 200
    refused = post(loose["key"])
    assert refused.status_code == 429 and "requests per day (RPD): Limit 3" in refused.text

    # The account gives a new key a limit of its own through the API.
    other = account_with_plan(pair[0], rpm=100)
    made = requests.post(
        pair[0].url + "/api/keys",
        json={"name": "script", "rpm": 1},
        headers={"Authorization": f"Bearer {other}"},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    assert made.json()["rpm"] == 1
    assert [post(made.json()["key"]).status_code for _ in range(2)] == [200, 429]
    bad = requests.post(
        pair[0].url + "/api/keys",
        json={"rpm": -1},
        headers={"Authorization": f"Bearer {other}"},
        timeout=10,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"


def recorded_tokens(gw: Gateway, email: str) -> int:
    report = gw.cli("usage", "--account", email, "--since", "1d", "--format", "json").stdout
    return int(json.loads(report)["totals"]["total_tokens"])


def started_pair(
    tmp_path: Path, pg_url: str, upstream: Upstream, toml: str, env: dict[str, str]
) -> list[Gateway]:
    """Two gateways on one PostgreSQL database and one Redis (``env``), with ``toml``'s
    models too; started."""
    return [
        make_gateway(
            tmp_path / f"gw{i}",
            database_url=pg_url,
            upstream=upstream,
            extra_env=env,
            extra_toml=toml,
        ).start()
        for i in range(2)
    ]


def quota_answer(gw: Gateway, key: str, model: str = "gpt-test") -> requests.Response:
    return requests.post(
        gw.url + "/v1/chat/completions",
        json={**BODY, "model": model, "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def use_up(gw: Gateway, key: str) -> int:
    """Spend a quota sized for four requests; the tokens charged (the fifth is refused)."""
    used = 0
    for _ in range(4):
        answer = quota_answer(gw, key)
        assert answer.status_code == 200, answer.text
        used += answer.json()["usage"]["total_tokens"]
    refused = quota_answer(gw, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert f"Used {used}," in refused.json()["error"]["message"]
    return used


def test_a_restart_keeps_the_months_quota_and_the_days_requests(
    upstream: Upstream, tmp_path: Path
) -> None:
    """The default install (one process, SQLite, in-process limits): the limits live in the
    process, and a new one starts them from the usage records, not from 0. Requests refused
    before the limits took them (a malformed body, an unknown model) took nothing from the
    day's requests, before the restart or after it."""
    gw = make_gateway(tmp_path / "gw", upstream=upstream).start()
    try:
        key = account_with_plan(gw, monthly_tokens=60)  # 12 tokens a request: 4 fit, not 5
        used = use_up(gw, key)
        daily = account_with_plan(gw, rpd=3)
        assert [quota_answer(gw, daily).status_code for _ in range(4)] == [200, 200, 200, 429]
        careless = account_with_plan(gw, rpd=3)
        assert quota_answer(gw, careless, model="no-such-model").status_code == 404
        malformed = requests.post(
            gw.url + "/v1/chat/completions",
            json={"model": "gpt-test", "messages": "hello"},
            headers={"Authorization": f"Bearer {careless}"},
            timeout=10,
        )
        assert malformed.status_code == 400, malformed.text
        assert quota_answer(gw, careless).status_code == 200
        gw.stop()
        gw.start()
        assert [quota_answer(gw, careless).status_code for _ in range(3)] == [200, 200, 429], (
            "the requests refused before the limits were counted as taken after a restart"
        )
        refused = quota_answer(gw, key)
        assert refused.status_code == 429, "a restart gave the month's quota back"
        assert f"Used {used}," in refused.json()["error"]["message"]
        refused = quota_answer(gw, daily)
        assert refused.status_code == 429, "a restart gave the day's requests back"
        assert "requests per day (RPD): Limit 3, Used 3" in refused.json()["error"]["message"]
    finally:
        gw.stop()


def test_a_stopped_process_s_spool_counts_against_the_quota_once_replayed(
    upstream: Upstream, tmp_path: Path
) -> None:
    """QA: PostgreSQL without Redis, a database outage spooled 420 tokens of usage, and the
    restart after it seeded the limits before it replayed that spool: the account went on to
    1,407 tokens of a 1,000 quota. A stopped process's spool replayed now seeds the limits
    again (here a spool left by a process that stopped, its usage never written)."""
    gw = make_gateway(tmp_path / "gw", upstream=upstream).start()
    gw.cli("plans", "create", "spooled", "--monthly-tokens=1000")
    gw.cli("accounts", "create", "spooled@example.com", "--plan", "spooled")
    mine = gw.cli_json("keys", "create", "--account", "spooled@example.com")
    key = mine["key"]
    gw.stop()
    spool = Spool(tmp_path / "gw" / "data" / "spool")
    spool.append(
        [
            make_record(
                account_id=mine["account_id"],
                key_id=mine["id"],
                prompt_tokens=450,
                completion_tokens=450,
            )
        ]
    )
    spool.release()  # its lock goes: the file of a process that has stopped
    logged = len(gw.logs())  # the log so far: the first start's (its seed said so too)
    gw.start()
    try:
        deadline = time.monotonic() + 20
        while "replayed the spool of a stopped process" not in gw.logs():
            assert time.monotonic() < deadline, "the spool was not replayed"
            time.sleep(0.1)
        # The seed follows the replay at once (the first was at this start; the old code had
        # no second). The first start's lines are not counted: with them, this waited for
        # nothing, and the request below could come before the seed (a fresh-clone run).
        while gw.logs()[logged:].count("seeded from the usage records") < 2:
            assert time.monotonic() < deadline, "the limits were not seeded again"
            time.sleep(0.1)
        refused = requests.post(
            gw.url + "/v1/chat/completions",
            json={**BODY, "max_tokens": 200},  # 900 + ~210 > 1,000
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert refused.status_code == 429, "the spooled usage did not count against the quota"
        assert refused.json()["error"]["code"] == "insufficient_quota"
    finally:
        gw.stop()


def test_an_account_moved_onto_a_quota_mid_month_is_held_to_the_months_usage(
    upstream: Upstream, tmp_path: Path
) -> None:
    """An account that had used its new plan's whole quota on its old plan was given all of it
    again by the running process (its counter began at 0 with the change), and none of it by
    a process started after (seeded from the month's records). Now the change is seeded
    before it is applied: the first request on the new plan is refused."""
    gw = make_gateway(
        tmp_path / "gw", upstream=upstream, extra_env={"CHATGATE_USAGE_FLUSH_INTERVAL": "0.2"}
    ).start()
    try:
        tag = secrets.token_hex(4)
        gw.cli("plans", "create", f"roomy-{tag}", "--rpm=1000")
        gw.cli("plans", "create", f"tight-{tag}", "--rpm=999", "--monthly-tokens=60")
        email = f"moved-{tag}@example.com"
        gw.cli("accounts", "create", email, "--plan", f"roomy-{tag}")
        key = str(gw.cli_json("keys", "create", "--account", email)["key"])
        used = 0
        while used < 60:  # the new plan's whole quota, spent on the old plan
            answer = quota_answer(gw, key)
            assert answer.status_code == 200, answer.text
            used += answer.json()["usage"]["total_tokens"]
        deadline = time.monotonic() + 30
        while recorded_tokens(gw, email) < used:  # flushed every 0.2 s
            assert time.monotonic() < deadline, "the usage was never recorded"
            time.sleep(0.2)
        gw.cli("accounts", "set-plan", email, f"tight-{tag}")
        admitted_on_the_new_plan = 0
        deadline = time.monotonic() + 30
        while (answer := quota_answer(gw, key)).status_code == 200:
            if answer.headers["x-ratelimit-limit-requests"] == "999":
                admitted_on_the_new_plan += 1
            assert time.monotonic() < deadline, "the quota was never applied"
        assert answer.json()["error"]["code"] == "insufficient_quota", answer.text
        # With the counter at 0 the new plan let five through.
        assert admitted_on_the_new_plan == 0, admitted_on_the_new_plan
    finally:
        gw.stop()


PRICED = """
[[models]]
name = "gpt-priced"
base_url = "{base}"
upstream_model = "fake-model"
input_price_per_mtok = 1000.0
output_price_per_mtok = 1000.0
"""


def priced_answer(gw: Gateway, key: str) -> requests.Response:
    return quota_answer(gw, key, "gpt-priced")


def test_a_monthly_budget_in_dollars_holds_across_a_restart(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A plan of 5 US cents a month, on a model at $1,000 a million tokens (a cent for 10
    tokens): requests pass until the month's spend leaves no room for one more, then 429
    ``insufficient_quota`` in dollars; the spend is the usage records' cost, so it survives a
    restart; a model without prices costs nothing."""
    gw = make_gateway(
        tmp_path / "gw", upstream=upstream, extra_toml=PRICED.format(base=upstream.base_url)
    ).start()
    try:
        tag = secrets.token_hex(4)
        gw.cli("plans", "create", f"budget-{tag}", "--monthly-budget-cents=5")
        email = f"spender-{tag}@example.com"
        gw.cli("accounts", "create", email, "--plan", f"budget-{tag}")
        key = str(gw.cli_json("keys", "create", "--account", email)["key"])
        spent = 0.0
        while (answer := priced_answer(gw, key)).status_code == 200:
            tokens = answer.json()["usage"]["total_tokens"]
            spent += tokens * 1000.0 / 1e6
            assert spent <= 0.05 + 1e-9, "spent beyond the budget"
        error = answer.json()["error"]
        assert answer.status_code == 429 and error["code"] == "insufficient_quota", error
        assert answer.headers["x-should-retry"] == "false"
        assert "Monthly budget: Limit $0.05, Used $" in error["message"], error["message"]
        assert spent >= 0.05 - 0.02  # refused only when one more would not fit
        assert quota_answer(gw, key).status_code == 200  # gpt-test has no prices: free
        plans = {p["name"]: p for p in gw.cli_json("plans", "list")}
        assert plans[f"budget-{tag}"]["monthly_budget_cents"] == 5
        # The account sees its spend against the budget on its plan page.
        from tests.dashboard.conftest import PASSWORD, User, set_password

        set_password(gw, email, PASSWORD)
        user = User(gw, email)
        assert user.login().status_code == 200
        page = user.http.get(user.url("/dashboard/plan"), timeout=30)
        assert "Spent this month" in page.text, page.text[:300]
        assert "/ $0.05" in page.text and "Budget/month" in page.text
        # The usage page prices each model's row (rounded up to the cent) once recorded.
        cost = f"${math.ceil(round(spent * 100, 6)) / 100:.2f}"
        deadline = time.monotonic() + 15
        while True:
            usage = user.http.get(user.url("/dashboard/usage?by=model"), timeout=30).text
            rows = [row for row in usage.split("<tr>") if 'data-label="Model">gpt-priced<' in row]
            if rows and f'data-label="Cost">{cost}<' in rows[0]:
                # and their mean latency, rolled up with them
                assert re.search(r'data-label="Avg latency">[\d,]+ ms<', rows[0]), rows[0]
                break
            assert time.monotonic() < deadline, rows or usage[:300]
            time.sleep(0.3)
        gw.stop()
        gw.start()
        refused = priced_answer(gw, key)
        assert refused.status_code == 429, "a restart gave the month's budget back"
        assert "Monthly budget" in refused.json()["error"]["message"]
    finally:
        gw.stop()


LOPSIDED = """
[[models]]
name = "gpt-lopsided"
base_url = "{base}"
upstream_model = "fake-model"
input_price_per_mtok = 1.0
output_price_per_mtok = 1000.0
"""


def test_a_budget_holds_the_prompt_at_the_input_price(upstream: Upstream, tmp_path: Path) -> None:
    """A budget holds the prompt at the model's input price and max_tokens at its output
    price: a long prompt on a cheap input fits a 1-cent budget (held at the output price it
    was refused, as if each prompt token cost $0.001), and a max_tokens whose output alone is
    dearer than the budget is refused, naming what it held."""
    gw = make_gateway(
        tmp_path / "gw", upstream=upstream, extra_toml=LOPSIDED.format(base=upstream.base_url)
    ).start()
    try:
        key = account_with_plan(gw, monthly_budget_cents=1)

        def ask(content: str, max_tokens: int) -> requests.Response:
            return requests.post(
                gw.url + "/v1/chat/completions",
                json={
                    "model": "gpt-lopsided",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens,
                },
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )

        # 20 output tokens at $1,000 a million: $0.02 (and the prompt, shown rounded up).
        refused = ask("Hi", 20)
        assert refused.status_code == 429, refused.text
        message = refused.json()["error"]["message"]
        assert "Limit $0.01, Used $0.00, Requested up to $0.020008" in message, message
        assert "the prompt at gpt-lopsided's input price" in message, message
        # ~1,000 prompt tokens at $1 a million ($0.001) and 2 output tokens ($0.002).
        long_prompt = ask("word " * 1000, 2)
        assert long_prompt.status_code == 200, long_prompt.text
        assert long_prompt.json()["usage"]["prompt_tokens"] >= 1000
    finally:
        gw.stop()


def test_two_processes_hold_a_budget_together(
    pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """Two gateways sharing PostgreSQL and Redis, a burst of concurrent priced requests on
    both: the month's spend never goes past the budget by more than one request, and the
    budget is used, not refused early."""
    prefix = f"cgbudget-{secrets.token_hex(4)}:"
    env = {"CHATGATE_REDIS_URL": REDIS_URL, "CHATGATE_REDIS_PREFIX": prefix}
    toml = PRICED.format(base=upstream.base_url)
    gws = started_pair(tmp_path, pg_url, upstream, toml, env)
    try:
        key = account_with_plan(gws[0], monthly_budget_cents=20)
        first = priced_answer(gws[0], key)
        assert first.status_code == 200, first.text
        per_request = first.json()["usage"]["total_tokens"] * 1000.0 / 1e6  # US dollars
        body = {**BODY, "model": "gpt-priced", "max_tokens": 5}
        statuses = asyncio.run(burst([gw.url for gw in gws], key, 60, body))
        assert set(statuses) <= {200, 429}, statuses
        admitted = 1 + statuses.count(200)
        # Then what is left, if any. A settlement reaches Redis shortly after its answer (with
        # its process's next admission, or 20 ms later), so the other process may still see a
        # reservation where the cost is less: a refusal counts once every settlement is in.
        while True:
            if priced_answer(gws[admitted % 2], key).status_code != 200:
                time.sleep(0.5)
                if priced_answer(gws[admitted % 2], key).status_code != 200:
                    break
            admitted += 1
        assert admitted * per_request <= 0.20 + per_request + 1e-9, (admitted, per_request)
        assert admitted * per_request >= 0.20 - per_request - 1e-9, (admitted, per_request)
    finally:
        for gw in gws:
            gw.stop()
        drop_redis_prefix(prefix)


def _quota_spent_on_redis(
    own_redis: RedisServer, pg_url: str, upstream: Upstream, tmp_path: Path
) -> tuple[Gateway, str, int]:
    """A gateway on ``own_redis`` and a key whose month's quota it has spent, the usage in
    the database's records: the gateway, the key and the tokens used."""
    gw = make_gateway(
        tmp_path / "gw",
        database_url=pg_url,
        upstream=upstream,
        extra_env={"CHATGATE_REDIS_URL": own_redis.url, "CHATGATE_USAGE_FLUSH_INTERVAL": "0.2"},
    ).start()
    try:
        key = account_with_plan(gw, monthly_tokens=60)
        used = use_up(gw, key)
    except BaseException:
        gw.stop()
        raise
    time.sleep(1.0)  # the usage records reach the database (flushed every 0.2 s)
    return gw, key, used


def test_a_redis_that_lost_its_data_gets_the_quotas_back(
    own_redis: RedisServer, pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """Redis without persistence restarts empty: the gateways see the month's marker gone
    and seed the counters again from PostgreSQL's usage records."""
    gw, key, used = _quota_spent_on_redis(own_redis, pg_url, upstream, tmp_path)
    try:
        own_redis.stop()
        own_redis.start()  # empty: every counter is gone
        import redis

        marker = f"chatgate:rl:seeded|{time.strftime('%Y-%m', time.gmtime())}"
        client = redis.Redis.from_url(own_redis.url)
        deadline = time.monotonic() + 60
        while not client.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.2)  # a seeding pass every 5 s finds the marker gone
        client.close()
        refused = quota_answer(gw, key)
        assert refused.status_code == 429, "Redis restarted empty gave the month's quota back"
        assert f"Used {used}," in refused.json()["error"]["message"]
    finally:
        gw.stop()


def test_a_redis_outage_does_not_give_a_spent_quota_back(
    own_redis: RedisServer, pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """QA: failing open, the first requests of a Redis outage met the in-process fallback as
    it was at its last seed, before the month's usage: each process admitted a spent quota's
    worth again (891 tokens recorded against a 300-token quota on two nodes) until the next
    seeding pass, up to 5 s later. Now the outage's start seeds the fallback at once, and its
    first admissions wait for that: the spent quota is refused from the first request on."""
    gw, key, used = _quota_spent_on_redis(own_redis, pg_url, upstream, tmp_path)
    try:
        own_redis.stop()
        for _ in range(3):
            refused = quota_answer(gw, key)
            assert refused.status_code == 429, "a Redis outage gave the month's quota back"
            assert refused.json()["error"]["code"] == "insufficient_quota"
            assert f"Used {used}," in refused.json()["error"]["message"]
        assert "rate limiter store unavailable" in gw.logs()  # the fallback answered
    finally:
        gw.stop()


def test_in_a_redis_outage_each_node_sees_the_others_quota_use(
    own_redis: RedisServer, pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """QA: failing open, each node's fallback was seeded once, when the outage began, and then
    counted its own requests only: three nodes admitted 1,668 tokens against a 600-token
    quota in a 20-second outage. The fallback is seeded again from the records every second
    of an outage now: what one node spent, the other refuses."""
    env = {"CHATGATE_REDIS_URL": own_redis.url, "CHATGATE_USAGE_FLUSH_INTERVAL": "0.2"}
    one = make_gateway(tmp_path / "one", database_url=pg_url, upstream=upstream, extra_env=env)
    two = make_gateway(tmp_path / "two", database_url=pg_url, upstream=upstream, extra_env=env)
    one.start()
    try:
        two.start()
        try:
            key = account_with_plan(one, monthly_tokens=60)  # four requests' worth
            own_redis.stop()
            assert quota_answer(two, key).status_code == 200  # its outage begins: seeded
            spent = 0
            for _ in range(10):  # the other spends the rest in its own outage
                answer = quota_answer(one, key)
                if answer.status_code != 200:
                    break
                spent += 1
            assert answer.json()["error"]["code"] == "insufficient_quota", answer.text
            assert spent in (3, 4)  # 4: its seed came before the other's record was written
            time.sleep(2.5)  # its records flushed (0.2 s), and a seeding pass (1 s)
            refused = quota_answer(two, key)
            assert refused.status_code == 429, "a node admitted what another had spent"
            assert refused.json()["error"]["code"] == "insufficient_quota"
        finally:
            two.stop()
    finally:
        one.stop()


STALL = """
[[models]]
name = "gpt-stall"
base_url = "{base}"
upstream_model = "stall-stream"
"""


def test_a_killed_gateways_slots_free_within_the_lease_ttl(
    pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A stream running longer than the lease TTL keeps its slot (its process renews the
    lease); a gateway killed with it in flight lets the slot go one TTL later, for every
    other gateway sharing Redis (the TTL is 3 s here, 60 s by default; it was 15 minutes),
    and gives back what it had reserved of the monthly quota (kept until the month's end)."""
    env = {
        "CHATGATE_REDIS_URL": REDIS_URL,
        "CHATGATE_REDIS_PREFIX": f"cgtest-{secrets.token_hex(4)}:",
        "CHATGATE_LEASE_TTL": "3",
    }
    extra = STALL.format(base=upstream.base_url)
    gws = started_pair(tmp_path, pg_url, upstream, extra, env)
    doomed, survivor = gws
    try:
        key = account_with_plan(survivor, concurrency=1, monthly_tokens=6000)
        headers = {"Authorization": f"Bearer {key}"}
        small = {**BODY, "max_tokens": 10}
        large = {**BODY, "max_tokens": 3000}  # fits only once the stream's 4,000 are back
        stalled = {**BODY, "model": "gpt-stall", "stream": True, "max_tokens": 4000}
        with requests.post(
            doomed.url + "/v1/chat/completions",
            json=stalled,
            headers=headers,
            stream=True,
            timeout=60,
        ) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith(b"data: {")
            time.sleep(5)  # past the TTL: only the renewals keep the slot
            held = requests.post(
                survivor.url + "/v1/chat/completions", json=small, headers=headers, timeout=10
            )
            assert held.status_code == 429, "a running stream lost its slot after one TTL"
            assert "concurrent requests" in held.json()["error"]["message"]
            doomed.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30
        statuses = []
        while time.monotonic() < deadline:
            answer = requests.post(
                survivor.url + "/v1/chat/completions", json=large, headers=headers, timeout=10
            )
            statuses.append((answer.status_code, answer.json().get("error", {}).get("code")))
            if answer.status_code == 200:
                break
            time.sleep(0.5)
        assert statuses[-1][0] == 200, f"the dead gateway's reservation was still held: {statuses}"
    finally:
        for gw in gws:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
        drop_redis_prefix(env["CHATGATE_REDIS_PREFIX"])
