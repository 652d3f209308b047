"""``POST /api/keys/report-leak``: anyone who finds a chatgate key can have it revoked.

    POST /api/keys/report-leak        {"key": "sk-cg-..."}     (no authentication)
    202 {"object": "leak_report", "status": "received", "message": "..."}

The answer never says whether the key existed, whose it was, or what was done: every
well-formed report gets the same 202 body, and the work (hash, look up, revoke) happens after
the answer, in a worker task, so the response time does not tell either. What is revealed is
only what anyone can compute offline: whether the string is a well-formed key (checksum).

Reports are limited per client IP (:data:`REPORTS_PER_WINDOW` per :data:`WINDOW_SECONDS`,
a sliding window of :mod:`chatgate.throttle`: in process, or shared through Redis), so the
endpoint cannot be used to revoke keys by guessing at scale, nor as a cheap way to make the
server hash and write. The IP is the TCP peer: behind a reverse
proxy every client shares the proxy's budget (no proxy header is trusted).

What happens to a reported secret (:meth:`chatgate.keys.store.KeyStore.revoke_by_hash`): a
key's current secret -> the key is revoked; the old secret of a rotated key -> only that old
secret stops working. The server log names the key id and account for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from chatgate import errors
from chatgate.api.openai import json_response, read_body
from chatgate.keys import format as keyfmt
from chatgate.state import STATE
from chatgate.throttle import SlidingWindow, Window, window

__all__ = ["PATH", "openapi_paths", "setup"]

log = logging.getLogger(__name__)

PATH = "/api/keys/report-leak"
REPORTS_PER_WINDOW = 10
WINDOW_SECONDS = 60.0
QUEUE_SIZE = 10_000
DRAIN_TIMEOUT = 5.0
RECEIVED = {
    "object": "leak_report",
    "status": "received",
    "message": (
        "Thank you. If this is a live chatgate API key, it has been revoked. "
        "For privacy, we do not say whether it existed or whose it was."
    ),
}


class _Worker:
    """Revokes reported secrets after the answer has gone (one at a time, in order)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        # Per client address; shared by every process through Redis when there is one.
        self.limiter: Window = SlidingWindow(REPORTS_PER_WINDOW, WINDOW_SECONDS)

    async def run(self, app: web.Application) -> None:
        while True:
            digest = await self.queue.get()
            try:
                await self._handle(app, digest)
            finally:
                self.queue.task_done()

    async def _handle(self, app: web.Application, digest: str) -> None:
        try:
            result = await app[STATE].keys.revoke_by_hash(digest)
        except Exception:  # the database may be down; the reporter already has their answer
            log.warning("leak report: could not process a report", exc_info=True)
            return
        if result.record is None:
            log.info("leak report: not a live key of this server")
        else:
            log.warning(
                "leak report: %s for key %s (%s) of account %s",
                result.outcome,
                result.record.id,
                result.record.hint,
                result.record.account_id,
            )


WORKER = web.AppKey("chatgate_leak_worker", _Worker)


async def report_leak(request: web.Request) -> web.Response:
    """Take a report: validate, rate-limit, queue the secret's hash, answer 202 at once."""
    worker = request.app[WORKER]
    wait = await worker.limiter.take(request.remote or "unknown")
    if wait > 0:
        retry = max(int(wait + 0.999), 1)
        raise errors.RateLimited(
            f"Too many leak reports from your address. Please try again in {retry}s.",
            type="requests",
            headers={"retry-after": str(retry), "retry-after-ms": str(int(wait * 1000))},
        )
    body = await read_body(request)
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise errors.InvalidRequest("'key' must be a string.", param="key", code="invalid_type")
    if not isinstance(key, str):
        raise errors.InvalidRequest(
            "Missing required parameter: 'key'.", param="key", code="missing_required_parameter"
        )
    if not keyfmt.is_well_formed(key.strip()):
        raise errors.InvalidRequest(
            "That is not a chatgate API key (sk-cg- followed by 38 letters and digits, "
            "with a valid checksum).",
            param="key",
            code="invalid_value",
        )
    digest = request.app[STATE].keys.hash(key.strip())  # only the hash is kept, and briefly
    try:
        worker.queue.put_nowait(digest)
    except asyncio.QueueFull:
        raise errors.ServiceUnavailable(
            "Too many leak reports right now. Please try again in a minute."
        ) from None
    return json_response(RECEIVED, status=202, headers={"Cache-Control": "no-store"})


def _lifespan(worker: _Worker) -> Any:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        worker.limiter = window(
            state.throttles, state.settings, "leak-reports", REPORTS_PER_WINDOW, WINDOW_SECONDS
        )
        task = asyncio.create_task(worker.run(app), name="leak-reports")
        try:
            yield
        finally:
            # Reports already answered are processed before the process stops.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.queue.join(), DRAIN_TIMEOUT)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


def setup(app: web.Application) -> None:
    """Add the route and its worker (started after the app's state, stopped before it)."""
    worker = _Worker()
    app[WORKER] = worker
    app.cleanup_ctx.append(_lifespan(worker))
    app.router.add_post(PATH, report_leak)


def openapi_paths() -> dict[str, Any]:
    """This endpoint's part of ``/openapi.json``."""
    error = {
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    return {
        PATH: {
            "post": {
                "operationId": "reportLeakedKey",
                "summary": "Report a leaked chatgate key; it is revoked if live (no auth)",
                "tags": ["security"],
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["key"],
                                "properties": {"key": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "202": {
                        "description": "Received (the same answer whether or not the key existed)",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["object", "status", "message"],
                                    "properties": {
                                        "object": {"const": "leak_report"},
                                        "status": {"const": "received"},
                                        "message": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    **{str(s): error for s in (400, 413, 429, 503)},
                },
            }
        }
    }
