"""Bearer key -> :class:`Principal`, cached in process.

What is cached: for each key hash seen, the key's account, plan limits, scopes and expiry
(or the fact that no such key exists). The request path reads only this cache; the database
is read on a miss and then not again for that key until:
- the invalidation feed (a table every process polls every ``invalidation_poll`` seconds,
  written in the same transaction as every key/account/plan change, the CLI's included)
  names it — so a revocation anywhere takes effect everywhere within ~1 s; with Redis, each
  change also wakes every process to poll at once (:mod:`chatgate.notify`: milliseconds); or
- ``key_cache_ttl`` passes (the backstop if the feed were ever missed). A key found once is
  then read again in the background while its entry answers: a database that stops
  answering held each key's requests for the read's timeout (5 s) once a TTL (QA); a
  change the feed missed is seen by the requests after the read.
Expiry and the rotation grace are checked against the clock on every request, no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate import errors
from chatgate.db.tables import invalidations
from chatgate.keys import format as keyfmt
from chatgate.keys.store import KeyLookup, KeyRecord, KeyStore
from chatgate.ratelimit import Check

log = logging.getLogger(__name__)

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_KEY = "Incorrect API key provided. You can find your API keys in the chatgate dashboard."
DISABLED = (
    "This key is associated with a disabled account. If you feel this is an error, ask the "
    "administrator of this chatgate to enable it."
)
NEGATIVE_CACHE_LIMIT = 100_000
FEED_GAP_WAIT = 30.0  # seconds a feed id skipped over is looked for (see poll_once)
FEED_MAX_GAPS = 1_000
LOOKUP_TIMEOUT = 5.0  # seconds a key's database read may take (on a cache miss only)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key, its account, and what they may do."""

    key_id: str
    account_id: str
    is_admin: bool
    models: frozenset[str] | None
    limits: dict[str, int | None]
    key_limits: dict[str, int | None]
    # The secret presented is the one a rotation replaced, accepted only in its grace period:
    # it may call the API (/v1) but not manage keys (:func:`chatgate.api.manage.caller`).
    previous_secret: bool = False
    # The limiter checks of this key and account, built on first use by
    # :func:`chatgate.limits.checks_for` and kept here: the authenticator hands out the same
    # principal for every request of a key until its cache entry is dropped (a plan or key
    # change drops it), so they are built once per key, not per request.
    limit_checks: tuple[Check, ...] | None = field(default=None, compare=False, repr=False)
    # Whether one of them charges tokens (so a request's tokens must be counted), kept beside.
    limit_tokens: bool = field(default=False, compare=False, repr=False)
    # The tightest tokens-per-window limit among them (None: none), kept beside: what a
    # request that names no max_tokens reserves at most (see Call.admit).
    token_ceiling: int | None = field(default=None, compare=False, repr=False)
    # The monthly budgets (in nano-dollars), kept as the checks are: built on first use by
    # :func:`chatgate.limits.budget_checks_for`; empty for most keys.
    budget_checks: tuple[Check, ...] | None = field(default=None, compare=False, repr=False)
    # Its request-rate checks alone (rpm, rpd), kept as the others are: built on first use by
    # :func:`chatgate.limits.request_checks_for`, for calls that use no model (session writes).
    request_checks: tuple[Check, ...] | None = field(default=None, compare=False, repr=False)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(slots=True)
class _Entry:
    lookup: KeyLookup | None
    fetched_at: float
    principal: Principal | None = None  # built on the first request that passes


class Authenticator:
    """Verifies bearer keys against a cache kept fresh by the invalidation feed."""

    def __init__(
        self, store: KeyStore, engine: AsyncEngine, *, ttl: float, poll_interval: float
    ) -> None:
        self._store = store
        self._engine = engine
        self._ttl = ttl
        self._poll = poll_interval
        self._cache: dict[str, _Entry] = {}
        self._touch_failing = False  # the last flush of last-used times failed
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        self._refreshing: dict[str, asyncio.Task[_Entry]] = {}  # by digest: see _refresh
        self._last_event = 0
        self._gaps: dict[int, float] = {}  # feed ids skipped over -> when first missed
        self._wake = asyncio.Event()  # set by wake(): poll now, not at the next tick
        self._applied = 0  # feed events applied so far (see _load)
        self.last_used: dict[str, int] = {}
        self.db_lookups = 0
        self.before_change: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = None
        """Awaited with a poll's events (kind, ref) before they are applied: the limits seed
        what a change begins, so that the first request under it finds them seeded."""

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value, or a 401 ``APIError``."""
        if not authorization:
            raise errors.AuthenticationError(MISSING_KEY)
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise errors.AuthenticationError(MISSING_KEY)
        # isascii() is O(1) in CPython (a flag of the string): a header that is not ASCII
        # (aiohttp reads bytes that are not UTF-8 as lone surrogates) cannot be hashed.
        if len(key) != keyfmt.KEY_LEN or not key.isascii():
            raise errors.AuthenticationError(BAD_KEY)
        digest = self._store.hash(key)
        entry = self._fresh(digest)
        if entry is None:
            entry = self._cache.get(digest)
            if entry is not None and entry.lookup is not None:
                self._refresh(digest)  # past its TTL: answers while it is read again
            else:
                # Only a digest seen before skips the format check: every cached one passed
                # it, and a typo or random string is still refused before any database read.
                if not keyfmt.is_well_formed(key):
                    raise errors.AuthenticationError(BAD_KEY)
                entry = await self._load(digest)
        lookup = entry.lookup
        if lookup is None or lookup.revoked_at is not None:
            raise errors.AuthenticationError(BAD_KEY)
        wall = time.time()
        if lookup.matched_previous and (
            lookup.prev_valid_until is None or lookup.prev_valid_until <= wall
        ):
            raise errors.AuthenticationError(BAD_KEY)
        if lookup.account_disabled:  # the caller holds a live secret: it may know why
            raise errors.AccountDeactivated(DISABLED)
        if lookup.expires_at is not None and lookup.expires_at <= wall:
            raise errors.ExpiredAPIKey(
                "The API key provided has expired. Create a new one in the chatgate dashboard."
            )
        principal = entry.principal
        if principal is None:
            principal = entry.principal = Principal(
                key_id=lookup.key_id,
                account_id=lookup.account_id,
                is_admin=lookup.is_admin,
                models=lookup.models,
                limits=lookup.plan,
                key_limits=lookup.overrides,
                previous_secret=lookup.matched_previous,
            )
        # Any request the key authenticates is a use: /v1/models, a malformed body, a 429.
        # "Last used" is what tells its owner whether revoking it breaks something.
        self.last_used[lookup.key_id] = int(wall)  # written in batches, off-path
        return principal

    def _fresh(self, digest: str) -> _Entry | None:
        """The cached entry for ``digest`` while within ``key_cache_ttl``; else None."""
        entry = self._cache.get(digest)
        if entry is not None and time.monotonic() - entry.fetched_at < self._ttl:
            return entry
        return None

    def _refresh(self, digest: str) -> None:
        """Read ``digest`` again in the background (once at a time; see :meth:`_load`)."""
        if digest in self._refreshing or digest in self._inflight:
            return
        task = asyncio.create_task(self._load(digest), name="key-refresh")
        self._refreshing[digest] = task
        task.add_done_callback(lambda done: self._refreshed(digest, done))

    def _refreshed(self, digest: str, task: asyncio.Task[_Entry]) -> None:
        self._refreshing.pop(digest, None)
        if not task.cancelled() and task.exception() is not None:  # a stale entry is kept
            log.warning("key refresh failed: %s", type(task.exception()).__name__)

    async def _load(self, digest: str) -> _Entry:
        """Read ``digest`` from the database (no fresh entry is cached) and cache it."""
        entry = self._cache.get(digest)  # stale, if any: served while the database is down
        pending = self._inflight.get(digest)
        if pending is not None:  # one database read per key, however many wait for it
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        applied = self._applied
        try:
            self.db_lookups += 1
            # Bounded: a database that stops answering (a frozen host, a failover moving its
            # address) would hold every request of the key for as long as it keeps silent.
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                lookup = await self._store.lookup(digest)
        except Exception as exc:
            if entry is not None:
                # The database is down and the TTL ran out: keep trusting what we knew (the
                # feed catches up when it returns) rather than failing every request, for
                # another TTL: not a failed read (or a timeout's wait) on every request.
                log.warning("key lookup failed; serving the cached entry: %s", type(exc).__name__)
                entry.fetched_at = time.monotonic()
                future.set_result(entry)
                return entry
            error = errors.ServiceUnavailable(
                "The server cannot verify API keys right now. Please try again shortly.",
                headers={"retry-after": "1"},
            )
            future.set_exception(error)
            future.exception()  # mark retrieved when nobody else waits
            raise error from exc
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            self._inflight.pop(digest, None)
        entry = _Entry(lookup, time.monotonic())
        future.set_result(entry)
        # A change applied while the row was being read may be newer than what was read: then
        # it answers the requests that waited for it, and the next request reads again.
        if applied == self._applied and (
            lookup is not None or len(self._cache) < NEGATIVE_CACHE_LIMIT
        ):
            self._cache[digest] = entry
        return entry

    # -- the invalidation feed -------------------------------------------------------------

    async def start_feed(self) -> None:
        """Skip past existing events; ``run_feed`` then applies only new ones."""
        async with self._engine.connect() as conn:
            self._last_event = int(
                (await conn.execute(sa.select(sa.func.max(invalidations.c.id)))).scalar() or 0
            )

    async def run_feed(self) -> None:
        """Poll the invalidation table every ``poll_interval`` seconds, and at once after
        :meth:`wake`; forever (cancel to stop); survives database outages.

        Polls never overlap: wake-ups that arrive during a poll add up to one more poll. An
        outage is logged once, when the first poll fails, and again when one succeeds.
        """
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()
            self._wake.clear()  # before the poll: a wake-up during it means "poll again"
            try:
                await self.poll_once()
            except Exception:  # the database may be down; the TTL backstop still holds
                if not failing:
                    log.warning("invalidation feed: poll failed", exc_info=True)
                failing = True
                continue
            if failing:
                log.warning("invalidation feed: polling again")
            failing = False

    def wake(self) -> None:
        """Make :meth:`run_feed` poll now: the table has news (a Redis message said so, see
        :mod:`chatgate.notify`). No I/O here; the poll runs in the feed's own task."""
        self._wake.set()

    async def poll_once(self) -> None:
        """Apply the feed's new events in id order, and those of earlier gaps that appeared.

        Ids are handed out at insert, not at commit: on PostgreSQL a change can commit after a
        higher-numbered one that a poll has already passed (likelier now that Redis wakes every
        server right after each commit). So ids a poll skips over are kept as gaps and asked
        for again for ``FEED_GAP_WAIT`` seconds; most gaps are rolled-back changes and expire.
        """
        query: sa.ColumnElement[bool] = invalidations.c.id > self._last_event
        if self._gaps:
            query = sa.or_(query, invalidations.c.id.in_(list(self._gaps)))
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(invalidations.c.id, invalidations.c.kind, invalidations.c.ref)
                    .where(query)
                    .order_by(invalidations.c.id)
                )
            ).all()
        clock = time.monotonic()
        if self.before_change is not None and rows:
            await self.before_change([(kind, ref) for _, kind, ref in rows])
        for event_id, kind, ref in rows:
            self.apply(kind, ref)
            if event_id <= self._last_event:  # a gap filled in: a late commit
                self._gaps.pop(event_id, None)
                continue
            for skipped in range(max(self._last_event + 1, event_id - FEED_MAX_GAPS), event_id):
                self._gaps[skipped] = clock
            self._last_event = event_id
        expired = [i for i, seen in self._gaps.items() if clock - seen > FEED_GAP_WAIT]
        for event_id in expired:
            del self._gaps[event_id]
        if len(self._gaps) > FEED_MAX_GAPS:  # only after a pathological jump of ids
            for event_id in sorted(self._gaps)[: len(self._gaps) - FEED_MAX_GAPS]:
                del self._gaps[event_id]

    def changed_here(self, kind: str, ref: str) -> None:
        """A change this process committed (:class:`~chatgate.notify.Notifier`'s ``here``).
        A key's (rotated, revoked, expiry changed) is applied at once: the poll's next pass,
        up to ``poll_interval`` later, let the secret just rotated or revoked still pass here,
        and mint a key or rotate it away from its owner (QA, without Redis). Other changes
        wait for the feed, which seeds their limits before it drops what they change."""
        if kind == "key":
            self.apply(kind, ref)

    def apply(self, kind: str, ref: str) -> None:
        """Drop cached entries a change makes stale."""
        self._applied += 1
        if kind == "key_new":  # a new secret: forget only that it was unknown
            entry = self._cache.get(ref)
            if entry is not None and entry.lookup is None:
                del self._cache[ref]
        elif kind == "plan":
            self._cache.clear()
        else:
            field = "key_id" if kind == "key" else "account_id"
            stale = [
                digest
                for digest, entry in self._cache.items()
                if entry.lookup is not None and getattr(entry.lookup, field) == ref
            ]
            for digest in stale:
                del self._cache[digest]

    def seen(self, record: KeyRecord) -> KeyRecord:
        """``record`` with its last use in this process, if that is not written yet (the stamps
        are written every 10 s): a key used a moment ago is not shown as never used."""
        stamp = self.last_used.get(record.id)
        if stamp is None or stamp <= (record.last_used_at or 0):
            return record
        return replace(record, last_used_at=stamp)

    async def flush_last_used(self) -> None:
        """Write the ``last_used_at`` stamps gathered since the last flush."""
        batch, self.last_used = self.last_used, {}
        try:
            await self._store.touch(batch)
        except Exception as exc:
            # One line, once an outage (QA: a ~95-line traceback every 10 s while the
            # database was away); the stamps are kept for the next try.
            if not self._touch_failing:
                log.warning(
                    "could not record last-used times (kept for the next try): %s: %s",
                    type(exc).__name__,
                    str(exc)[:200],
                )
            self._touch_failing = True
            for key_id, stamp in batch.items():
                self.last_used.setdefault(key_id, stamp)
            return
        if self._touch_failing:
            self._touch_failing = False
            log.info("recording last-used times again")

    async def run_last_used(self, interval: float = 10.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush_last_used()

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        # Bounded: a stop must end even with the database frozen (the stamps are not worth it).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                await self.flush_last_used()
