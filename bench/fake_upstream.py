"""A small, fast OpenAI-compatible upstream for tests and benchmarks (loopback only).

    python bench/fake_upstream.py --port 9100 [--chunks 20] [--no-record]

Behaviour is chosen by the request's ``model``:
- anything else: echo the last user message, ``chunks`` SSE chunks when streaming;
- ``no-usage``: never reports usage (the gateway must count), embeddings included;
- ``bad-usage``: reports nonsense usage, 2**40 prompt tokens and -3 completion tokens (the
  gateway must count instead); embeddings: 2**40 prompt tokens;
- ``fail-500`` / ``fail-429`` / ``fail-401``: answer with that status;
- ``slow``: wait ``delay`` seconds (JSON ``{"delay": s}`` in the body extension ``fake``);
- ``break-stream``: send two chunks, then cut the connection;
- ``not-an-answer``: a 200 whose JSON is not an answer (``choices`` or ``data`` a string);
- ``drop``: close the connection without a word (a crash while working on the request);
- ``hang``: never answer (the connection stays open, no status line);
- ``stall-stream``: when streaming, send ``fake.after`` events (default 2; 0 = headers only),
  then go silent for ``fake.delay`` seconds (default an hour) without closing; when not
  streaming, the same as ``hang``;
- ``fake.cached`` = N (any model): the usage reports N of the prompt's tokens as cached
  (``prompt_tokens_details.cached_tokens``, as OpenAI's prompt caching does);
- ``fake.no_done`` (any model): end a stream without ``data: [DONE]`` (some servers do);
- ``fake.after_done`` (any model): send one more event after ``data: [DONE]``;
- ``fake.fail_times`` = N with ``fake.key`` = K (any model): the first N requests carrying key K
  answer ``fake.status`` (default 500), later ones are served normally (with ``fake.model``,
  only requests for that model count);
- a port with nothing listening is the "refuses connections" case (no behaviour needed here);
- ``tools``: with ``tools`` in the request and no tool result yet, answer with a call of the
  first tool (or the one ``tool_choice`` names), its arguments filled from the JSON schema,
  ``finish_reason: tool_calls``; streamed as tool-call deltas (arguments in pieces).
  Once the last message is a ``tool`` result, answer as usual (echo it).
Every request body received is kept in memory and served at ``GET /_requests`` (newest last),
and ``DELETE /_requests`` clears it, so tests can check what the gateway forwarded. With
``--no-record`` (the benchmarks) nothing is kept: millions of kept bodies made the process's
garbage collections ever longer, and with them the latency tail of every benchmark row, worse
the later the row ran (wrk at one connection, straight to this server: p99 7.7, 28.7, 34.5,
49.7, 80.0, 107.7 ms in six 3 s runs in a row; flat with ``--no-record``).
``GET /_received_at`` gives the arrival time (unix seconds) of each of those, in the same order,
and ``GET /_cookies`` the ``Cookie`` header each carried (``null`` when none). A chat body with
``fake.set_cookie`` is answered with that ``Set-Cookie`` header. ``GET /_in_flight`` gives the
most chat requests it was ever answering at once (``{"max": n}``; cleared with the rest).
``GET /_connections`` gives how many connections (client ports) chat requests have come over
(``{"seen": n}``; never cleared), so a test can tell a kept connection from a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

RECEIVED = web.AppKey("received", list)
RECEIVED_AT = web.AppKey("received_at", list)
COOKIES = web.AppKey("cookies", list)
PEERS = web.AppKey("peers", set)  # the client ports chat requests came from: its connections
IN_FLIGHT = web.AppKey("in_flight", list)  # [now, most ever]
FAILURES = web.AppKey("failures", dict)
HOUR = 3600.0


async def _linger(request: web.Request, seconds: float) -> None:
    """Sleep up to ``seconds``, but stop once the client has gone (so a stop is quick)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _usage(prompt: int, completion: int, model: str = "", cached: Any = None) -> dict[str, Any]:
    if model == "bad-usage":
        prompt, completion = 2**40, -3
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:  # fake.cached: as OpenAI reports a prompt's cached part
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
    return usage


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
    counts = request.app[IN_FLIGHT]
    counts[0] += 1
    counts[1] = max(counts[1], counts[0])
    try:
        return await _chat(request)
    finally:
        counts[0] -= 1


async def _chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    if request.app["record"]:
        request.app[RECEIVED].append(body)
        request.app[RECEIVED_AT].append(time.time())
        request.app[COOKIES].append(request.headers.get("Cookie"))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        request.app[PEERS].add(peer[1] if peer else None)
    model = body.get("model", "")
    chunks: int = request.app["chunks"]
    fake = body.get("fake") if isinstance(body.get("fake"), dict) else {}
    if "fail_times" in fake and fake.get("model", model) == model:
        seen = request.app[FAILURES]
        key = str(fake.get("key", ""))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= int(fake["fail_times"]):
            status = int(fake.get("status", 500))
            return web.json_response(
                {"error": {"message": f"fake failure {status}", "type": "server_error"}},
                status=status,
                headers={"retry-after": "1"} if status == 429 else {},
            )
    if model == "hang" or (model == "stall-stream" and not body.get("stream")):
        await _linger(request, float(fake.get("delay", HOUR)))
    if model.startswith("fail-"):
        status = int(model.split("-", 1)[1])
        headers = {"retry-after": "2"} if status == 429 else {}
        return web.json_response(
            {"error": {"message": f"fake failure {status}", "type": "server_error"}},
            status=status,
            headers=headers,
        )
    if model == "drop" and request.transport is not None:
        request.transport.close()
        return web.Response()  # (never sent: the connection is gone)
    if model == "not-an-answer" and not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "choices": "x"})
    if model == "slow":
        await asyncio.sleep(float((body.get("fake") or {}).get("delay", 5)))
    if model == "tools" and body.get("tools") and _last_role(body) != "tool":
        return await _tool_call(request, body)
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
            out["usage"] = _usage(prompt, len(pieces), model, fake.get("cached"))
        cookie = fake.get("set_cookie")
        headers = {"Set-Cookie": cookie} if isinstance(cookie, str) else None
        return web.Response(
            body=orjson.dumps(out), content_type="application/json", headers=headers
        )

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if model == "stall-stream" and int(fake.get("after", 2)) == 0:
        await _linger(request, float(fake.get("delay", HOUR)))
        if request.transport is None or request.transport.is_closing():
            return resp
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
        if model == "stall-stream" and i + 1 == int(fake.get("after", 2)):
            await _linger(request, float(fake.get("delay", HOUR)))
            if request.transport is None or request.transport.is_closing():
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
            "usage": _usage(prompt, n, model, fake.get("cached")),
        }
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    if not fake.get("no_done"):
        await resp.write(b"data: [DONE]\n\n")
    if fake.get("after_done"):
        await resp.write(b'data: {"stray": "after [DONE]"}\n\n')
    await resp.write_eof()
    return resp


def _last_role(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{}]
    return str(messages[-1].get("role", "")) if isinstance(messages[-1], dict) else ""


def _fake_value(schema: dict[str, Any], name: str) -> Any:
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return f"fake {name}"


async def _tool_call(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Call the first tool (or the one ``tool_choice`` names), arguments from its schema."""
    functions = [t.get("function") or {} for t in body["tools"] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    wanted = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    function = next((f for f in functions if f.get("name") == wanted), functions[0])
    params = function.get("parameters") or {}
    props = params.get("properties") or {}
    args = {n: _fake_value(props.get(n) or {}, n) for n in params.get("required") or list(props)}
    arguments = orjson.dumps(args).decode()
    name = str(function.get("name", "tool"))
    call_id = "call_fake_" + str(len(request.app[RECEIVED]))
    created = int(time.time())
    model = body.get("model", "")
    prompt = _prompt_tokens(body)
    completion = max(len(arguments) // 4, 1)
    if not body.get("stream"):
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        out = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": _usage(prompt, completion),
        }
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def send(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = usage
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": d, "finish_reason": finish}]

    first = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    await send(delta({"role": "assistant", "content": None, "tool_calls": [first]}))
    step = max(len(arguments) // 3, 1)
    for i in range(0, len(arguments), step):
        piece = {"index": 0, "function": {"arguments": arguments[i : i + step]}}
        await send(delta({"tool_calls": [piece]}))
    await send(delta({}, "tool_calls"))
    if include_usage:
        await send([], _usage(prompt, completion))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    if request.app["record"]:
        request.app[RECEIVED].append(body)
        request.app[RECEIVED_AT].append(time.time())
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
        for i in range(len(inputs))
    ]
    out: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
    if body["model"] == "not-an-answer":
        out["data"] = "x"
    if body["model"] != "no-usage":
        prompt = 2**40 if body["model"] == "bad-usage" else len(inputs)
        out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return web.json_response(out)


async def moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("/v1/" + request.match_info["tail"])


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


async def received(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        request.app[RECEIVED].clear()
        request.app[RECEIVED_AT].clear()
        request.app[COOKIES].clear()
        request.app[IN_FLIGHT][1] = request.app[IN_FLIGHT][0]
        return web.json_response({"ok": True})
    return web.Response(body=orjson.dumps(request.app[RECEIVED]), content_type="application/json")


async def received_at(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[RECEIVED_AT]), content_type="application/json"
    )


async def cookies(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[COOKIES]), content_type="application/json")


async def connections(request: web.Request) -> web.Response:
    """How many connections chat requests have come over so far."""
    return web.json_response({"seen": len(request.app[PEERS])})


async def in_flight(request: web.Request) -> web.Response:
    return web.json_response({"max": request.app[IN_FLIGHT][1]})


def make_app(chunks: int = 20, record: bool = True) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = []
    app[RECEIVED_AT] = []
    app[COOKIES] = []
    app[PEERS] = set()
    app[IN_FLIGHT] = [0, 0]
    app[FAILURES] = {}
    app["chunks"] = chunks
    app["record"] = record
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    # A deployment behind a redirect (base_url .../moved/v1): every call is answered with one.
    app.router.add_route("*", "/moved/v1/{tail:.*}", moved)
    app.router.add_route("*", "/_requests", received)
    app.router.add_get("/_received_at", received_at)
    app.router.add_get("/_cookies", cookies)
    app.router.add_get("/_in_flight", in_flight)
    app.router.add_get("/_connections", connections)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--no-record", action="store_true", help="keep no request (benchmarks)")
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(args.chunks, record=not args.no_record),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
        # aiohttp's default of 128 pending connections overflows when a gateway opens a burst
        # of upstream connections at once (an open-loop run's first second): each dropped
        # handshake costs its request a 1 s retransmission, which showed as a 1 s stall.
        backlog=1024,
    )


if __name__ == "__main__":
    main()
