"""Test data for the usage tests: records, account ids, settings."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from chatgate.ids import ordered_id
from chatgate.settings import Settings
from chatgate.usage.record import UsageRecord


def settings_for(database_url: str, data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url=database_url, local_model=False)


def new_account() -> str:
    """A fresh account id: tests share one database per run, so each scopes to its own."""
    return "acct_" + secrets.token_hex(12)


def make_record(**fields: Any) -> UsageRecord:
    """A successful chat completion record; override any field."""
    values: dict[str, Any] = {
        "request_id": ordered_id("req"),  # as the gateway makes them
        "created_at": time.time(),
        "account_id": "acct_test",
        "key_id": "key_test",
        "model": "gpt-test",
        "backend": "openai_compat",
        "endpoint": "chat.completions",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost": 0.0,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "status": 200,
        "error_code": None,
        "conversation_id": None,
        "streamed": False,
    }
    values.update(fields)
    return UsageRecord(**values)
