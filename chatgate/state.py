"""The objects one server process holds, created at start-up and shared by all handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore, PlanStore
from chatgate.auth import Authenticator, Principal
from chatgate.backends.router import Router
from chatgate.keys.store import KeyStore
from chatgate.settings import Settings


@dataclass(slots=True)
class State:
    settings: Settings
    engine: AsyncEngine
    keys: KeyStore
    accounts: AccountStore
    plans: PlanStore
    auth: Authenticator
    router: Router
    started_at: float = 0.0
    extras: dict[str, object] = field(default_factory=dict)


STATE = web.AppKey("chatgate_state", State)
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
