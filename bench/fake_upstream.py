"""A small, fast OpenAI-compatible upstream for tests and benchmarks (loopback only).

    python bench/fake_upstream.py --port 9100 [--chunks 20] [--record FILE]

Behaviour is chosen by the request's ``model``:
- anything else: echo the last user message, ``chunks`` SSE chunks when streaming;
- ``no-usage``: never reports usage (the gateway must count);
- ``fail-500`` / ``fail-429`` / ``fail-401``: answer with that status;
- ``slow``: wait ``delay`` seconds (JSON ``{"delay": s}`` in the body extension ``fake``);
- ``break-stream``: send two chunks, then cut the connection.
Every request body received is kept in memory and served at ``GET /_requests`` (newest last),
and ``DELETE /_requests`` clears it, so tests can check what the gateway forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

RECEIVED = web.AppKey("received", list)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            words += len(content.split())
    return words + 3 * len(body.get("messages", [])) + 3


def _reply_text(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{}]
    last = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
    return f"echo: {last}" if isinstance(last, str) else "echo"


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    request.app[RECEIVED].append(body)
    model = body.get("model", "")
    chunks: int = request.app["chunks"]
    if model.startswith("fail-"):
        status = int(model.split("-", 1)[1])
        headers = {"retry-after": "2"} if status == 429 else {}
        return web.json_response(
            {"error": {"message": f"fake failure {status}", "type": "server_error"}},
            status=status,
            headers=headers,
        )
    if model == "slow":
        await asyncio.sleep(float((body.get("fake") or {}).get("delay", 5)))
    prompt = _prompt_tokens(body)
    words = _reply_text(body).split()
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    created = int(time.time())
    rid = "chatcmpl-fake"
    report_usage = model != "no-usage"
    if not body.get("stream"):
        pieces = (words * chunks)[: max(chunks, len(words))] if chunks > len(words) else words
        if max_tokens:
            pieces = pieces[:max_tokens]
        text = " ".join(pieces)
        out = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        if report_usage:
            out["usage"] = _usage(prompt, len(pieces))
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    n = chunks if not max_tokens else min(chunks, max_tokens)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if include_usage and report_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    await resp.write(event({"role": "assistant", "content": ""}))
    for i in range(n):
        if model == "break-stream" and i == 2:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(event({"content": words[i % len(words)] + " "}))
    await resp.write(event({}, "stop"))
    if include_usage and report_usage:
        final = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(prompt, n),
        }
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[RECEIVED].append(body)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        }
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


async def received(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        request.app[RECEIVED].clear()
        return web.json_response({"ok": True})
    return web.Response(body=orjson.dumps(request.app[RECEIVED]), content_type="application/json")


def make_app(chunks: int = 20) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = []
    app["chunks"] = chunks
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/_requests", received)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.chunks), host=args.host, port=args.port, access_log=None,
                print=None, loop=loop)


if __name__ == "__main__":
    main()
