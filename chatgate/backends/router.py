"""Public model names -> ordered deployments, with retries, fallback and circuit breakers.

Configuration
-------------
Every ``[[models]]`` table of the config file is one *deployment*. Tables that repeat the same
``name`` are that model's deployments, in file order (an existing one-table model keeps
working unchanged)::

    [[models]]                       # deployment #0 of "llama"
    name = "llama"
    base_url = "http://gpu-a:8000/v1"
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
    api_key_env = "GPU_A_KEY"        # the key is read from this variable, never stored
    context_window = 131072          # model-level keys are read from the FIRST table
    priority = 0
    weight = 3
    first_byte_timeout = 30

    [[models]]                       # deployment #1: shares priority 0, a quarter of the load
    name = "llama"
    base_url = "http://gpu-b:8000/v1"
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
    priority = 0
    weight = 1

    [[models]]                       # deployment #2: only when both above fail
    name = "llama"
    backend = "local"
    priority = 1

Per table (deployment): ``backend`` (``openai_compat`` | ``local``), ``base_url``,
``upstream_model``, ``api_key_env``, ``weight`` (default 1; 0 = only when the others of its
priority fail), ``priority`` (lower is tried first; **defaults to the table's position**, so a
plain list is a fallback chain; give several tables the same priority to share load by weight:
set it on all tables of a model or on none), ``connect_timeout``, ``first_byte_timeout``,
``idle_timeout``, ``total_timeout`` (seconds; defaults from ``upstream_connect_timeout``,
``upstream_timeout`` and :mod:`chatgate.backends.deployment`), ``breaker_failures`` (default 5)
and ``breaker_cooldown`` (seconds, default 30). Per model (first table): ``context_window``,
``retries`` (default 2), ``retry_backoff`` (default 0.25 s), ``retry_backoff_max`` (4 s), and
``input_price_per_mtok`` / ``output_price_per_mtok`` (US dollars per million prompt / completion
tokens, default 0: the cost each usage record carries, whichever deployment answered).
The four timeouts are enforced by the ``openai_compat`` backend (see its docstring and
:mod:`.sse`); the local model is bounded by its own queue and ``max_tokens`` instead.

Routing one request
-------------------
1. Order: priorities ascending; within a priority a weighted random order.
2. Try each deployment once, in that order, skipping those whose breaker is open. Then up to
   ``retries`` more attempts cycle through the list again, each after an exponential backoff
   with jitter. Retried: connect errors, 5xx, 408 and timeouts. An upstream 429 (or a busy local
   model's 503) moves on to the next deployment and is not retried there; so do 401/403 and
   other unexpected statuses (a wrong upstream key will not heal by retrying). An upstream's
   verdict on the request itself (400/404/422 with a message) goes back to the client at once.
3. A stream is retried only until its first event is in hand: :meth:`Route.chat_stream` waits
   for it before returning, so nothing has reached the client while it may still fall back
   (a first event that is the upstream's own ``data: {"error": ...}`` is a 502 failure too).
   After that a failure ends the stream with a ``data: {"error": ...}`` event.
4. When nothing is left: any upstream 429 -> 429 with the upstream's ``retry-after``; else the
   last failure (502 ``upstream_error``, 504 ``upstream_timeout``); all breakers open -> 502
   with ``retry-after`` = time to the next probe. Messages name the model, never a URL or key.

Breaker accounting (see :mod:`chatgate.backends.breaker`): connect errors, 5xx, 408, 401/403,
404/405 without a message (a wrong key or URL), redirects, timeouts and streams broken after
their start are failures; any other answer, a 4xx included (one that moves on, such as a
proxy's 413, too), is a success; 429s, a busy local model and cancelled requests count as
neither.

For the API layer: ``route = router.resolve(name)`` then ``route.chat(body)``,
``route.chat_stream(body, include_usage=...)`` or ``route.embeddings(body)``; afterwards
``route.served_by`` is the :class:`Deployment` that answered. For operators and metrics:
:meth:`Router.status`, :meth:`Router.check` and :meth:`Router.on_failure`.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

from chatgate import errors
from chatgate.backends.base import Backend, ChatResult, ChatStream, Usage
from chatgate.backends.breaker import BreakerState, CircuitBreaker
from chatgate.backends.deployment import (
    SAMPLING_RANGES,
    Deployment,
    ModelPlan,
    ProbeResult,
    plan_models,
)
from chatgate.backends.openai_compat import OpenAICompatBackend
from chatgate.backends.upstream_errors import UpstreamStatusError, UpstreamUnreachable
from chatgate.settings import ModelConfig, Settings

log = logging.getLogger(__name__)
ERROR_EVENT = b'data: {"error"'
_is_error = operator.methodcaller("startswith", ERROR_EVENT)
T = TypeVar("T")
FailureHook = Callable[[Deployment, str], None]


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    """One deployment's health, for ``/api/admin/backends``, ``/readyz`` and metrics."""

    model: str
    deployment: str
    backend: str
    upstream_model: str
    priority: int
    weight: float
    state: str  # closed | open | half_open
    consecutive_failures: int
    total_failures: int
    requests: int
    in_flight: int
    last_error: str | None  # "connect", "timeout", "500", "429", "stream", ...
    last_error_at: float | None  # unix time
    retry_in: float | None  # seconds until the next probe, while open

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeploymentCheck:
    """The result of probing one deployment (``chatgate models check``)."""

    model: str
    deployment: str
    backend: str
    upstream_model: str
    ok: bool
    detail: str
    latency_ms: float | None
    listed: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Slot:
    """A deployment at run time: its backend, breaker and counters."""

    __slots__ = (
        "backend",
        "breaker",
        "deployment",
        "hooks",
        "in_flight",
        "last_error",
        "last_error_at",
        "requests",
    )

    def __init__(
        self,
        deployment: Deployment,
        backend: Backend,
        breaker: CircuitBreaker,
        hooks: list[FailureHook],
    ) -> None:
        self.deployment = deployment
        self.backend = backend
        self.breaker = breaker
        self.hooks = hooks  # the router's list, shared by every slot
        self.in_flight = 0
        self.requests = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def failed(self, reason: str, *, counts: bool) -> None:
        """Note a failure; ``counts`` feeds the breaker (a 429 does not)."""
        self.last_error = reason
        self.last_error_at = time.time()
        for hook in self.hooks:
            hook(self.deployment, reason)
        if not counts:
            self.breaker.record_abandoned()
            return
        was = self.breaker.state
        self.breaker.record_failure()
        if self.breaker.state is BreakerState.OPEN and was is not BreakerState.OPEN:
            log.warning(
                "deployment %s: circuit opened after %s (%d consecutive failures)",
                self.deployment.id,
                reason,
                self.breaker.snapshot().consecutive_failures,
            )

    def succeeded(self) -> None:
        if self.breaker.state is not BreakerState.CLOSED:
            log.warning("deployment %s: circuit closed", self.deployment.id)
        self.breaker.record_success()


def chat_body(body: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """A chat request as one deployment gets it: its upstream model's name, and its sampling
    defaults where the request is silent (``null`` included)."""
    out = {**body, "model": config.upstream_model}
    options = config.options
    if "temperature" in options or "top_p" in options:  # most tables set neither
        for name in SAMPLING_RANGES:
            if name in options and out.get(name) is None:
                out[name] = options[name]
    return out


def failure_reason(exc: errors.APIError) -> str:
    """A short, URL-free label of what went wrong, for status pages and logs."""
    if isinstance(exc, UpstreamStatusError):
        return str(exc.upstream_status)
    if isinstance(exc, errors.UpstreamTimeout):
        return "timeout"
    if isinstance(exc, errors.RateLimited):
        return "429"
    if isinstance(exc, errors.ServiceUnavailable):
        return "503"
    if isinstance(exc, UpstreamUnreachable):
        return exc.reason
    return exc.code or "error"


def _retry_after(exc: errors.APIError) -> float:
    try:
        return float(exc.headers.get("retry-after", "inf"))
    except ValueError:
        return float("inf")


class _Model:
    """One public model: its slots in priority tiers, and the attempt loop."""

    def __init__(self, plan: ModelPlan, slots: list[_Slot], rng: Callable[[], float]) -> None:
        self.plan = plan
        self.slots = slots
        self._rng = rng
        priorities = sorted({s.deployment.priority for s in slots})
        self._tiers = [[s for s in slots if s.deployment.priority == p] for p in priorities]

    def order(self) -> list[_Slot]:
        """This request's order: tiers by priority, weighted random order within a tier."""
        if len(self.slots) == 1:
            return self.slots
        out: list[_Slot] = []
        for tier in self._tiers:
            if len(tier) == 1:
                out.extend(tier)
                continue
            # Efraimidis-Spirakis: sorting by u ** (1 / w) is a weighted draw without replacement.
            keyed = [
                (self._rng() ** (1.0 / s.deployment.weight) if s.deployment.weight > 0 else -1.0, s)
                for s in tier
            ]
            keyed.sort(key=lambda pair: pair[0], reverse=True)
            out.extend(s for _, s in keyed)
        return out

    async def run(self, route: Route, op: Callable[[_Slot], Awaitable[T]]) -> T:
        """Call ``op`` on deployments in order until one answers (see the module docstring)."""
        order = self.order()
        retry = self.plan.retry
        attempts = order + [order[k % len(order)] for k in range(retry.retries)]
        tried: set[int] = set()
        skip: set[int] = set()  # 429 / non-retryable: not again in this request
        limited: list[errors.APIError] = []
        failures: list[errors.APIError] = []
        retries = 0
        for slot in attempts:
            key = id(slot)
            if key in skip or not slot.breaker.available():
                continue
            if key in tried:
                await asyncio.sleep(retry.delay(retries, self._rng()))
                retries += 1
            if not slot.breaker.allow():
                continue
            tried.add(key)
            slot.in_flight += 1
            slot.requests += 1
            try:
                result = await op(slot)
            except (errors.RateLimited, errors.ServiceUnavailable) as exc:
                slot.failed(failure_reason(exc), counts=False)
                limited.append(exc)
                skip.add(key)
            except errors.APIError as exc:
                if exc.status < 500:
                    slot.succeeded()  # the upstream is alive; the request itself is refused
                    raise
                # 502, 504, or another server-side error (a backend's own 500)
                reason = failure_reason(exc)
                status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else 500
                # A 4xx but 401/403/404/405 (a wrong key or URL) refused this request (a
                # proxy's 413, a 400 without a message), not the deployment: a breaker success.
                refused = 400 <= status < 500 and status not in (401, 403, 404, 405)
                slot.failed(reason, counts=not refused)
                if refused:
                    slot.succeeded()
                failures.append(exc)
                log.debug("deployment %s failed: %s", slot.deployment.id, reason)
                if status < 500:
                    skip.add(key)  # 401, 403, 413...: retrying the same place will not help
            except BaseException:
                slot.breaker.record_abandoned()
                raise
            else:
                slot.succeeded()
                route.served_by = slot.deployment
                return result
            finally:
                slot.in_flight -= 1
        raise self._give_up(limited, failures)

    def _give_up(
        self, limited: list[errors.APIError], failures: list[errors.APIError]
    ) -> errors.APIError:
        if limited:
            return min(limited, key=_retry_after)
        if failures:
            return failures[-1]
        waits = [s.breaker.snapshot().retry_in for s in self.slots]
        wait = max(1, round(min((w for w in waits if w is not None), default=1.0)))
        return errors.UpstreamError(
            f"No upstream for model `{self.plan.model.name}` is available right now "
            f"(every deployment is failing). Please try again in {wait}s.",
            headers={"retry-after": str(wait), "retry-after-ms": str(wait * 1000)},
        )


class Route:
    """One request's way to a public model: ``chat``, ``chat_stream`` and ``embeddings``.

    ``model`` is the public :class:`ModelConfig` (name, context window). The body given to the
    methods carries the public name in ``model``; each deployment substitutes its upstream
    model. After a call, ``served_by`` is the deployment that answered.
    """

    __slots__ = ("_entry", "model", "served_by")

    def __init__(self, entry: _Model) -> None:
        self._entry = entry
        self.model: ModelConfig = entry.plan.model
        self.served_by: Deployment | None = None

    @property
    def backend_name(self) -> str:
        """The backend kind that served the request (before a call: the first deployment's)."""
        served = self.served_by or self._entry.plan.deployments[0]
        return served.backend

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        """A non-streamed chat completion, with retries and fallback."""

        async def call(slot: _Slot) -> ChatResult:
            config = slot.deployment.config
            return await slot.backend.chat(config, chat_body(body, config))

        return await self._entry.run(self, call)

    async def chat_stream(self, body: dict[str, Any], *, include_usage: bool) -> ChatStream:
        """Open a stream; returns once its first event is in hand (retries end there)."""

        async def call(slot: _Slot) -> ChatStream:
            config = slot.deployment.config
            stream = await slot.backend.chat_stream(
                config, chat_body(body, config), include_usage=include_usage
            )
            batches = stream.batches()
            try:
                first = await anext(batches)
            except StopAsyncIteration:
                await stream.aclose()
                raise errors.UpstreamError(
                    f"The upstream for model `{config.name}` ended the stream before answering."
                ) from None
            except BaseException:
                await stream.aclose()
                raise
            if stream.failure is not None:
                await stream.aclose()
                raise stream.failure
            if _is_error(first[0]):  # the upstream's own error event, before anything else
                await stream.aclose()
                raise errors.UpstreamError(
                    f"The upstream for model `{config.name}` answered the stream with an error."
                )
            return RoutedStream(stream, batches, first, slot)

        return await self._entry.run(self, call)

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """An embeddings request, with retries and fallback."""

        async def call(slot: _Slot) -> dict[str, Any]:
            config = slot.deployment.config
            return await slot.backend.embeddings(config, {**body, "model": config.upstream_model})

        return await self._entry.run(self, call)


class RoutedStream(ChatStream):
    """A started stream: relays the backend's events, keeps the deployment's counters.

    ``usage``, ``first_byte_at``, ``completion_text`` and ``envelope`` are the backend
    stream's. An error event after the start counts as a failure of the deployment.
    """

    def __init__(
        self,
        inner: ChatStream,
        batches: AsyncIterator[list[bytes]],
        first: list[bytes],
        slot: _Slot,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._inner_batches = batches
        self._first: list[bytes] | None = first
        self._slot = slot
        self._broken = False
        self._finished = False
        slot.in_flight += 1

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @usage.setter
    def usage(self, value: Usage | None) -> None:
        self._inner.usage = value

    @property
    def first_byte_at(self) -> float | None:
        return self._inner.first_byte_at

    @first_byte_at.setter
    def first_byte_at(self, value: float | None) -> None:
        self._inner.first_byte_at = value

    @property
    def completion_text(self) -> str:
        return self._inner.completion_text

    @property
    def failure(self) -> errors.APIError | None:
        """What broke the stream after its start: the backend's failure (the connection, a
        time limit), or a 502 for an error event the upstream sent itself; ``None`` if none."""
        if not self._broken:
            return None
        return self._inner.failure or errors.UpstreamError(
            f"The upstream for model `{self._slot.deployment.config.name}` ended the stream "
            "with an error."
        )

    @failure.setter
    def failure(self, value: errors.APIError | None) -> None:
        self._inner.failure = value

    def envelope(self) -> dict[str, Any]:
        return self._inner.envelope()

    async def _batches(self) -> AsyncGenerator[list[bytes], None]:
        try:
            if self._first is not None:  # its first event was the route's to judge
                first, self._first = self._first, None
                self._broken = any(map(_is_error, first[1:]))
                yield first
            async for batch in self._inner_batches:
                if not self._broken and any(map(_is_error, batch)):
                    self._broken = True
                yield batch
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._slot.in_flight -= 1
        if self._broken:
            failure = self._inner.failure
            reason = failure_reason(failure) if failure is not None else "stream"
            self._slot.failed(reason, counts=True)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
            await self._close_batches()
        finally:
            self._finish()


class Router:
    """Resolves public model names to routes; owns the backends and the breakers."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._backends: list[Backend] = []
        self._local: Backend | None = None
        self._models: dict[str, _Model] = {}
        self._hooks: list[FailureHook] = []
        # Each upstream base URL's connection cap, shared by every deployment that uses it.
        self._caps: dict[str, asyncio.Semaphore] = {}
        # A local model holds what the one embedded model loads (local_context), whatever its
        # table says: its default of 8,192 let context trimming keep twice what fits in 4,096.
        configs = [
            replace(m, context_window=min(m.context_window, settings.local_context))
            if m.backend == "local"
            else m
            for m in settings.models
        ]
        if settings.local_model and all(m.name != settings.local_model_name for m in configs):
            configs.insert(
                0,
                ModelConfig(
                    name=settings.local_model_name,
                    backend="local",
                    upstream_model=settings.local_model_name,
                    context_window=settings.local_context,
                ),
            )
        for plan in plan_models(settings, configs):
            slots = [
                _Slot(
                    d,
                    self._backend(d),
                    CircuitBreaker(
                        failure_threshold=d.breaker_failures,
                        cooldown=d.breaker_cooldown,
                        clock=clock,
                    ),
                    self._hooks,
                )
                for d in plan.deployments
            ]
            self._models[plan.model.name] = _Model(plan, slots, rng)

    def _backend(self, deployment: Deployment) -> Backend:
        if deployment.backend == "local":
            if self._local is None:
                from chatgate.backends.local import LocalBackend

                self._local = LocalBackend(self._settings)
                self._backends.append(self._local)
            return self._local
        backend = OpenAICompatBackend(self._settings, deployment.timeouts, self._caps)
        self._backends.append(backend)
        return backend

    def on_failure(self, hook: FailureHook) -> None:
        """Call ``hook(deployment, reason)`` on every failed attempt (for metrics).

        ``reason`` is a short label: ``connect``, ``timeout``, ``stream``, ``429``, ``503`` or
        an upstream status such as ``500``. The hook runs on the event loop; keep it cheap.
        """
        self._hooks.append(hook)

    async def start(self) -> None:
        """Start every backend (the local one loads its model)."""
        for backend in self._backends:
            await backend.start()

    async def close(self) -> None:
        """Close every backend's connections."""
        for backend in self._backends:
            await backend.close()

    def resolve(self, name: str) -> Route:
        """A route for public model ``name``; 404 ``model_not_found`` when unknown."""
        entry = self._models.get(name)
        if entry is None:
            raise errors.ModelNotFound(name)
        return Route(entry)

    def models(self) -> list[ModelConfig]:
        """The public models, in configuration order."""
        return [entry.plan.model for entry in self._models.values()]

    def status(self) -> list[DeploymentStatus]:
        """Every deployment's breaker state and counters (no URLs, no keys)."""
        out = []
        for entry in self._models.values():
            for slot in entry.slots:
                d, snap = slot.deployment, slot.breaker.snapshot()
                out.append(
                    DeploymentStatus(
                        model=d.config.name,
                        deployment=d.id,
                        backend=d.backend,
                        upstream_model=d.upstream_model,
                        priority=d.priority,
                        weight=d.weight,
                        state=snap.state.value,
                        consecutive_failures=snap.consecutive_failures,
                        total_failures=snap.total_failures,
                        requests=slot.requests,
                        in_flight=slot.in_flight,
                        last_error=slot.last_error,
                        last_error_at=slot.last_error_at,
                        retry_in=None if snap.retry_in is None else round(snap.retry_in, 3),
                    )
                )
        return out

    async def check(self) -> list[DeploymentCheck]:
        """Probe every deployment at once (``GET /models`` upstream; the local model's state)."""
        slots = [slot for entry in self._models.values() for slot in entry.slots]
        results = await asyncio.gather(*(self._probe(slot) for slot in slots))
        return [
            DeploymentCheck(
                model=slot.deployment.config.name,
                deployment=slot.deployment.id,
                backend=slot.deployment.backend,
                upstream_model=slot.deployment.upstream_model,
                ok=result.ok,
                detail=result.detail,
                latency_ms=result.latency_ms,
                listed=result.listed,
            )
            for slot, result in zip(slots, results, strict=True)
        ]

    async def _probe(self, slot: _Slot) -> ProbeResult:
        backend = slot.backend
        if isinstance(backend, OpenAICompatBackend):
            return await backend.probe(slot.deployment.config)
        available = getattr(backend, "available", None)
        if available is None:
            return ProbeResult(True, "no probe for this backend")
        if available:
            return ProbeResult(True, "ok")
        return ProbeResult(False, str(getattr(backend, "unavailable_reason", "unavailable")))


__all__ = ["DeploymentCheck", "DeploymentStatus", "Route", "RoutedStream", "Router"]
