"""A model's prices (``input_price_per_mtok``, ``output_price_per_mtok`` on its ``[[models]]``
table) become the cost of every usage record it answers, whole or streamed, and the metrics'
``chatgate_cost_usd``; a model without prices costs nothing."""

from __future__ import annotations

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
