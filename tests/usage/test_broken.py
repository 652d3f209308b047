"""A stream the upstream breaks after its start reaches the client as a 200 and an error event,
and is recorded as the failure it was: the failure's status and code, counted among the
rollups' errors and in the metrics; a whole stream stays a success."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.helpers import Upstream, served_app, stored_usage
from tests.usage.test_metrics import parse

BROKEN = """
[[models]]
name = "gpt-break"
base_url = "{base}"
upstream_model = "break-stream"

[[models]]
name = "gpt-stall"
base_url = "{base}"
upstream_model = "stall-stream"
idle_timeout = 0.3
"""

CASES = {  # model: the record's status and error code
    "gpt-break": (502, "upstream_error"),
    "gpt-stall": (504, "upstream_timeout"),
    "gpt-test": (200, None),
}


@pytest.mark.parametrize("endpoint", ["chat/completions", "responses"])
async def test_a_stream_broken_after_its_start_is_recorded_as_a_failure(
    upstream: Upstream, tmp_path: Path, endpoint: str
) -> None:
    extra = BROKEN.format(base=upstream.base_url)
    async with (
        served_app(tmp_path, upstream, extra_toml=extra) as (server, key),
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=60)
        ) as session,
    ):
        for model in CASES:
            text = "hello there"
            body = (
                {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}
                if endpoint == "chat/completions"
                else {"model": model, "input": text, "stream": True}
            )
            async with session.post(server.make_url(f"/v1/{endpoint}"), json=body) as resp:
                assert resp.status == 200  # the stream had started
                sent = await resp.text()
            failed = 'data: {"error"' in sent or "event: response.failed" in sent
            assert failed == (model != "gpt-test"), sent
        async with session.get(server.make_url("/metrics")) as resp:
            metered = parse(await resp.text())
    records, rollups = await stored_usage(tmp_path, "model", "status", "error_code", "streamed")
    assert sorted(records) == sorted((m, s, code, True) for m, (s, code) in CASES.items())
    for model, (status, _) in CASES.items():
        assert rollups[model] == (1, int(status >= 400))
        labels = (("endpoint", endpoint.replace("/", ".")), ("model", model))
        assert metered[("chatgate_requests_total", (*labels, ("status", str(status))))] == 1
