"""A model's prices (``input_price_per_mtok``, ``output_price_per_mtok`` on its ``[[models]]``
table) become the cost of every usage record it answers, whole or streamed, and the metrics'
``chatgate_cost_usd``; a model without prices costs nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import Upstream, served_app, stored_usage
from tests.usage.test_metrics import parse

PRICED = """
[[models]]
name = "gpt-priced"
base_url = "{base}"
upstream_model = "fake-model"
input_price_per_mtok = 2.5
output_price_per_mtok = 10
"""


async def test_each_record_costs_its_tokens_at_the_models_prices(
    upstream: Upstream, tmp_path: Path
) -> None:
    extra = PRICED.format(base=upstream.base_url)
    messages = [{"role": "user", "content": "what does this cost?"}]
    async with (
        served_app(tmp_path, upstream, extra_toml=extra) as (server, key),
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
    ):
        url = server.make_url("/v1/chat/completions")
        for model, stream in (("gpt-priced", False), ("gpt-priced", True), ("gpt-test", False)):
            body = {"model": model, "messages": messages, "stream": stream}
            async with session.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        async with session.get(server.make_url("/metrics")) as resp:
            metered = parse(await resp.text())
    rows, _ = await stored_usage(
        tmp_path, "model", "prompt_tokens", "completion_tokens", "cost_nanousd"
    )
    priced = [r for r in rows if r.model == "gpt-priced"]
    assert len(priced) == 2 and len(rows) == 3
    for row in priced:
        assert row.prompt_tokens > 0 and row.completion_tokens > 0
        # 2.5 and 10 dollars a million tokens: 2,500 and 10,000 nano-dollars a token
        assert row.cost_nanousd == row.prompt_tokens * 2_500 + row.completion_tokens * 10_000
    [free] = [r for r in rows if r.model == "gpt-test"]
    assert free.cost_nanousd == 0
    total = sum(r.cost_nanousd for r in priced) / 1e9
    assert metered[("chatgate_cost_usd_total", (("model", "gpt-priced"),))] == pytest.approx(total)
    assert ("chatgate_cost_usd_total", (("model", "gpt-test"),)) not in metered


CACHED = """
[[models]]
name = "gpt-cached"
base_url = "{base}"
upstream_model = "fake-model"
input_price_per_mtok = 2.5
cached_input_price_per_mtok = 1.25
output_price_per_mtok = 10
"""


async def test_a_prompts_cached_tokens_are_recorded_and_priced_at_the_cached_price(
    upstream: Upstream, tmp_path: Path
) -> None:
    """OpenAI reports a prompt's cached part (``prompt_tokens_details.cached_tokens``) and bills
    it at a discount: the record keeps it, prices it at ``cached_input_price_per_mtok`` (the
    input price where a model has none), and the usage API sums it as ``input_cached_tokens``.
    A cached count larger than the prompt is not one: the prompt is priced whole."""
    extra = CACHED.format(base=upstream.base_url) + PRICED.format(base=upstream.base_url)
    words = " ".join(f"word{i}" for i in range(40))
    messages = [{"role": "user", "content": words}]
    async with (
        served_app(tmp_path, upstream, extra_toml=extra) as (server, key),
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
    ):
        url = server.make_url("/v1/chat/completions")
        cases = (
            ("gpt-cached", False, 8, "whole"),
            ("gpt-cached", True, 8, "streamed"),
            ("gpt-priced", False, 8, "no cached price"),
            ("gpt-cached", False, 10**6, "more than the prompt"),
        )
        for model, stream, cached, user in cases:
            body = {"model": model, "messages": messages, "stream": stream, "user": user}
            body["fake"] = {"cached": cached}
            async with session.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        start, results = int(time.time()) - 3600, []
        for _ in range(100):  # the rollups, once the recorder's batch is written
            async with session.get(
                server.make_url("/v1/organization/usage/completions"),
                params={"start_time": str(start), "group_by": "model"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                report = await resp.json()
            results = [r for bucket in report["data"] for r in bucket["results"]]
            if len(results) == 2:
                break
            await asyncio.sleep(0.1)
    rows, _ = await stored_usage(
        tmp_path,
        "model",
        "streamed",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_nanousd",
    )
    assert len(rows) == 4
    by_case = {(r.model, r.streamed, r.cached_tokens): r for r in rows}
    for streamed in (False, True):
        row = by_case["gpt-cached", streamed, 8]
        assert row.prompt_tokens > 8 and row.completion_tokens > 0
        # 2.5 a million uncached input tokens, 1.25 cached, 10 output: in nano-dollars a token
        expected = (row.prompt_tokens - 8) * 2_500 + 8 * 1_250 + row.completion_tokens * 10_000
        assert row.cost_nanousd == expected
    plain = by_case["gpt-priced", False, 8]  # no cached price: the cached part costs as input
    assert plain.cost_nanousd == plain.prompt_tokens * 2_500 + plain.completion_tokens * 10_000
    whole = by_case["gpt-cached", False, 0]  # 10**6 of a ~50-token prompt: not a count
    assert whole.cost_nanousd == whole.prompt_tokens * 2_500 + whole.completion_tokens * 10_000
    cached = {r["model"]: r["input_cached_tokens"] for r in results}
    assert cached == {"gpt-cached": 16, "gpt-priced": 8}
