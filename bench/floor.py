"""The bare-Python floor: the least a Python gateway can do, as the yardstick for chatgate.

    granian --interface rsgi --loop uvloop --host 127.0.0.1 --port P bench.floor:app
    python bench/floor.py --port P       # the same on aiohttp.web (chatgate's server stack)

An RSGI application (granian) that, per request: checks the bearer key (HMAC-SHA256 of the
key looked up in a dict, as chatgate's auth cache does), takes a token from an in-memory token
bucket per key, relays the body to the upstream with one pooled aiohttp client, and extracts
the usage (the JSON answer's ``usage``, or the last SSE chunk carrying one). No validation, no
quota, no usage records, no metrics: DESIGN.md's "Server stack" floor, kept here so every
benchmark run measures chatgate against it on the same machine at the same time.

The same logic is also served by ``aiohttp.web`` (``floor-aiohttp`` in the table): what
chatgate's own server stack costs before any of chatgate's code runs, so a run tells apart the
price of the server from the price of the gateway on it.

Environment: ``FLOOR_UPSTREAM`` (``http://127.0.0.1:PORT/v1``), ``FLOOR_KEY`` (the one key).
Runs in the bench's own virtual environment (granian is not a chatgate dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from granian.rsgi import ProtocolClosed

SECRET = b"floor-secret"
UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9100/v1") + "/chat/completions"
KEYS = {hmac.new(SECRET, os.environ.get("FLOOR_KEY", "").encode(), hashlib.sha256).digest(): "k1"}
RATE, BURST = 1e9, 1e9  # a bucket that never runs dry: the check runs, it never refuses
JSON_HEADERS = [("content-type", "application/json")]
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


class Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self) -> None:
        self.tokens = BURST
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.stamp) * RATE)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Floor:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.buckets: dict[str, Bucket] = {}
        self.usage_tokens = 0  # what a real gateway would record

    def __rsgi_init__(self, loop: Any) -> None:
        tune_gc()

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
            )
        return self.session

    def refuse(self, authorization: str) -> tuple[int, bytes] | None:
        """The key check and the token bucket: an error answer, or None to go on."""
        digest = hmac.new(SECRET, authorization[7:].encode(), hashlib.sha256).digest()
        key = KEYS.get(digest)
        if key is None:
            return 401, b'{"error":"invalid_api_key"}'
        bucket = self.buckets.get(key) or self.buckets.setdefault(key, Bucket())
        if not bucket.take():
            return 429, b'{"error":"rate_limited"}'
        return None

    async def relay(
        self,
        body: bytes,
        answer: Callable[[int, bytes], Any],
        start_stream: Callable[[int], Awaitable[Callable[[bytes], Awaitable[Any]]]],
    ) -> None:
        """Post ``body`` upstream; ``answer`` a JSON reply, or relay a stream chunk by chunk
        through the sender ``start_stream`` returns; extract the usage either way."""
        stream = b'"stream":true' in body or b'"stream": true' in body
        async with self._session().post(
            UPSTREAM, data=body, headers={"content-type": "application/json"}
        ) as resp:
            if not stream:
                raw = await resp.read()
                usage = orjson.loads(raw).get("usage") or {}
                self.usage_tokens += usage.get("total_tokens", 0)
                answer(resp.status, raw)
                return
            send = await start_stream(resp.status)
            last = b""
            async for chunk in resp.content.iter_any():  # relayed as it comes
                if b'"usage":{' in chunk:
                    last = chunk
                await send(chunk)
            for line in last.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    self.usage_tokens += usage.get("total_tokens", 0)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        refused = self.refuse(scope.headers.get("authorization") or "")
        if refused is not None:
            proto.response_bytes(refused[0], JSON_HEADERS, refused[1])
            return

        def answer(status: int, raw: bytes) -> None:
            proto.response_bytes(status, JSON_HEADERS, raw)

        async def start_stream(status: int) -> Callable[[bytes], Awaitable[Any]]:
            return proto.response_stream(status, SSE_HEADERS).send_bytes  # type: ignore[no-any-return]

        try:
            await self.relay(await proto(), answer, start_stream)
        except ProtocolClosed:  # the client went away: stop relaying
            return


def tune_gc() -> None:
    """As chatgate does after start-up (DESIGN.md, "Server stack")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


app = Floor()


def aiohttp_app() -> Any:
    """The same floor as an ``aiohttp.web`` application (one route, no middleware)."""
    from aiohttp import web

    floor = Floor()

    async def handle(request: web.Request) -> web.StreamResponse:
        refused = floor.refuse(request.headers.get("authorization") or "")
        if refused is not None:
            return web.Response(status=refused[0], body=refused[1], headers=dict(JSON_HEADERS))
        reply: list[web.StreamResponse] = []

        def answer(status: int, raw: bytes) -> None:
            reply.append(web.Response(status=status, body=raw, headers=dict(JSON_HEADERS)))

        async def start_stream(status: int) -> Callable[[bytes], Awaitable[Any]]:
            out = web.StreamResponse(status=status, headers=dict(SSE_HEADERS))
            reply.append(out)
            await out.prepare(request)
            return out.write

        with contextlib.suppress(ConnectionResetError):  # the client went away: stop relaying
            await floor.relay(await request.read(), answer, start_stream)
            if not isinstance(reply[0], web.Response):
                await reply[0].write_eof()
        return reply[0] if reply else web.Response(status=499)  # gone before any answer

    async def lifespan(_app: web.Application) -> AsyncIterator[None]:
        tune_gc()
        yield
        if floor.session is not None:
            await floor.session.close()

    application = web.Application()
    application.router.add_post("/v1/chat/completions", handle)
    application.cleanup_ctx.append(lifespan)
    return application


def main() -> None:
    import uvloop
    from aiohttp import web

    parser = argparse.ArgumentParser(description="the floor on aiohttp.web")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        aiohttp_app(),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        backlog=1024,
    )


if __name__ == "__main__":
    main()
