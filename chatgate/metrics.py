"""Prometheus metrics, on a registry of their own (one :class:`Metrics` per application).

=========================================  =========  ====================================
metric                                     type       labels
=========================================  =========  ====================================
chatgate_requests_total                    counter    endpoint, model, status
chatgate_tokens_total                      counter    model, kind (prompt | completion)
chatgate_cost_usd_total                    counter    model
chatgate_request_duration_seconds          histogram  endpoint, model
chatgate_time_to_first_token_seconds       histogram  model
chatgate_rejects_total                     counter    reason (an error code, e.g. invalid_api_key)
chatgate_upstream_errors_total             counter    backend, model, kind (one per failed attempt)
chatgate_ratelimit_fallbacks_total         counter    mode (fail_open | fail_closed)
chatgate_usage_queue_depth                 gauge
chatgate_usage_spool_records               gauge
chatgate_usage_dropped_records_total       counter
chatgate_usage_written_records_total       counter
=========================================  =========  ====================================

With ``serve --workers N`` the workers share the port, and a scrape reaches one of them: each
worker writes its figures to a file of its own in a directory the supervisor made (once a
second, and at its stop), and the worker that answers a scrape adds the others' files to its
own live figures. Counters and histograms are summed, a worker that has died included (its
counts stay counted: the sums never go back, which Prometheus would read as a reset); the
gauges of a dead worker are left out. The other workers' figures are up to a second old, but
never older than what an earlier scrape reported: the worker scraped writes its own file first.

Labels never hold a key, a key id, an account or any other caller-chosen text: model names
outside the configured set read ``other`` and free-form label values are checked against a
small pattern, so a client cannot blow up the series count (nor leak a key into a label).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import orjson
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from chatgate.usage.record import CLIENT_CLOSED, UsageRecord

log = logging.getLogger(__name__)
SHARE_INTERVAL = 1.0
"""Seconds between two writes of a worker's figures for the others (``serve --workers N``)."""

# Seconds; proxied completions range from a few ms (errors, cache) to minutes (long streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ENDPOINTS = frozenset({"chat.completions", "embeddings", "responses", "conversations", "models"})
OTHER = "other"
_STATUS_TEXT = {status: str(status) for status in range(100, 600)}
NONE = "none"
# A label value we did not choose ourselves must look like an identifier we emit (an error
# code, a backend kind); a key (``sk-cg-...``) has a '-' and is longer, so it never passes.
_SAFE_LABEL = re.compile(r"^[a-z0-9_.]{1,40}$")
# ... and must not look like one of our ids (a key id, an account, a request) either.
_ID_LIKE = re.compile(r"^(key|acct|req|resp|conv)_|[0-9a-f]{12}")


class UsageStats(Protocol):
    """What the metrics read from the usage recorder (:class:`~chatgate.usage.UsageRecorder`)."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def spool_size(self) -> int: ...

    dropped: int
    written: int
    rejected: int


def _safe(value: str | None) -> str:
    if not value:
        return NONE
    return value if _SAFE_LABEL.match(value) and not _ID_LIKE.search(value) else OTHER


class Metrics:
    """Every counter chatgate exports; ``models`` bounds the ``model`` label values.

    The five metrics every request touches (requests, tokens, cost, latency, time to first
    token) are plain numbers in dicts, turned into Prometheus families only when scraped
    (:class:`_RequestCollector`): ``prometheus_client``'s ``labels()`` and ``inc()`` validate
    and take a lock on every call, several microseconds a request. The loop thread is the only
    writer and the scrape runs on it too, so no lock is needed. The rare counters (rejects,
    upstream errors, Redis fallbacks) stay ``prometheus_client`` counters.
    """

    def __init__(self, models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(models)
        self._hot = _RequestCollector()
        # A record's (endpoint, model, status) -> its label values and latency series, worked
        # out once: a client may send any model, so only the first _LABELS_KEPT are kept.
        self._labels: dict[tuple[str, str, int], _Labels] = {}
        self._shared: _Shared | None = None
        r = self.registry
        r.register(self._hot)
        self.rejects = Counter(
            "chatgate_rejects",
            "Requests refused by the gateway (4xx), by reason (the error code).",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "chatgate_upstream_errors",
            "Failed upstream attempts (retried or not), by backend, model and kind.",
            ["backend", "model", "kind"],
            registry=r,
        )
        self.ratelimit_fallbacks = Counter(
            "chatgate_ratelimit_fallbacks",
            "Requests decided without Redis (unreachable), by mode.",
            ["mode"],
            registry=r,
        )

    def set_models(self, models: Iterable[str]) -> None:
        """Replace the known model names (after a configuration reload)."""
        self._models = frozenset(models)
        self._labels.clear()

    def model_label(self, model: str) -> str:
        if not model:
            return NONE
        return model if model in self._models else OTHER

    def observe(self, rec: UsageRecord) -> None:
        """Count one finished request from its usage record (call next to ``record()``)."""
        status = rec.status
        labels = self._labels.get((rec.endpoint, rec.model, status))
        if labels is None:
            labels = self._labels_of(rec.endpoint, rec.model, status)
        hot = self._hot
        requests = labels.requests
        hot.requests[requests] = hot.requests.get(requests, 0) + 1
        if rec.prompt_tokens:
            tokens = labels.prompt
            hot.tokens[tokens] = hot.tokens.get(tokens, 0) + rec.prompt_tokens
        if rec.completion_tokens:
            tokens = labels.completion
            hot.tokens[tokens] = hot.tokens.get(tokens, 0) + rec.completion_tokens
        if rec.cost:
            hot.cost[labels.model] = hot.cost.get(labels.model, 0.0) + rec.cost
        seconds = rec.latency_ms / 1000.0
        latency = labels.latency
        latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # "le": the first bound >= it
        latency.total += seconds
        if rec.ttft_ms is not None:
            _observe(hot.ttft, TTFT_BUCKETS, (labels.model,), rec.ttft_ms / 1000.0)
        if 400 <= status < 500 and status != CLIENT_CLOSED:  # refusals: not a client gone
            self.rejects.labels(_safe(rec.error_code or f"http_{int(status)}")).inc()

    def _labels_of(self, endpoint: str, model: str, status: int) -> _Labels:
        """The label values of a record's series, and its latency histogram."""
        model_label = self.model_label(model)
        endpoint_label = endpoint if endpoint in ENDPOINTS else OTHER
        latency = self._hot.latency.get((endpoint_label, model_label))
        if latency is None:
            latency = self._hot.latency[endpoint_label, model_label] = _Histogram(
                len(LATENCY_BUCKETS)
            )
        labels = _Labels(
            (endpoint_label, model_label, _STATUS_TEXT.get(status) or str(int(status))),
            (model_label, "prompt"),
            (model_label, "completion"),
            model_label,
            latency,
        )
        if len(self._labels) < _LABELS_KEPT:
            self._labels[endpoint, model, status] = labels
        return labels

    def reject(self, reason: str) -> None:
        """Count a refusal that produces no usage record (if there is one, use :meth:`observe`)."""
        self.rejects.labels(_safe(reason)).inc()

    def upstream_error(self, backend: str, model: str, kind: str) -> None:
        """Count one failed upstream attempt; ``kind`` e.g. connect, timeout, status_5xx."""
        self.upstream_errors.labels(_safe(backend), self.model_label(model), _safe(kind)).inc()

    def ratelimit_fallback(self, mode: str) -> None:
        """Count a request decided while Redis was unreachable (``fail_open``/``fail_closed``)."""
        self.ratelimit_fallbacks.labels(_safe(mode)).inc()

    def bind_usage(self, recorder: UsageStats) -> None:
        """Export the recorder's queue depth, spool size and counts, read at scrape time."""
        self.registry.register(_UsageCollector(recorder))

    def share(self, directory: Path) -> None:
        """Add up this process's figures with those of the other processes sharing
        ``directory`` (the workers of one ``serve --workers N``); run :meth:`run_sharing`."""
        self._shared = _Shared(directory)

    async def run_sharing(self) -> None:
        """Write this process's figures for the others, every :data:`SHARE_INTERVAL` s."""
        while True:
            self.write_share()
            await asyncio.sleep(SHARE_INTERVAL)

    def write_share(self) -> None:
        """Write this process's figures now (at its stop too: the last requests count)."""
        if self._shared is not None:
            try:
                self._shared.write(self.registry)
            except OSError as exc:  # a full or gone disk: the scrape shows older figures
                log.warning("metrics: could not write this worker's figures: %s", exc)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (Prometheus text 0.0.4 unless ``accept``
        asks for OpenMetrics or a newer text format)."""
        registry: Any = self.registry
        if self._shared is not None:
            # Written first: what a scrape reports of this worker is in its file from then on,
            # so the next scrape, whichever worker answers it, cannot report less.
            self.write_share()
            registry = _Sum(self._shared.merged(self.registry))
        if accept:
            encode, content_type = choose_encoder(accept)
            return encode(registry), content_type
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


_LABELS_KEPT = 4096


class _Labels(NamedTuple):
    """What :meth:`Metrics.observe` counts a record under."""

    requests: tuple[str, str, str]  # endpoint, model, status
    prompt: tuple[str, str]  # model, "prompt"
    completion: tuple[str, str]
    model: str
    latency: _Histogram  # of (endpoint, model)


class _Histogram:
    """One label set's histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.total = 0.0


def _observe(
    series: dict[tuple[str, ...], _Histogram],
    bounds: tuple[float, ...],
    labels: tuple[str, ...],
    value: float,
) -> None:
    hist = series.get(labels)
    if hist is None:
        hist = series[labels] = _Histogram(len(bounds))
    hist.counts[bisect_left(bounds, value)] += 1  # "le": the first bound >= value
    hist.total += value


class _RequestCollector(Collector):
    """The per-request metrics, kept as plain numbers and exported at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.cost: dict[str, float] = {}
        self.latency: dict[tuple[str, ...], _Histogram] = {}
        self.ttft: dict[tuple[str, ...], _Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "chatgate_requests",
            "Requests answered, by endpoint, model and HTTP status.",
            labels=["endpoint", "model", "status"],
        )
        for labels, count in self.requests.items():
            requests.add_metric(labels, count)
        yield requests
        tokens = CounterMetricFamily(
            "chatgate_tokens",
            "Tokens metered, by model and kind (prompt or completion).",
            labels=["model", "kind"],
        )
        for pair, count in self.tokens.items():
            tokens.add_metric(pair, count)
        yield tokens
        cost = CounterMetricFamily(
            "chatgate_cost_usd", "Cost metered in US dollars, by model.", labels=["model"]
        )
        for model, amount in self.cost.items():
            cost.add_metric([model], amount)
        yield cost
        yield _histogram_family(
            "chatgate_request_duration_seconds",
            "Time from request arrival to the last byte sent, by endpoint and model.",
            ["endpoint", "model"],
            LATENCY_BUCKETS,
            self.latency,
        )
        yield _histogram_family(
            "chatgate_time_to_first_token_seconds",
            "Time to the first streamed token, by model.",
            ["model"],
            TTFT_BUCKETS,
            self.ttft,
        )


def _histogram_family(
    name: str,
    documentation: str,
    labels: list[str],
    bounds: tuple[float, ...],
    series: dict[tuple[str, ...], _Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    edges = [repr(float(b)) for b in bounds] + ["+Inf"]  # as prometheus_client writes "le"
    for label_values, hist in series.items():
        cumulative: list[tuple[str, float]] = []
        running = 0
        for edge, count in zip(edges, hist.counts, strict=True):
            running += count
            cumulative.append((edge, running))
        family.add_metric(list(label_values), cumulative, hist.total)
    return family


class _UsageCollector(Collector):
    def __init__(self, recorder: UsageStats) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[Metric]:
        rec = self._recorder
        yield GaugeMetricFamily(
            "chatgate_usage_queue_depth",
            "Usage records waiting in memory.",
            value=rec.queue_depth,
        )
        yield GaugeMetricFamily(
            "chatgate_usage_spool_records",
            "Usage records waiting in the local spool for the database.",
            value=rec.spool_size,
        )
        yield CounterMetricFamily(
            "chatgate_usage_dropped_records",
            "Usage records dropped because the queue was full.",
            value=rec.dropped,
        )
        yield CounterMetricFamily(
            "chatgate_usage_written_records",
            "Usage records written to the database.",
            value=rec.written,
        )
        yield CounterMetricFamily(
            "chatgate_usage_rejected_records",
            "Usage records the database refused for a value in them (logged, not stored).",
            value=rec.rejected,
        )


class _Shared:
    """A directory of figures, a file per process: ``<pid>-<random>.json`` (a pid is reused)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.json"

    def write(self, registry: CollectorRegistry) -> None:
        part = self.path.with_suffix(".part")
        part.write_bytes(orjson.dumps(_families(registry)))
        os.replace(part, self.path)  # a reader sees the old file or the new one, whole

    def merged(self, registry: CollectorRegistry) -> list[Metric]:
        """This process's live figures plus the other files': summed, earliest ``_created``."""
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

        def add(name: str, doc: str, kind: str, unit: str, samples: Any, alive: bool) -> None:
            if not alive and kind not in _KEPT_WHEN_DEAD:
                return
            if name not in families:
                families[name] = Metric(name, doc, kind, unit)
                values[name] = {}
            sums = values[name]
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                if key not in sums:
                    sums[key] = value
                elif sample.endswith("_created"):
                    sums[key] = min(sums[key], value)
                else:
                    sums[key] += value

        for name, doc, kind, unit, samples in _families(registry):
            add(name, doc, kind, unit, samples, True)
        for path in sorted(self.directory.glob("*.json")):
            if path == self.path:
                continue
            try:
                pid = int(path.name.split("-", 1)[0])
                others = orjson.loads(path.read_bytes())
            except (ValueError, OSError):  # not one of ours, or gone meanwhile
                continue
            alive = _alive(pid)
            for name, doc, kind, unit, samples in others:
                add(name, doc, kind, unit, samples, alive)
        for name, family in families.items():
            for (sample, labels), value in values[name].items():
                family.add_sample(sample, dict(labels), value)
        return list(families.values())


def _families(registry: CollectorRegistry) -> list[tuple[str, str, str, str, list[Any]]]:
    """A registry's figures as plain data: (name, help, type, unit, [(sample, labels, value)])."""
    return [
        (m.name, m.documentation, m.type, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
        for m in registry.collect()
    ]


_KEPT_WHEN_DEAD = frozenset({"counter", "histogram", "summary"})  # not a level (a gauge)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


class _Sum:
    """What the exposition encoders read: the families :meth:`_Shared.merged` added up."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


__all__ = ["LATENCY_BUCKETS", "SHARE_INTERVAL", "Metrics", "UsageStats"]
