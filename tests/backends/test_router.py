"""The router (chatgate/backends/router.py), its configuration, breaker and retry rules.

Routing tests call the router in-process against real fake-upstream processes on loopback
(a free port with nothing listening is the "refuses connections" upstream). The breaker is also
tested alone, with an injected clock.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from chatgate import errors
from chatgate.backends.breaker import BreakerState, CircuitBreaker
from chatgate.backends.deployment import RetryPolicy, plan_models
from chatgate.backends.router import Router
from chatgate.settings import ModelConfig, Settings
from tests.backends.upstreams import stream_server
from tests.helpers import Upstream, free_port, start_upstream, stop

FAST = {
    "connect_timeout": 0.5,
    "first_byte_timeout": 1.0,
    "idle_timeout": 0.5,
    "total_timeout": 5.0,
    "retry_backoff": 0.01,
    "retry_backoff_max": 0.05,
}


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def up() -> Iterator[Upstream]:
    upstream = start_upstream(chunks=5)
    yield upstream
    stop(upstream.proc)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def dep(name: str, base_url: str, upstream_model: str = "fake-model", **opts: Any) -> ModelConfig:
    return ModelConfig(
        name=name,
        base_url=base_url,
        upstream_model=upstream_model,
        options={**FAST, **opts},
    )


def settings_for(*models: ModelConfig) -> Settings:
    return Settings(models=models, local_model=False)


@pytest.fixture
async def make_router() -> AsyncIterator[Any]:
    routers: list[Router] = []

    def make(*models: ModelConfig, **kw: Any) -> Router:
        router = Router(settings_for(*models), **kw)
        routers.append(router)
        return router

    yield make
    for router in routers:
        await router.close()


def chat_body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def fail_times(n: int, status: int = 500, model: str = "fake-model") -> dict[str, Any]:
    """The fake upstream answers ``status`` to the first ``n`` requests for ``model``."""
    return {
        "fake": {"fail_times": n, "key": secrets.token_hex(6), "status": status, "model": model}
    }


async def read_all(stream: Any) -> list[bytes]:
    events = [event async for event in stream]
    await stream.aclose()
    return events


def state_of(router: Router, deployment: str) -> dict[str, Any]:
    return next(s.to_dict() for s in router.status() if s.deployment == deployment)


# -- configuration ---------------------------------------------------------------------------


def test_repeated_names_form_one_model_with_ordered_deployments() -> None:
    plans = plan_models(
        Settings(),
        [
            ModelConfig(name="a", base_url="http://x/v1", context_window=1000),
            ModelConfig(name="b", base_url="http://y/v1"),
            ModelConfig(name="a", base_url="http://z/v1", options={"weight": 2, "priority": 0}),
            ModelConfig(name="a", backend="local"),
        ],
    )
    assert [p.model.name for p in plans] == ["a", "b"]
    a = plans[0]
    assert [d.index for d in a.deployments] == [0, 1, 2]
    assert [d.priority for d in a.deployments] == [0, 0, 2]  # default: the position
    assert [d.weight for d in a.deployments] == [1.0, 2.0, 1.0]
    assert a.model.context_window == 1000
    assert a.model.base_url == ""  # the public face has no URL, and of the options only prices
    assert a.model.options == {"input_price_per_mtok": 0.0, "output_price_per_mtok": 0.0}
    assert a.deployments[1].id == "a#1"


def test_timeouts_default_from_settings_and_are_overridable() -> None:
    settings = Settings(upstream_connect_timeout=3.0, upstream_timeout=100.0)
    [plan] = plan_models(
        settings,
        [
            ModelConfig(name="a", base_url="http://x/v1"),
            ModelConfig(
                name="a", base_url="http://y/v1", options={"idle_timeout": 2, "total_timeout": 9}
            ),
        ],
    )
    first, second = plan.deployments
    assert (first.timeouts.connect, first.timeouts.total) == (3.0, 100.0)
    assert first.timeouts.first_byte <= 100.0 and first.timeouts.idle <= 100.0
    assert (second.timeouts.idle, second.timeouts.total) == (2.0, 9.0)
    assert second.timeouts.first_byte == 9.0  # capped by total


@pytest.mark.parametrize(
    "options",
    [
        {"weight": -1},
        {"priority": "high"},
        {"idle_timeout": 0},
        {"breaker_failures": 0},
        {"input_price_per_mtok": -1},
        {"output_price_per_mtok": "0.6"},
        {"retires": 0},  # a misspelling did nothing at all
        {"temperature": 2.5},
        {"top_p": "0.5"},
    ],
)
def test_invalid_routing_options_are_rejected_with_the_model_named(
    options: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="model 'a'"):
        plan_models(Settings(), [ModelConfig(name="a", base_url="http://x/v1", options=options)])


@pytest.mark.parametrize(
    "url",
    [
        "htps://user:URLPASSWORD@127.0.0.1:9/v1",
        "127.0.0.1:8000/v1",
        "http:///v1",
        "http://host:port/v1",
        "",
    ],
)
def test_a_base_url_no_request_can_go_to_is_refused_at_start(url: str) -> None:
    """Such a URL passed the config checks, then every request was a 500 with the URL (and
    its password) in the log, and the next deployment was never tried."""
    with pytest.raises(ValueError, match="model 'a' \\(deployment #0\\): `base_url`") as info:
        plan_models(Settings(), [ModelConfig(name="a", base_url=url)])
    assert "URLPASSWORD" not in str(info.value)


def test_an_upstream_key_no_header_can_carry_is_refused_at_start(tmp_path: Path) -> None:
    """A line break in an upstream key was refused per request, as a 500 with a traceback."""
    config = tmp_path / "chatgate.toml"
    config.write_text('[[models]]\nname = "a"\nbase_url = "http://x/v1"\napi_key_env = "UP_KEY"\n')
    env = {"CHATGATE_CONFIG": str(config), "CHATGATE_DATA_DIR": str(tmp_path)}
    with pytest.raises(ValueError, match="UP_KEY") as info:
        Settings.from_env({**env, "UP_KEY": "abc\r\nX-Evil: 1"})
    assert "Evil" not in str(info.value)
    assert Settings.from_env({**env, "UP_KEY": "sk-fine"}).upstream_keys


def test_a_local_model_table_holds_no_more_than_the_embedded_model_loads() -> None:
    """A ``backend = "local"`` table's context_window defaulted to 8,192 while the embedded
    model loads ``local_context`` (4,096): trimming kept what cannot fit. It is capped."""
    tables = (
        ModelConfig(name="mine", backend="local"),
        ModelConfig(name="s", backend="local", context_window=512),
    )
    router = Router(Settings(models=tables, local_model=False, local_context=1024))
    assert router.resolve("mine").model.context_window == 1024
    assert router.resolve("s").model.context_window == 512


def test_prices_are_the_models_read_from_its_first_table() -> None:
    [plan] = plan_models(
        Settings(),
        [
            ModelConfig(
                name="a",
                base_url="http://x/v1",
                options={"input_price_per_mtok": 2.5, "output_price_per_mtok": 10, "weight": 2},
            ),
            ModelConfig(name="a", base_url="http://y/v1", options={"input_price_per_mtok": 99}),
        ],
    )
    assert plan.model.options == {"input_price_per_mtok": 2.5, "output_price_per_mtok": 10.0}


def test_openai_compat_needs_a_base_url() -> None:
    with pytest.raises(ValueError, match="base_url"):
        plan_models(Settings(), [ModelConfig(name="a")])


def test_local_model_is_listed_first_unless_switched_off() -> None:
    models = (ModelConfig(name="x", base_url="http://x/v1"),)
    assert [m.name for m in Router(Settings(models=models)).models()] == ["chatgate-mini", "x"]
    assert [m.name for m in Router(Settings(models=models, local_model=False)).models()] == ["x"]


def test_unknown_model_is_404() -> None:
    router = Router(settings_for(dep("x", "http://x/v1")))
    with pytest.raises(errors.ModelNotFound):
        router.resolve("nope")


# -- selection -------------------------------------------------------------------------------


def test_weights_spread_load_within_a_priority_and_priorities_come_first() -> None:
    router = Router(
        settings_for(
            dep("m", "http://a/v1", priority=0, weight=3),
            dep("m", "http://b/v1", priority=0, weight=1),
            dep("m", "http://c/v1", priority=1, weight=100),
            dep("m", "http://d/v1", priority=0, weight=0),
        )
    )
    entry = router.resolve("m")._entry
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = [s.deployment.id for s in entry.order()]
        assert order[2:] == ["m#3", "m#2"]  # weight 0 last in its priority, then priority 1
        firsts[order[0]] += 1
    assert 0.70 < firsts["m#0"] / 4000 < 0.80


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(retries=5, backoff=0.1, backoff_max=0.5)
    assert policy.delay(0, 0.0) == pytest.approx(0.05)
    assert policy.delay(1, 0.999) == pytest.approx(0.2, rel=0.01)
    assert policy.delay(10, 0.999) <= 0.5


# -- the breaker alone -------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow() and not breaker.available()
    assert breaker.snapshot().retry_in == pytest.approx(10)


def test_breaker_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=10, clock=clock)
    breaker.record_failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.snapshot().state is BreakerState.HALF_OPEN
    assert breaker.available()
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow() and not breaker.available()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert breaker.snapshot().consecutive_failures == 0


def test_breaker_failed_probe_reopens_and_abandoned_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown=5, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure()  # one failure in half-open is enough
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow()
    breaker.record_abandoned()  # the probe's client went away: no verdict
    assert breaker.allow()  # the next request probes
    assert breaker.snapshot().total_failures == 3


# -- routing against real upstreams ----------------------------------------------------------


async def test_falls_back_from_a_refusing_deployment(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", dead_url()), dep("m", up.base_url))
    route = router.resolve("m")
    result = await route.chat(chat_body())
    assert result.body["choices"][0]["message"]["content"].startswith("echo")
    assert route.served_by is not None and route.served_by.id == "m#1"
    assert route.backend_name == "openai_compat"
    assert state_of(router, "m#0")["last_error"] == "connect"
    assert state_of(router, "m#0")["consecutive_failures"] == 1


async def test_the_upstream_model_name_is_substituted(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("public", up.base_url, "other-model"))
    up.clear()
    await router.resolve("public").chat(chat_body("public"))
    assert up.received()[-1]["model"] == "other-model"


async def test_a_tables_sampling_defaults_go_where_the_request_sets_none(
    up: Upstream, make_router: Any
) -> None:
    """README says any table may set ``temperature`` and ``top_p``; they were accepted for an
    upstream's table and never sent (only the embedded model read them)."""
    router = make_router(dep("sampled", up.base_url, temperature=0.3, top_p=0.5))
    route = router.resolve("sampled")
    up.clear()
    await route.chat(chat_body("sampled"))
    await route.chat(chat_body("sampled", temperature=1.2, top_p=None))
    stream = await route.chat_stream(chat_body("sampled", top_p=0.9), include_usage=False)
    await read_all(stream.batches())
    sent = [(body.get("temperature"), body.get("top_p")) for body in up.received()]
    assert sent == [(0.3, 0.5), (1.2, 0.5), (0.3, 0.9)]


async def test_5xx_is_retried_with_backoff_on_the_same_deployment(
    up: Upstream, make_router: Any
) -> None:
    router = make_router(dep("m", up.base_url, retries=2))
    up.clear()
    result = await router.resolve("m").chat(chat_body(**fail_times(2)))
    assert result.body["object"] == "chat.completion"
    assert len(up.received()) == 3
    assert state_of(router, "m#0")["state"] == "closed"


async def test_408_is_retried(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url, retries=1))
    result = await router.resolve("m").chat(chat_body(**fail_times(1, status=408)))
    assert result.body["object"] == "chat.completion"


async def test_retries_run_out_as_502_naming_the_model(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url, "fail-500", retries=1))
    up.clear()
    with pytest.raises(errors.UpstreamError) as caught:
        await router.resolve("m").chat(chat_body())
    assert caught.value.status == 502 and caught.value.code == "upstream_error"
    assert "`m`" in caught.value.message and "127.0.0.1" not in caught.value.message
    assert len(up.received()) == 2


async def test_a_bad_request_is_not_retried_nor_a_breaker_failure(
    up: Upstream, make_router: Any
) -> None:
    router = make_router(dep("m", up.base_url, "fail-400"), dep("m", up.base_url))
    up.clear()
    with pytest.raises(errors.InvalidRequest):
        await router.resolve("m").chat(chat_body())
    assert len(up.received()) == 1
    assert state_of(router, "m#0")["consecutive_failures"] == 0


async def test_401_falls_back_but_is_not_retried_in_place(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url, "fail-401", retries=3))
    up.clear()
    with pytest.raises(errors.UpstreamError):
        await router.resolve("m").chat(chat_body())
    assert len(up.received()) == 1
    assert state_of(router, "m#0")["last_error"] == "401"


async def test_429_moves_to_the_next_deployment(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url, "fail-429"), dep("m", up.base_url))
    route = router.resolve("m")
    result = await route.chat(chat_body())
    assert result.body["object"] == "chat.completion"
    assert route.served_by is not None and route.served_by.index == 1
    status = state_of(router, "m#0")
    assert status["last_error"] == "429" and status["consecutive_failures"] == 0


async def test_429_with_nothing_left_is_429_with_the_retry_hint(
    up: Upstream, make_router: Any
) -> None:
    router = make_router(dep("m", up.base_url, "fail-429", retries=2), dep("m", dead_url()))
    up.clear()
    with pytest.raises(errors.RateLimited) as caught:
        await router.resolve("m").chat(chat_body())
    assert caught.value.status == 429
    assert caught.value.headers["retry-after"] == "2"
    assert caught.value.headers["retry-after-ms"] == "2000"
    assert "`m`" in caught.value.message
    assert len(up.received()) == 1  # a 429 is not retried on the same deployment


@pytest.mark.parametrize("hint", [b"retry-after-ms: 1e400", b"retry-after: inf"])
async def test_a_429_with_an_endless_retry_hint_is_still_a_429(
    make_router: Any, hint: bytes
) -> None:
    """The hint is the upstream's text: one too large for a number is no hint, not a 500."""
    body = b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}'
    answer = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n" + hint
    answer += b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    base_url, _ = await stream_server([[answer]])
    router = make_router(dep("m", base_url, retries=0))
    with pytest.raises(errors.RateLimited) as caught:
        await router.resolve("m").chat(chat_body())
    assert caught.value.status == 429


async def test_hang_times_out_as_504_then_falls_back(up: Upstream, make_router: Any) -> None:
    alone = make_router(dep("m", up.base_url, "hang", retries=0, first_byte_timeout=0.3))
    with pytest.raises(errors.UpstreamTimeout) as caught:
        await alone.resolve("m").chat(chat_body())
    assert caught.value.status == 504 and caught.value.code == "upstream_timeout"
    pair = make_router(dep("m", up.base_url, "hang", first_byte_timeout=0.3), dep("m", up.base_url))
    route = pair.resolve("m")
    await route.chat(chat_body())
    assert route.served_by is not None and route.served_by.index == 1
    assert state_of(pair, "m#0")["last_error"] == "timeout"


async def test_breaker_opens_skips_the_deployment_and_closes_after_a_probe(
    up: Upstream, make_router: Any
) -> None:
    clock = Clock()
    router = make_router(
        dep("m", up.base_url, retries=0, breaker_failures=2, breaker_cooldown=30),
        dep("m", up.base_url, "other-model"),
        clock=clock,
    )
    bad = fail_times(2)  # the primary fails twice, then would answer again
    for _ in range(2):
        route = router.resolve("m")
        await route.chat(chat_body(**bad))
        assert route.served_by is not None and route.served_by.index == 1
    assert state_of(router, "m#0")["state"] == "open"
    up.clear()
    route = router.resolve("m")
    await route.chat(chat_body(**bad))  # skipped while open: no attempt on the primary
    assert route.served_by is not None and route.served_by.index == 1
    assert [r["model"] for r in up.received()] == ["other-model"]
    clock.now += 30
    assert state_of(router, "m#0")["state"] == "half_open"
    route = router.resolve("m")
    await route.chat(chat_body(**bad))  # the probe: served by the primary again
    assert route.served_by is not None and route.served_by.index == 0
    assert state_of(router, "m#0")["state"] == "closed"


async def test_all_breakers_open_is_a_fast_502_with_retry_after(
    make_router: Any,
) -> None:
    clock = Clock()
    router = make_router(dep("m", dead_url(), retries=0, breaker_failures=1), clock=clock)
    with pytest.raises(errors.UpstreamError):
        await router.resolve("m").chat(chat_body())
    with pytest.raises(errors.UpstreamError) as caught:
        await router.resolve("m").chat(chat_body())
    assert "available" in caught.value.message
    assert caught.value.headers["retry-after"] == "30"


async def test_stream_falls_back_before_its_first_event(up: Upstream, make_router: Any) -> None:
    router = make_router(
        dep("m", up.base_url, "stall-stream", first_byte_timeout=0.3),
        dep("m", up.base_url),
    )
    route = router.resolve("m")
    stream = await route.chat_stream(chat_body(stream=True, fake={"after": 0}), include_usage=True)
    events = await read_all(stream)
    assert events[-1] == b"data: [DONE]\n\n"
    assert route.served_by is not None and route.served_by.index == 1
    assert stream.usage is not None and stream.usage.completion_tokens == 5
    assert stream.first_byte_at is not None and stream.completion_text.startswith("echo")
    assert all(s.in_flight == 0 for s in router.status())


@pytest.mark.parametrize(
    ("model", "code"), [("stall-stream", "upstream_timeout"), ("break-stream", "upstream_error")]
)
async def test_stream_broken_after_its_start_ends_with_an_error_event(
    up: Upstream, make_router: Any, model: str, code: str
) -> None:
    router = make_router(dep("m", up.base_url, model), dep("m", up.base_url))
    route = router.resolve("m")
    stream = await route.chat_stream(chat_body(stream=True), include_usage=False)
    events = await read_all(stream)
    assert route.served_by is not None and route.served_by.index == 0  # no retry after start
    assert events[0].startswith(b"data: {")
    error = orjson.loads(events[-1][6:])["error"]
    assert error["code"] == code and "`m`" in error["message"]
    assert "127.0.0.1" not in error["message"]
    status = state_of(router, "m#0")
    assert status["consecutive_failures"] == 1 and status["in_flight"] == 0
    assert status["last_error"] == ("timeout" if code == "upstream_timeout" else "upstream_error")


async def test_the_idle_limit_holds_from_the_first_event_under_a_longer_first_byte_one(
    up: Upstream, make_router: Any
) -> None:
    """The watchdog first waits for the first-byte limit; once the first event is in, a
    shorter idle limit must not wait for that (an hour here) to end a stalled stream."""
    model = dep("m", up.base_url, "stall-stream", first_byte_timeout=3600, total_timeout=7200)
    router = make_router(model)
    stream = await router.resolve("m").chat_stream(chat_body(stream=True), include_usage=False)
    async with asyncio.timeout(60):  # a failure, not a hang, if the idle limit waits
        events = await read_all(stream)
    error = orjson.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_timeout" and "0.5s" in error["message"]


async def test_an_upstream_error_event_in_the_first_read_counts_as_a_failure(
    up: Upstream, make_router: Any
) -> None:
    """Some servers send ``data: {"error": ...}`` mid-stream and then ``[DONE]``; when that
    arrives in the same read as the stream's start (one batch), the deployment still fails,
    and as nothing was sent yet, the request moves on to the next deployment."""
    events = [
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":'
        b'[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
        b'data: {"error":{"message":"out of memory","type":"server_error"}}\n\n',
        b"data: [DONE]\n\n",
    ]
    body = b"".join(events)
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(body), body)

    base_url, _ = await stream_server([[answer]])  # the whole stream in one write
    router = make_router(dep("m", base_url, retries=0), dep("m", up.base_url))
    stream = await router.resolve("m").chat_stream(chat_body(stream=True), include_usage=False)
    relayed = await read_all(stream)
    await stream.aclose()
    assert relayed[-1] == b"data: [DONE]\n\n" and b"out of memory" not in b"".join(relayed)
    assert len(relayed) > len(events)  # the fake upstream's answer, in more chunks
    status = state_of(router, "m#0")
    assert status["consecutive_failures"] == 1 and status["in_flight"] == 0
    assert state_of(router, "m#1")["consecutive_failures"] == 0


async def test_closing_a_stream_early_frees_the_deployment(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url, "stall-stream"))
    stream = await router.resolve("m").chat_stream(chat_body(stream=True), include_usage=False)
    async for _ in stream:
        break
    assert state_of(router, "m#0")["in_flight"] == 1
    await stream.aclose()
    status = state_of(router, "m#0")
    assert status["in_flight"] == 0 and status["consecutive_failures"] == 0


async def test_embeddings_fall_back(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", dead_url()), dep("m", up.base_url, "embed-model"))
    answer = await router.resolve("m").embeddings({"model": "m", "input": ["a", "b"]})
    assert answer["model"] == "embed-model" and len(answer["data"]) == 2


async def test_failure_hook_sees_every_failed_attempt(up: Upstream, make_router: Any) -> None:
    # ``retries`` is a model-level key: read from the first table.
    router = make_router(dep("m", dead_url(), retries=1), dep("m", up.base_url, "fail-503"))
    seen: list[tuple[str, str]] = []
    router.on_failure(lambda d, reason: seen.append((d.id, reason)))
    with pytest.raises(errors.UpstreamError):
        await router.resolve("m").chat(chat_body())
    assert seen == [("m#0", "connect"), ("m#1", "503"), ("m#0", "connect")]


async def test_check_probes_every_deployment(up: Upstream, make_router: Any) -> None:
    router = make_router(dep("m", up.base_url), dep("m", dead_url()), dep("n", up.base_url, "fake"))
    results = {r.deployment: r for r in await router.check()}
    assert results["m#0"].ok and results["m#0"].latency_ms is not None
    assert results["m#0"].listed is False and results["n#0"].listed is True
    assert not results["m#1"].ok and results["m#1"].detail == "unreachable"


async def test_a_stream_that_opens_with_an_error_event_falls_back(
    up: Upstream, make_router: Any
) -> None:
    """An upstream that answers a stream with an error as its very first event (vLLM and
    others do, with a 200) has sent the client nothing yet: the next deployment answers, and
    the one that failed counts it."""
    body = b'data: {"error":{"message":"engine dead","type":"server_error"}}\n\ndata: [DONE]\n\n'
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(body), body)
    base_url, _ = await stream_server([[answer]])
    router = make_router(dep("m", base_url), dep("m", up.base_url))
    route = router.resolve("m")
    stream = await route.chat_stream(chat_body(stream=True), include_usage=False)
    events = await read_all(stream)
    assert route.served_by is not None and route.served_by.index == 1
    assert events[-1] == b"data: [DONE]\n\n"
    assert not any(e.startswith(b'data: {"error"') for e in events)
    status = state_of(router, "m#0")
    assert status["consecutive_failures"] == 1 and status["in_flight"] == 0


async def test_a_redirect_is_a_failure_for_a_stream_as_for_a_whole_answer(
    up: Upstream, make_router: Any
) -> None:
    """A redirect (an ``http://`` base URL whose server moved to ``https://``) is not a stream
    to relay: both kinds of request fall back past it, and with nothing left it is a 502."""
    moved = b"<html><body>301 Moved Permanently</body></html>"
    answer = b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://example.invalid/v1\r\n"
    answer += b"Content-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(moved), moved)
    base_url, _ = await stream_server([[answer]] * 4)
    router = make_router(dep("m", base_url), dep("m", up.base_url))
    route = router.resolve("m")
    stream = await route.chat_stream(chat_body(stream=True), include_usage=False)
    events = await read_all(stream)
    assert route.served_by is not None and route.served_by.index == 1
    assert events[0].startswith(b"data: {") and events[-1] == b"data: [DONE]\n\n"
    route = router.resolve("m")
    await route.chat(chat_body())
    assert route.served_by is not None and route.served_by.index == 1
    alone = make_router(dep("m", base_url, retries=0)).resolve("m")
    with pytest.raises(errors.UpstreamError) as caught:
        await alone.chat_stream(chat_body(stream=True), include_usage=False)
    assert caught.value.status == 502 and "301" in caught.value.message


async def test_a_200_whose_body_is_an_error_is_a_failure(up: Upstream, make_router: Any) -> None:
    """Some servers and proxies answer an error with a 200 and ``{"error": ...}``: that is no
    completion (nor embeddings) to hand back as a success; the next deployment answers, and
    with nothing left it is a 502."""
    error = b'{"error":{"message":"model overloaded","type":"server_error","code":null}}'
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(error), error)
    base_url, _ = await stream_server([[answer]] * 3)
    router = make_router(dep("m", base_url, retries=0), dep("m", up.base_url))
    route = router.resolve("m")
    result = await route.chat(chat_body())
    assert route.served_by is not None and route.served_by.index == 1
    assert result.body["choices"][0]["message"]["content"]
    assert state_of(router, "m#0")["consecutive_failures"] == 1
    alone = make_router(dep("m", base_url, retries=0)).resolve("m")
    with pytest.raises(errors.UpstreamError) as caught:
        await alone.chat(chat_body())
    assert caught.value.status == 502 and "`m`" in caught.value.message
    with pytest.raises(errors.UpstreamError):
        await alone.embeddings({"model": "m", "input": "hello"})


async def test_a_request_the_upstream_refuses_without_a_message_is_no_breaker_failure(
    make_router: Any,
) -> None:
    """A 413 from a proxy in front of the upstream (HTML, no OpenAI message) is about that
    request, not the deployment's health: however many clients send one, the breaker stays
    closed and the next request is served."""
    page = b"<html><body>413 Request Entity Too Large</body></html>"
    too_large = b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: text/html\r\n"
    too_large += b"content-length: %d\r\n\r\n%s" % (len(page), page)
    base_url, _ = await stream_server([[too_large]] * 3)
    router = make_router(dep("m", base_url, retries=0, breaker_failures=2))
    for _ in range(3):
        with pytest.raises(errors.UpstreamError) as caught:
            await router.resolve("m").chat(chat_body())
        assert "status 413" in caught.value.message
    status = state_of(router, "m#0")
    assert status["state"] == "closed" and status["consecutive_failures"] == 0
    assert status["last_error"] == "413"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # vLLM before its errors were wrapped in "error"
        (400, {"object": "error", "message": "prompt too long", "type": "BadRequestError"}),
        # text-generation-inference
        (422, {"error": "prompt too long", "error_type": "validation"}),
    ],
)
async def test_an_upstream_verdict_in_another_error_shape_is_the_clients_400(
    make_router: Any, status: int, body: dict[str, Any]
) -> None:
    raw = orjson.dumps(body)
    answer = b"HTTP/1.1 %d Bad Request\r\ncontent-type: application/json\r\n" % status
    answer += b"content-length: %d\r\n\r\n%s" % (len(raw), raw)
    base_url, _ = await stream_server([[answer]])
    router = make_router(dep("m", base_url, retries=0))
    with pytest.raises(errors.InvalidRequest) as caught:
        await router.resolve("m").chat(chat_body())
    assert caught.value.status == 400 and caught.value.message.endswith("prompt too long")


async def test_a_whole_json_answer_to_a_stream_is_a_failure(up: Upstream, make_router: Any) -> None:
    """An upstream that ignores ``stream: true`` (or reports an error as a 200) answers JSON:
    relayed as events, the client would get a stream of no chunks billed as nothing; it is
    a failure of that deployment, before anything is sent."""
    whole = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(whole), whole)
    base_url, _ = await stream_server([[answer]] * 2)
    router = make_router(dep("m", base_url, retries=0), dep("m", up.base_url))
    route = router.resolve("m")
    stream = await route.chat_stream(chat_body(stream=True), include_usage=False)
    events = await read_all(stream)
    assert route.served_by is not None and route.served_by.index == 1
    assert events[0].startswith(b"data: {") and events[-1] == b"data: [DONE]\n\n"
    alone = make_router(dep("m", base_url, retries=0)).resolve("m")
    with pytest.raises(errors.UpstreamError) as caught:
        await alone.chat_stream(chat_body(stream=True), include_usage=False)
    assert caught.value.status == 502 and "`m`" in caught.value.message


async def test_the_connection_cap_is_per_upstream_not_per_model() -> None:
    """``upstream_max_connections`` holds per upstream base URL: two models served by one
    upstream share its slots (the requests wait their turn, and both are answered). An
    upstream of its own: the module's may still serve an earlier test's hung request, which
    the count of requests in flight would include."""
    up = await asyncio.to_thread(start_upstream, 5)
    settings = Settings(
        models=(dep("a", up.base_url, "slow"), dep("b", up.base_url, "slow")),
        local_model=False,
        upstream_max_connections=1,
    )
    router = Router(settings)
    try:
        body = chat_body(fake={"delay": 0.2})  # the wait for the slot: within 0.5 s
        answers = await asyncio.gather(
            router.resolve("a").chat(body), router.resolve("b").chat(body)
        )
        assert len(answers) == 2
        seen = await asyncio.to_thread(
            lambda: requests.get(f"http://127.0.0.1:{up.port}/_in_flight", timeout=10).json()
        )
        assert seen["max"] == 1
    finally:
        await router.close()
        stop(up.proc)
