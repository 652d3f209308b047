"""Backend health for operators: ``GET /api/admin/backends`` and ``GET /readyz``.

``/api/admin/backends`` (admin keys only; anyone else gets the same 404 as an unknown URL)
lists every deployment with its circuit-breaker state, failure counters, last error label and
in-flight requests (:meth:`chatgate.backends.router.Router.status`). No URLs, no keys.

``/readyz`` needs no key (load balancers call it) and says whether this process can serve:

* ``database``: its migration read within :data:`DB_TIMEOUT` seconds, not behind this
  code's (``SchemaBehind``: run ``chatgate migrate``), and writable (``ReadOnlyDatabase``: a
  PostgreSQL standby answers every read and refuses every usage flush);
* ``redis`` (only when ``CHATGATE_REDIS_URL`` is set): a write (``SET <prefix>readyz``, which
  expires) within ``redis_timeout``: a read-only replica fails it (``ReadOnlyError``);
* ``backends``: per public model, how many deployments are usable (breaker not open).

It answers 200 ``{"status": "ok"}`` when the database (and Redis, when configured) answer,
else 503 ``{"status": "unavailable"}``. Backends are reported but do not fail readiness: every
gateway process sees the same upstreams, so pulling them all from the load balancer would only
turn a clear 502 into a connection error. The body names models and states, never URLs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from chatgate import errors
from chatgate.api.manage import caller
from chatgate.api.openai import json_response
from chatgate.dashboard.auth import with_session
from chatgate.db.engine import ReadOnlyDatabase, SchemaBehind, read_only, schema
from chatgate.ratelimit.resp import ReplyError, RespClient, ServerUnavailable
from chatgate.settings import Settings
from chatgate.state import STATE, State

DB_TIMEOUT = 1.0
READY_KEY_TTL_MS = 60_000  # the readiness probe's own key expires on its own


class _RedisProbe:
    """A client for readiness pings, made on first use, closed at stop: the limiter's own
    (:class:`~chatgate.ratelimit.resp.RespClient`), so that readiness fails where the limits
    do (redis-py read a URL the limiter's client refused as healthy)."""

    def __init__(self) -> None:
        self._client: RespClient | None = None

    async def ping(self, settings: Settings) -> None:
        if self._client is None:
            self._client = RespClient(
                settings.redis_url or "",
                connect_timeout=settings.redis_timeout,
                timeout=settings.redis_timeout,
            )
        async with asyncio.timeout(settings.redis_timeout * 2):
            # A write, not a PING: a read-only replica (a failover that went the wrong way, a
            # replica's URL) answers PING, and refuses every limit's script.
            key = settings.redis_prefix + "readyz"
            await self._client.call("SET", key, b"1", "PX", READY_KEY_TTL_MS)

    async def close(self, app: web.Application) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


REDIS_PROBE = web.AppKey("chatgate_redis_probe", _RedisProbe)


async def backends(request: web.Request) -> web.Response:
    """Every deployment's breaker state and counters; 404 unless the caller is an admin (a
    current key, or the dashboard's session: as the other ``/api/admin`` routes)."""
    state, _ = await caller(request, admin=True)
    if request.method != "GET":  # (see manage.admin_wrong_method)
        raise errors.method_not_allowed(["GET", "HEAD"])
    data = [status.to_dict() for status in state.router.status()]
    return json_response({"object": "list", "data": data})


async def _timed(check: Awaitable[object]) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        await check
    except Exception as exc:  # any failure means "not ready"; the type is enough detail
        failure = {"ok": False, "error": type(exc).__name__}
        if isinstance(exc, ReplyError | ServerUnavailable) and str(exc):
            # Redis's error code (READONLY, NOAUTH...): the cause, and no secret.
            failure["reply"] = str(exc).removeprefix("redis: ").split()[0]
        return failure
    return {"ok": True, "latency_ms": round((time.perf_counter() - began) * 1000, 1)}


async def _database(state: State) -> None:
    """The database answers, at this code's migration or a newer one (a node started before
    ``chatgate migrate`` would fail every query that needs the new schema), and takes writes."""
    async with asyncio.timeout(DB_TIMEOUT):
        found = await schema(state.engine)
        if found.state == "behind":
            raise SchemaBehind(f"database at {found.revision}, this chatgate needs {found.head}")
        if await read_only(state.engine):
            raise ReadOnlyDatabase("the database takes reads only")


def _backends(state: State) -> dict[str, Any]:
    models: dict[str, dict[str, int]] = {}
    for status in state.router.status():
        counts = models.setdefault(status.model, {"deployments": 0, "available": 0})
        counts["deployments"] += 1
        if status.state != "open":
            counts["available"] += 1
    degraded = sorted(name for name, c in models.items() if c["available"] < c["deployments"])
    down = sorted(name for name, c in models.items() if c["available"] == 0)
    return {"ok": not down, "degraded": degraded, "down": down, "models": models}


async def readyz(request: web.Request) -> web.Response:
    """200 when the database (and Redis, if configured) answer; backends are informational."""
    state = request.app[STATE]
    checks: dict[str, Any] = {"database": _timed(_database(state))}
    if state.settings.redis_url:
        checks["redis"] = _timed(request.app[REDIS_PROBE].ping(state.settings))
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    ready = all(result["ok"] for result in results.values())
    results["backends"] = _backends(state)
    body = {"status": "ok" if ready else "unavailable", "checks": results}
    return json_response(body, status=200 if ready else 503)


def setup(app: web.Application) -> None:
    """Add ``GET /api/admin/backends`` and ``GET /readyz``."""
    probe = _RedisProbe()
    app[REDIS_PROBE] = probe
    app.on_cleanup.append(probe.close)
    app.router.add_get("/api/admin/backends", with_session(backends))
    app.router.add_route("*", "/api/admin/backends", with_session(backends))  # caller, then 405
    app.router.add_get("/readyz", readyz)


__all__ = ["backends", "readyz", "setup"]
