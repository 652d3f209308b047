"""The objects one server process holds, created at start-up and shared by all handlers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore, PlanStore
from chatgate.auth import Authenticator, Principal
from chatgate.backends.router import Router
from chatgate.keys.store import KeyStore
from chatgate.limits import Limits
from chatgate.metrics import Metrics
from chatgate.settings import Settings
from chatgate.usage.record import UsageRecord


class UsageSink(Protocol):
    """Where finished requests' usage records go (the recorder); must never block."""

    def record(self, rec: UsageRecord) -> None: ...


@dataclass(slots=True)
class State:
    settings: Settings
    engine: AsyncEngine
    keys: KeyStore
    accounts: AccountStore
    plans: PlanStore
    auth: Authenticator
    router: Router
    limits: Limits
    usage: UsageSink | None = None
    metrics: Metrics | None = None
    throttles: Redis | None = None  # shared login/sign-up/leak-report windows (chatgate.throttle)
    started_at: float = 0.0
    extras: dict[str, object] = field(default_factory=dict)


STATE = web.AppKey("chatgate_state", State)
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
