"""Prometheus metrics: what a finished request adds, the usage gauges, and no key in labels."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.metrics import Metrics
from chatgate.usage.recorder import UsageRecorder
from tests.helpers import Upstream, served_app
from tests.usage.factory import make_record

SECRET = "sk-cg-AbCdEfGhIjKlMnOpQrStUvWxYz012345Ab3dEf"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Each sample of a Prometheus text exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def samples(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def test_observe_counts_requests_tokens_latency_and_rejects() -> None:
    metrics = Metrics(["gpt-test"])
    metrics.observe(make_record(prompt_tokens=7, completion_tokens=3, latency_ms=40, ttft_ms=9))
    metrics.observe(make_record(model="gpt-unknown", status=429, error_code="rate_limit_exceeded"))
    metrics.observe(make_record(status=401, error_code="invalid_api_key", model="", key_id=None))
    metrics.upstream_error("openai_compat", "gpt-test", "connect")
    got = samples(metrics)
    ok = (("endpoint", "chat.completions"), ("model", "gpt-test"), ("status", "200"))
    assert got[("chatgate_requests_total", ok)] == 1
    assert got[("chatgate_tokens_total", (("kind", "prompt"), ("model", "gpt-test")))] == 7
    assert got[("chatgate_tokens_total", (("kind", "completion"), ("model", "gpt-test")))] == 3
    other = (("endpoint", "chat.completions"), ("model", "other"), ("status", "429"))
    assert got[("chatgate_requests_total", other)] == 1  # unknown names never become labels
    assert got[("chatgate_rejects_total", (("reason", "rate_limit_exceeded"),))] == 1
    assert got[("chatgate_rejects_total", (("reason", "invalid_api_key"),))] == 1
    latency = (("endpoint", "chat.completions"), ("model", "gpt-test"))
    assert got[("chatgate_request_duration_seconds_count", latency)] == 1
    assert got[("chatgate_time_to_first_token_seconds_count", (("model", "gpt-test"),))] == 1
    upstream = (("backend", "openai_compat"), ("kind", "connect"), ("model", "gpt-test"))
    assert got[("chatgate_upstream_errors_total", upstream)] == 1


def test_labels_follow_a_model_reload_and_any_number_of_unknown_models() -> None:
    """A record's labels are worked out once per (endpoint, model, status) and kept: a
    reload of the model list must change them, and past the kept ones (a client may send
    any model name) each record still counts, under ``other``."""
    metrics = Metrics(["gpt-a"])
    metrics.observe(make_record(model="gpt-b", prompt_tokens=1))
    metrics.set_models(["gpt-a", "gpt-b"])
    metrics.observe(make_record(model="gpt-b", prompt_tokens=2))
    for i in range(5_000):
        metrics.observe(make_record(model=f"made-up-{i}", prompt_tokens=0, latency_ms=20))
    got = samples(metrics)
    labels = (("endpoint", "chat.completions"), ("model", "{}"), ("status", "200"))
    for model, count in (("gpt-b", 1), ("other", 5_001)):
        key = tuple((k, v.format(model)) for k, v in labels)
        assert got[("chatgate_requests_total", key)] == count, model
    assert got[("chatgate_tokens_total", (("kind", "prompt"), ("model", "other")))] == 1
    assert got[("chatgate_tokens_total", (("kind", "prompt"), ("model", "gpt-b")))] == 2
    latency = (("endpoint", "chat.completions"), ("model", "other"))
    assert got[("chatgate_request_duration_seconds_count", latency)] == 5_001
    assert got[("chatgate_request_duration_seconds_sum", latency)] == pytest.approx(100.0 + 0.0125)


def test_labels_never_hold_a_key_or_key_id() -> None:
    metrics = Metrics(["gpt-test"])
    rec = make_record(key_id="key_0123456789abcdef01234567", model=SECRET, error_code=SECRET)
    metrics.observe(rec)
    metrics.observe(make_record(status=403, error_code="key_0123456789abcdef01234567"))
    metrics.reject(SECRET)
    metrics.upstream_error(SECRET, SECRET, "key_0123456789abcdef01234567")
    body, _ = metrics.render()
    text = body.decode()
    assert "sk-cg" not in text and "key_" not in text and "0123456789abcdef" not in text


def test_each_application_has_its_own_registry() -> None:
    first, second = Metrics(["m"]), Metrics(["m"])
    first.observe(make_record(model="m"))
    assert not any(name == "chatgate_requests_total" for name, _ in samples(second))


async def test_usage_gauges_read_the_recorder(engine: AsyncEngine, tmp_path: Path) -> None:
    metrics = Metrics([])
    recorder = UsageRecorder(engine, tmp_path / "spool", max_queue=3)
    metrics.bind_usage(recorder)
    for _ in range(5):
        recorder.record(make_record())
    got = samples(metrics)
    assert got[("chatgate_usage_queue_depth", ())] == 3
    assert got[("chatgate_usage_spool_records", ())] == 0
    assert got[("chatgate_usage_dropped_records_total", ())] == 2
    await recorder.close()
    got = samples(metrics)
    assert got[("chatgate_usage_queue_depth", ())] == 0
    assert got[("chatgate_usage_written_records_total", ())] == 3


def test_openmetrics_when_asked() -> None:
    body, content_type = Metrics([]).render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_histograms_match_prometheus_clients_own() -> None:
    """The hand-kept histogram and counters export exactly what prometheus_client's would."""
    from prometheus_client import CollectorRegistry, Histogram

    from chatgate.metrics import LATENCY_BUCKETS

    metrics = Metrics(["gpt-test"])
    reference = CollectorRegistry()
    oracle = Histogram(
        "chatgate_request_duration_seconds",
        "reference",
        ["endpoint", "model"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    # Values on bucket bounds, between them, below the first and beyond the last.
    for latency_ms in (1, 5, 5.0001, 40, 100, 2500, 9999, 600_000, 900_000):
        metrics.observe(make_record(latency_ms=latency_ms))
        oracle.labels("chat.completions", "gpt-test").observe(latency_ms / 1000)
    ours = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        for s in family.samples
        if s.name.startswith("chatgate_request_duration_seconds")
    }
    theirs = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in reference.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }
    assert ours == pytest.approx(theirs)
    assert ours[next(k for k in ours if k[0].endswith("_count"))] == 9


async def test_requests_are_counted_with_usage_recording_off(
    upstream: Upstream, tmp_path: Path
) -> None:
    """``CHATGATE_USAGE_ENABLED=0`` stops the usage records, not the Prometheus counters: an
    answer and a refusal each count, and there is no recorder to report on."""
    off = {"CHATGATE_USAGE_ENABLED": "0"}
    async with (
        served_app(tmp_path, upstream, env=off) as (server, key),
        aiohttp.ClientSession() as session,
    ):
        url = server.make_url("/v1/chat/completions")
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        for bearer, status in ((key, 200), ("sk-cg-" + "x" * 40, 401)):
            headers = {"Authorization": f"Bearer {bearer}"}
            async with session.post(url, json=body, headers=headers) as resp:
                assert resp.status == status, await resp.text()
        async with session.get(server.make_url("/metrics")) as resp:
            got = parse(await resp.text())
    ok = (("endpoint", "chat.completions"), ("model", "gpt-test"), ("status", "200"))
    assert got[("chatgate_requests_total", ok)] == 1
    assert got[("chatgate_rejects_total", (("reason", "invalid_api_key"),))] == 1
    refused = (("endpoint", "chat.completions"), ("model", "none"), ("status", "401"))
    assert got[("chatgate_requests_total", refused)] == 1
    assert got[("chatgate_request_duration_seconds_count", ok[:2])] == 1
    assert not any(name.startswith("chatgate_usage_") for name, _ in got)


async def test_workers_sharing_a_directory_are_scraped_as_one(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """``serve --workers N``: a scrape reaches one worker, whose figures alone were each
    worker's share, read by Prometheus as resets. Workers sharing a directory add up: counters
    and histograms summed (a dead worker's too), a dead worker's gauges left out."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    first, second, gone = Metrics(["m"]), Metrics(["m"]), Metrics(["m"])
    recorder = UsageRecorder(engine, tmp_path / "spool", max_queue=100)
    gone.bind_usage(recorder)
    for worker in (first, second, gone):
        worker.share(shared)
    first.observe(make_record(model="m", prompt_tokens=5, latency_ms=30))
    second.observe(make_record(model="m", prompt_tokens=7, latency_ms=3000))
    gone.observe(
        make_record(model="m", prompt_tokens=11, status=429, error_code="rate_limit_exceeded")
    )
    first.reject("invalid_api_key")
    second.reject("invalid_api_key")
    recorder.record(make_record())
    for worker in (first, second, gone):
        worker.write_share()
    ok = (("endpoint", "chat.completions"), ("model", "m"), ("status", "200"))
    latency = (("endpoint", "chat.completions"), ("model", "m"))
    prompt = ("chatgate_tokens_total", (("kind", "prompt"), ("model", "m")))
    got = samples(first)
    assert got[("chatgate_requests_total", ok)] == 2
    assert got[prompt] == 5 + 7 + 11
    assert got[("chatgate_request_duration_seconds_count", latency)] == 3
    bucket = ("chatgate_request_duration_seconds_bucket", tuple(sorted((*latency, ("le", "2.5")))))
    assert got[bucket] == 2  # cumulative buckets add up too
    assert got[("chatgate_rejects_total", (("reason", "invalid_api_key"),))] == 2
    assert got[("chatgate_usage_queue_depth", ())] == 1  # only "gone" has a recorder
    # The live figures of the worker scraped, not its last file: one more request shows.
    first.observe(make_record(model="m", prompt_tokens=0))
    assert samples(first)[("chatgate_requests_total", ok)] == 3
    # A worker that died: its counts stay (a sum never goes back), its gauges do not.
    [gone_file] = [p for p in shared.glob("*.json") if p.name.endswith(gone._shared.path.name)]  # type: ignore[union-attr]
    gone_file.rename(shared / ("999999999-" + gone_file.name.split("-", 1)[1]))
    got = samples(second)
    assert got[prompt] == 5 + 7 + 11
    assert ("chatgate_usage_queue_depth", ()) not in got
    await recorder.close()
