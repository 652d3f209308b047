"""Deployments: where a public model name is served, read from the ``[[models]]`` tables.

Each ``[[models]]`` table is one deployment; tables that repeat a ``name`` form that model's
ordered list (the format is described in :mod:`chatgate.backends.router`). This module only
turns tables (already read by :mod:`chatgate.settings` into :class:`ModelConfig`, with the keys
it does not know in ``options``) into typed, validated objects; it holds no runtime state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from chatgate.backends.breaker import DEFAULT_COOLDOWN, DEFAULT_FAILURE_THRESHOLD
from chatgate.settings import ModelConfig, Settings, split_url

DEFAULT_FIRST_BYTE_TIMEOUT = 300.0
DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_RETRIES = 2
DEFAULT_RETRY_BACKOFF = 0.25
DEFAULT_RETRY_BACKOFF_MAX = 4.0
BACKEND_KINDS = ("openai_compat", "local")
PRICE_KEYS = ("input_price_per_mtok", "output_price_per_mtok")  # model-level, US dollars
CACHED_PRICE_KEY = "cached_input_price_per_mtok"  # optional: the input price when absent
SAMPLING_RANGES = {"temperature": 2.0, "top_p": 1.0}
"""Sampling defaults a table may set (each from 0 to its value, as the API takes them): a
deployment's chat requests get them where they say nothing (``router.chat_body``)."""
OPTION_KEYS = frozenset(
    {
        *("connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout"),
        *("retries", "retry_backoff", "retry_backoff_max"),
        *("weight", "priority", "breaker_failures", "breaker_cooldown"),
        *PRICE_KEYS,
        CACHED_PRICE_KEY,
        *SAMPLING_RANGES,
    }
)
"""Every key of a ``[[models]]`` table besides ModelConfig's own: another is a misspelling,
which did nothing at all (``retires = 0`` kept the default retries)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-deployment limits, in seconds.

    ``connect``: TCP (and TLS) connect. ``first_byte``: from sending the request to the response
    headers and, for a stream, its first event. ``idle``: between two stream events. ``total``:
    the whole request, stream included.
    """

    connect: float
    first_byte: float
    idle: float
    total: float

    @classmethod
    def defaults(cls, settings: Settings) -> Timeouts:
        """The settings' connect/total timeouts and this module's defaults for the others."""
        total = settings.upstream_timeout
        return cls(
            connect=min(settings.upstream_connect_timeout, total),
            first_byte=min(DEFAULT_FIRST_BYTE_TIMEOUT, total),
            idle=min(DEFAULT_IDLE_TIMEOUT, total),
            total=total,
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often one request is retried, and the exponential backoff between retries."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_RETRY_BACKOFF
    backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX

    def delay(self, retry: int, jitter: float) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); ``jitter`` is in [0, 1)."""
        base = min(self.backoff_max, self.backoff * 2.0**retry)
        return base * (0.5 + 0.5 * jitter)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place that serves a public model: a backend kind and its config, with routing data.

    ``config`` is what the backend gets (its ``name`` is the public name, so error messages
    name the model the client asked for, never a URL).
    """

    config: ModelConfig
    index: int
    weight: float
    priority: int
    timeouts: Timeouts
    breaker_failures: int = DEFAULT_FAILURE_THRESHOLD
    breaker_cooldown: float = DEFAULT_COOLDOWN

    @property
    def id(self) -> str:
        """``<model>#<index>``: stable, and free of URLs (safe in logs and metric labels)."""
        return f"{self.config.name}#{self.index}"

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def upstream_model(self) -> str:
        return self.config.upstream_model


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What probing one deployment found (``chatgate models check``)."""

    ok: bool
    detail: str
    latency_ms: float | None = None
    status: int | None = None
    listed: bool | None = None  # the upstream lists ``upstream_model`` (None: unknown)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """A public model: its public config, ordered deployments, and retry policy."""

    model: ModelConfig
    deployments: tuple[Deployment, ...]
    retry: RetryPolicy


def _number(table: Mapping[str, Any], key: str, default: float, *, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: `{key}` must be a number of seconds, not {value!r}")
    return float(value)


def _positive(table: Mapping[str, Any], key: str, default: float, *, where: str) -> float:
    value = _number(table, key, default, where=where)
    if value <= 0:
        raise ValueError(f"{where}: `{key}` must be greater than 0")
    return value


def _integer(table: Mapping[str, Any], key: str, default: int, *, low: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: `{key}` must be a whole number >= {low}, not {value!r}")
    return value


def _price(table: Mapping[str, Any], key: str, *, where: str) -> float:
    value = table.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise ValueError(f"{where}: `{key}` must be US dollars per million tokens, not {value!r}")
    return float(value)


def _check_url(url: str, where: str) -> None:
    """Refuse a ``base_url`` no request can go to, at start and without repeating it (it may
    hold a password): it was a 500 on every request, with the URL in the log."""
    if not url:
        raise ValueError(f"{where}: `base_url` is required for the openai_compat backend")
    parts = split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{where}: `base_url` must be an http:// or https:// URL with a host "
            "(and a numeric port, if any)"
        )


def deployment_from_config(config: ModelConfig, index: int, defaults: Timeouts) -> Deployment:
    """Validate one ``[[models]]`` table's routing keys (from ``config.options``)."""
    where = f"model {config.name!r} (deployment #{index})"
    if config.backend not in BACKEND_KINDS:
        raise ValueError(f"{where}: unknown backend {config.backend!r}")
    if config.backend == "openai_compat":
        _check_url(config.base_url, where)
    opts = config.options
    unknown = sorted(set(opts) - OPTION_KEYS)
    if unknown:
        raise ValueError(f"{where}: no such key `{unknown[0][:64]}` in a [[models]] table")
    total = _positive(opts, "total_timeout", defaults.total, where=where)
    timeouts = Timeouts(
        connect=_positive(opts, "connect_timeout", min(defaults.connect, total), where=where),
        first_byte=_positive(
            opts, "first_byte_timeout", min(defaults.first_byte, total), where=where
        ),
        idle=_positive(opts, "idle_timeout", min(defaults.idle, total), where=where),
        total=total,
    )
    for key, high in SAMPLING_RANGES.items():
        value = opts.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
            raise ValueError(f"{where}: `{key}` must be a number from 0 to {high:g}, not {value!r}")
    weight = _number(opts, "weight", 1.0, where=where)
    if weight < 0:
        raise ValueError(f"{where}: `weight` cannot be negative")
    return Deployment(
        config=config,
        index=index,
        weight=weight,
        priority=_integer(opts, "priority", index, low=0, where=where),
        timeouts=timeouts,
        breaker_failures=_integer(
            opts, "breaker_failures", DEFAULT_FAILURE_THRESHOLD, low=1, where=where
        ),
        breaker_cooldown=_number(opts, "breaker_cooldown", DEFAULT_COOLDOWN, where=where),
    )


def plan_models(settings: Settings, configs: Sequence[ModelConfig]) -> list[ModelPlan]:
    """Group ``configs`` by public name (first appearance order) into validated plans."""
    defaults = Timeouts.defaults(settings)
    groups: dict[str, list[ModelConfig]] = {}
    for config in configs:
        groups.setdefault(config.name, []).append(config)
    plans = []
    for name, group in groups.items():
        first = group[0]
        where = f"model {name!r}"
        retry = RetryPolicy(
            retries=_integer(first.options, "retries", DEFAULT_RETRIES, low=0, where=where),
            backoff=_number(first.options, "retry_backoff", DEFAULT_RETRY_BACKOFF, where=where),
            backoff_max=_number(
                first.options, "retry_backoff_max", DEFAULT_RETRY_BACKOFF_MAX, where=where
            ),
        )
        deployments = tuple(
            deployment_from_config(config, i, defaults) for i, config in enumerate(group)
        )
        # What the API layer sees: name, context window and prices; no URL, key name or
        # routing options.
        prices = {key: _price(first.options, key, where=where) for key in PRICE_KEYS}
        if CACHED_PRICE_KEY in first.options:
            prices[CACHED_PRICE_KEY] = _price(first.options, CACHED_PRICE_KEY, where=where)
        public = replace(first, base_url="", api_key_env=None, options=prices)
        plans.append(ModelPlan(public, deployments, retry))
    return plans


__all__ = [
    "BACKEND_KINDS",
    "OPTION_KEYS",
    "PRICE_KEYS",
    "SAMPLING_RANGES",
    "Deployment",
    "ModelPlan",
    "ProbeResult",
    "RetryPolicy",
    "Timeouts",
    "deployment_from_config",
    "plan_models",
]
