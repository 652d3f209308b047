"""The bare-Python floor: the least a Python gateway can do, as the yardstick for chatgate.

    granian --interface rsgi --loop uvloop --host 127.0.0.1 --port P bench.floor:app

An RSGI application (granian) that, per request: checks the bearer key (HMAC-SHA256 of the
key looked up in a dict, as chatgate's auth cache does), takes a token from an in-memory token
bucket per key, relays the body to the upstream with one pooled aiohttp client, and extracts
the usage (the JSON answer's ``usage``, or the last SSE chunk carrying one). No validation, no
quota, no usage records, no metrics: DESIGN.md's "Server stack" floor, kept here so every
benchmark run measures chatgate against it on the same machine at the same time.

Environment: ``FLOOR_UPSTREAM`` (``http://127.0.0.1:PORT/v1``), ``FLOOR_KEY`` (the one key).
Runs in the bench's own virtual environment (granian is not a chatgate dependency).
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
import time
from typing import Any

import aiohttp
import orjson
from granian.rsgi import ProtocolClosed as RSGIProtocolClosed

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
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=("User-Agent",)
            )
        return self.session

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        auth = scope.headers.get("authorization") or ""
        digest = hmac.new(SECRET, auth[7:].encode(), hashlib.sha256).digest()
        key = KEYS.get(digest)
        if key is None:
            proto.response_bytes(401, JSON_HEADERS, b'{"error":"invalid_api_key"}')
            return
        bucket = self.buckets.get(key) or self.buckets.setdefault(key, Bucket())
        if not bucket.take():
            proto.response_bytes(429, JSON_HEADERS, b'{"error":"rate_limited"}')
            return
        body = await proto()
        stream = b'"stream":true' in body or b'"stream": true' in body
        async with self._session().post(
            UPSTREAM, data=body, headers={"content-type": "application/json"}
        ) as resp:
            if not stream:
                raw = await resp.read()
                usage = orjson.loads(raw).get("usage") or {}
                self.usage_tokens += usage.get("total_tokens", 0)
                proto.response_bytes(resp.status, JSON_HEADERS, raw)
                return
            out = proto.response_stream(resp.status, SSE_HEADERS)
            last = b""
            try:
                async for chunk in resp.content.iter_any():  # relayed as it comes
                    if b'"usage":{' in chunk:
                        last = chunk
                    await out.send_bytes(chunk)
            except RSGIProtocolClosed:  # the client went away: stop relaying
                return
            for line in last.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    self.usage_tokens += usage.get("total_tokens", 0)


app = Floor()
