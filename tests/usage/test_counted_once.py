"""A prompt is counted once a request: the token reservation's count also meters a request
whose upstream reports no usage (it was counted a second time for the meter)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from chatgate import tokens
from chatgate.accounts import AccountStore
from chatgate.app import create_app
from chatgate.db.engine import create_engine, migrate
from chatgate.keys.store import KeyStore
from chatgate.settings import Settings
from tests.helpers import Upstream, models_toml


@pytest.mark.parametrize("stream", [False, True])
async def test_the_prompt_is_counted_once(
    stream: bool, monkeypatch: pytest.MonkeyPatch, upstream: Upstream, tmp_path: Path
) -> None:
    (tmp_path / "chatgate.toml").write_text(models_toml(upstream))
    settings = Settings.from_env(
        {
            "CHATGATE_DATA_DIR": str(tmp_path / "data"),
            "CHATGATE_CONFIG": str(tmp_path / "chatgate.toml"),
            "CHATGATE_LOCAL_MODEL": "0",
        }
    )
    engine = create_engine(settings)
    await migrate(engine)
    account = await AccountStore(engine).create(f"c{secrets.token_hex(4)}@example.com")
    issued = await KeyStore(engine, settings.resolved_secret()).create(account.id)
    counted: list[Any] = []
    real = tokens.count_messages

    def spy(messages: Any, *args: Any, **kwargs: Any) -> int:
        counted.append(messages)
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(tokens, "count_messages", spy)
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    body: dict[str, Any] = {
        "model": "gpt-no-usage",  # the upstream reports none: the gateway's count is billed
        "messages": [{"role": "user", "content": "count me once"}],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url("/v1/chat/completions"),
                json=body,
                headers={"Authorization": f"Bearer {issued.key}"},
            ) as resp,
        ):
            text = await resp.text()
            assert resp.status == 200, text
            remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    finally:
        await server.close()
        await engine.dispose()
    assert len(counted) == 1, counted  # the reservation's count, kept for the meter
    prompt = real(body["messages"], "no-usage")
    assert f'"prompt_tokens":{prompt},' in text.replace(" ", "")
    assert remaining < 40_000 - prompt  # the free plan's 40,000 a minute, reserved from
