"""``create_app(settings)``: routes, the middleware, and the start/stop of every part."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from chatgate import dashboard, throttle, tokens
from chatgate.accounts import AccountStore, PlanStore
from chatgate.api import admin_backends, conversations, leaks, manage, openai, ops, responses
from chatgate.api import usage as usage_api
from chatgate.api.bodies import SERVER_OPTIONS
from chatgate.auth import Authenticator
from chatgate.backends.router import Router
from chatgate.db.engine import create_engine
from chatgate.keys.store import KeyStore
from chatgate.limits import Limits
from chatgate.metrics import Metrics
from chatgate.middleware import MALFORMED_REQUESTS, api_middleware
from chatgate.notify import Listener, Notifier
from chatgate.settings import Settings
from chatgate.state import STATE, State
from chatgate.usage.recorder import UsageRecorder

__all__ = ["SERVER_OPTIONS", "create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, metrics_dir: Path | None = None) -> web.Application:
    """The aiohttp application for ``settings``; everything starts in its cleanup context.
    Its server must be given :data:`SERVER_OPTIONS`. ``metrics_dir``: where the workers of
    ``serve --workers N`` share their figures, so that ``/metrics`` sums them all."""
    app = web.Application(middlewares=[api_middleware], client_max_size=settings.max_body_bytes)
    logging.getLogger("aiohttp.server").addFilter(MALFORMED_REQUESTS)  # once: one instance
    app.cleanup_ctx.append(_lifespan(settings, metrics_dir))
    openai.setup(app)
    ops.setup(app)
    admin_backends.setup(app)
    usage_api.setup(app)
    responses.setup(app)
    conversations.setup(app)
    manage.setup(app)
    leaks.setup(app)
    dashboard.setup(app)
    return app


def _lifespan(settings: Settings, metrics_dir: Path | None):  # type: ignore[no-untyped-def]
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        engine = create_engine(settings, command_timeout=settings.db_command_timeout)
        # Changes made here are applied here at once (a key's) and, with Redis, announced
        # after commit (one notifier for the process); the listener below wakes the feed for
        # changes made anywhere.
        notifier = Notifier.from_settings(settings) or Notifier(None)  # None: no Redis
        keys = KeyStore.from_settings(engine, settings, notifier=notifier)
        auth = Authenticator(
            keys,
            engine,
            ttl=settings.key_cache_ttl,
            poll_interval=settings.effective_invalidation_poll,
        )
        notifier.here = auth.changed_here
        router = Router(settings)
        state = State(
            settings=settings,
            engine=engine,
            keys=keys,
            accounts=AccountStore(engine, notifier),
            plans=PlanStore(engine, notifier),
            auth=auth,
            router=router,
            limits=Limits.from_settings(settings),
            throttles=throttle.connect(settings),
            started_at=time.time(),
        )
        metrics = Metrics(m.name for m in router.models())
        state.metrics = metrics
        router.on_failure(
            lambda d, reason: metrics.upstream_error(d.config.backend, d.config.name, reason)
        )
        recorder: UsageRecorder | None = None
        if settings.usage_enabled:
            settings.make_data_dir()  # 0700 when new (the spool would make it as the umask says)
            recorder = UsageRecorder(
                engine,
                settings.data_dir / "spool",
                flush_interval=settings.usage_flush_interval,
                batch_size=settings.usage_batch_size,
                retention_seconds=settings.usage_retention_days * 86400,
            )
            metrics.bind_usage(recorder)
            recorder.on_replayed_orphan = state.limits.seed_again
            state.usage = recorder
        app[STATE] = state
        tokens.preload()  # build the tokenizers now, not on the first request
        await auth.start_feed()
        # A limit begun mid-month counts from the month's records, from its first request on.
        auth.before_change = functools.partial(state.limits.seed_changes, engine)
        await router.start()
        try:  # before the first request: the quotas and daily limits as the records left them
            await state.limits.seed(engine)
        except Exception:  # the database or Redis is down: run_seeding tries again
            log.warning("could not seed the limits at start", exc_info=True)
        tasks = [
            asyncio.create_task(auth.run_feed(), name="invalidation-feed"),
            asyncio.create_task(auth.run_last_used(), name="last-used"),
            asyncio.create_task(state.limits.run_renewal(), name="lease-renewal"),
            asyncio.create_task(state.limits.run_seeding(engine), name="limit-seeding"),
        ]
        listener = Listener.from_settings(settings)
        if listener is not None:
            tasks.append(asyncio.create_task(listener.run(auth.wake), name="invalidation-pubsub"))
        if recorder is not None:
            recorder.start()
        if metrics_dir is not None:
            metrics.share(metrics_dir)
            tasks.append(asyncio.create_task(metrics.run_sharing(), name="metrics-sharing"))
        _tune_gc()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await auth.close()
            if recorder is not None:
                await recorder.close()  # a graceful stop flushes every usage record
            metrics.write_share()  # the last requests' counts stay in the workers' sums
            await router.close()
            await state.limits.close()
            if state.throttles is not None:
                await state.throttles.aclose()
            await engine.dispose()

    return lifespan


def _tune_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Measured on this stack (DESIGN.md, "Server stack"): p99 at saturation ~39 ms -> ~6 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
