"""The client-side limiter: rolling windows, server floors, threads and tasks."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.client import RateLimiter, parse_reset
from chatgate.client._limiter import Permit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("120ms", 0.12),
        ("59.998s", 59.998),
        ("1m30.5s", 90.5),
        ("2", 2.0),
        ("0.5", 0.5),
        ("0s", 0.0),
        ("", None),
        ("soon", None),
        ("-1", None),
        (None, None),
    ],
)
def test_parse_reset(text: str | None, seconds: float | None) -> None:
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_rolling_window_requests() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=3, window=10, slack=0, clock=clock)
    assert [limiter.reserve().delay for _ in range(3)] == [0, 0, 0]
    assert limiter.reserve().delay == pytest.approx(10)  # the first one is back at +10
    clock.now += 4
    assert limiter.reserve().delay == pytest.approx(6)  # the second one, same instant
    assert limiter.reserve().delay == pytest.approx(6)
    assert limiter.reserve().delay == pytest.approx(16)


def test_slack_returns_units_a_little_after_the_window() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=1, window=60, clock=clock)  # default slack: 1%
    limiter.reserve()
    assert limiter.reserve().delay == pytest.approx(60.6)
    with pytest.raises(ValueError):
        RateLimiter(slack=-1)


def test_cancel_gives_the_slot_back() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=1, window=10, slack=0, clock=clock)
    permit = limiter.reserve()
    limiter.cancel(permit)
    clock.now += 0.001
    assert limiter.reserve().delay == 0


def test_tokens_are_charged_as_used() -> None:
    clock = Clock()
    estimated = RateLimiter(tpm=100, window=60, slack=0, clock=clock)
    estimated.reserve(80)
    assert estimated.reserve(30).delay == pytest.approx(60)  # 80 + 30 > 100
    settled = RateLimiter(tpm=100, window=60, slack=0, clock=clock)
    first = settled.reserve(80)
    settled.settle(first, 20)  # the answer used 20, not 80
    assert first.tokens == 20
    assert settled.reserve(30).delay == 0
    assert settled.reserve(60).delay == pytest.approx(60)  # 20 + 30 + 60 > 100


def test_a_request_bigger_than_the_budget_waits_for_all_of_it() -> None:
    clock = Clock()
    limiter = RateLimiter(tpm=100, window=60, slack=0, clock=clock)
    limiter.reserve(10)
    assert limiter.reserve(500).delay == pytest.approx(60)


def test_server_floor_from_headers() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)  # nothing configured: everything comes from the server
    permit = limiter.reserve()
    limiter.observe(
        {
            "x-ratelimit-limit-requests": "5",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "2s",
        },
        permit=permit,
    )
    assert limiter.state().requests.limit == 5
    assert [limiter.reserve().delay for _ in range(2)] == [0, 0]  # the two the server has left
    assert limiter.reserve().delay == pytest.approx(2)  # then wait for the server's reset


def test_an_older_answer_does_not_override_a_newer_floor() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    old, new = limiter.reserve(), limiter.reserve()
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
    limiter.observe(headers, permit=new)
    limiter.observe({**headers, "x-ratelimit-remaining-requests": "50"}, permit=old)
    assert limiter.reserve().delay == pytest.approx(3)


def test_learned_limit_is_the_lower_of_both() -> None:
    for configured, server, expected in ((None, 7, 7), (10, 7, 7), (3, 7, 3)):
        limiter = RateLimiter(rpm=configured)
        limiter.observe({"x-ratelimit-limit-requests": str(server)})
        assert limiter.state().requests.limit == expected
    limiter = RateLimiter()
    limiter.observe({"x-ratelimit-limit-requests": "1000", "x-ratelimit-reset-requests": "5h"})
    assert limiter.state().requests.limit is None  # a daily limit is not a per-minute one
    limiter = RateLimiter(rpm=3, follow_server=False)
    limiter.observe({"x-ratelimit-limit-requests": "1"})
    assert limiter.state().requests.limit == 3


def test_retry_after_pauses_everything_unless_too_long() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock, max_wait=30)
    limiter.observe({}, retry_after=1.5)
    assert limiter.reserve().delay == pytest.approx(1.5)
    limiter = RateLimiter(clock=clock, max_wait=30)
    limiter.observe({}, retry_after=3600)  # a daily limit: the server's 429 will say so
    limiter.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5h"})
    assert limiter.reserve().delay == 0


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 8),
    # Gaps on a microsecond grid: the oracle below looks "just before" a slot with a 1e-9 s
    # tolerance, which must stay below the smallest gap (hypothesis found 1.2e-7 s gaps, where
    # a coarser tolerance made the oracle, not the limiter, wrong).
    events=st.lists(
        st.tuples(st.integers(0, 5_000_000).map(lambda us: us / 1e6), st.integers(0, 12)),
        min_size=1,
        max_size=40,
    ),
)
def test_never_more_than_the_limit_in_any_window(
    limit: int, events: list[tuple[float, int]]
) -> None:
    """Property: any window of ``window`` seconds holds at most ``limit`` of each budget;
    slots are first come first served; nobody waits when the window has room."""
    clock = Clock()
    window = 10.0
    limiter = RateLimiter(rpm=limit, tpm=limit * 5, window=window, slack=0, clock=clock)
    booked: list[tuple[float, float, int]] = []  # (asked at, slot, tokens)
    for gap, tokens in events:
        clock.now += gap
        permit = limiter.reserve(tokens)
        assert permit.at == pytest.approx(clock.now + permit.delay)
        booked.append((clock.now, permit.at, min(tokens, limit * 5)))
    slots = [b[1] for b in booked]
    assert slots == sorted(slots)
    for _, at, _ in booked:
        inside = [b for b in booked if at - window + 1e-9 < b[1] <= at]  # float noise
        assert len(inside) <= limit
        assert sum(b[2] for b in inside) <= limit * 5
    for i, (asked, at, tokens) in enumerate(booked):
        if at <= asked + 1e-9 or (i and at <= booked[i - 1][1] + 1e-9):
            continue
        # It waited: just before its slot, the window had no room for it.
        before = [b for b in booked[:i] if at - 1e-9 - window < b[1] <= at - 1e-9]
        assert len(before) + 1 > limit or sum(b[2] for b in before) + tokens > limit * 5


def test_threads_share_one_limiter() -> None:
    limiter = RateLimiter(rpm=10, window=0.5)
    permits = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(5):
            permit = limiter.acquire()
            assert time.monotonic() >= permit.at
            with lock:
                permits.append(permit)

    threads = [threading.Thread(target=work) for _ in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots = sorted(p.at for p in permits)
    assert len(slots) == 40
    for at in slots:
        assert sum(1 for s in slots if at - 0.5 < s <= at) <= 10
    assert time.monotonic() - started >= 1.5  # 40 at 10 per 0.5 s: at least 3 windows


async def test_tasks_share_one_limiter() -> None:
    limiter = RateLimiter(rpm=10, window=0.4)

    async def one() -> float:
        permit = await limiter.aacquire()
        assert time.monotonic() >= permit.at
        return permit.at

    slots = sorted(await asyncio.gather(*(one() for _ in range(30))))
    for at in slots:
        assert sum(1 for s in slots if at - 0.4 < s <= at) <= 10
    assert slots[-1] - slots[0] >= 0.8 - 1e-6


async def test_a_cancelled_task_gives_its_slot_back() -> None:
    limiter = RateLimiter(rpm=1, window=30, slack=0)
    await limiter.aacquire()
    waiting = asyncio.ensure_future(limiter.aacquire())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limiter.state().requests.remaining == 0  # only the first one counts
    assert limiter.reserve().delay == pytest.approx(30, abs=0.1)


def test_a_slot_given_back_does_not_hold_up_the_next_request() -> None:
    """The next request queues behind the requests still booked, not behind a cancelled one."""
    clock = Clock()
    limiter = RateLimiter(tpm=1000, window=60, slack=0, clock=clock)
    limiter.reserve(900)
    big = limiter.reserve(500)  # 900 + 500 > 1000: booked a minute later
    assert big.delay == pytest.approx(60)
    limiter.cancel(big)  # e.g. its task was cancelled by asyncio.wait_for while it waited
    clock.now += 1
    assert limiter.reserve(50).delay == 0  # 900 + 50 fit now

    kept = limiter.reserve(500)  # booked a minute after the first, like big was
    later = limiter.reserve(10)
    assert later.delay >= kept.delay > 0  # first come, first served still
    limiter.cancel(later)
    assert limiter.reserve(10).delay == pytest.approx(kept.delay)


async def test_a_request_timed_out_in_the_queue_does_not_hold_up_the_next() -> None:
    limiter = RateLimiter(tpm=1000, window=30, slack=0)
    await limiter.aacquire(900)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.aacquire(500), timeout=0.05)
    assert limiter.reserve(50).delay == 0


class Interrupted(Exception):
    pass


def test_an_interrupted_wait_gives_the_slot_back() -> None:
    """Ctrl-C in ``chatgate chat`` while the limiter waits: the twin of a cancelled task."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    limiter = RateLimiter(rpm=1, window=30, slack=0)
    limiter.acquire()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        with pytest.raises(Interrupted):
            limiter.acquire()  # would wait 30 s
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert limiter.reserve().delay == pytest.approx(30, abs=0.5)  # not 60: one request counts


async def test_a_waiting_task_moves_up_when_the_one_before_it_used_less() -> None:
    """Booked on an estimate (4,096 tokens for a request without ``max_tokens``), a request
    that settles for less lets the ones waiting behind it go: they are booked again, in order.
    Before, the second waited the whole window although the first had used 100 tokens."""
    limiter = RateLimiter(tpm=1000, window=30, slack=0)
    first = await limiter.aacquire(900)
    second = asyncio.ensure_future(limiter.aacquire(500))
    third = asyncio.ensure_future(limiter.aacquire(50))
    await asyncio.sleep(0.01)
    assert not second.done() and not third.done()  # 900 + 500 > 1000: a window away
    limiter.settle(first, 100)  # 100 + 500 + 50 fit now
    moved, behind = await asyncio.wait_for(asyncio.gather(second, third), timeout=10)
    assert moved.at - first.at < 1 and behind.at >= moved.at  # first come, first served still
    assert limiter.state().tokens.remaining == 1000 - 650


async def test_a_waiting_task_moves_up_when_the_one_before_it_is_given_back() -> None:
    limiter = RateLimiter(tpm=1000, window=30, slack=0)
    await limiter.aacquire(900)
    big = asyncio.ensure_future(limiter.aacquire(500))
    small = asyncio.ensure_future(limiter.aacquire(50))  # behind big: waits a window too
    await asyncio.sleep(0.01)
    assert not small.done()
    big.cancel()
    permit = await asyncio.wait_for(small, timeout=10)  # 900 + 50 fit: it went at once
    assert permit.delay == pytest.approx(30, abs=1)  # not a window later, as it was booked
    with pytest.raises(asyncio.CancelledError):
        await big


def test_a_waiting_thread_moves_up_when_the_one_before_it_used_less() -> None:
    limiter = RateLimiter(tpm=1000, window=30, slack=0)
    first = limiter.acquire(900)
    done: list[object] = []
    waiter = threading.Thread(target=lambda: done.append(limiter.acquire(500)), daemon=True)
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive()  # waiting a window
    limiter.settle(first, 100)
    waiter.join(10)
    assert not waiter.is_alive() and len(done) == 1


def test_a_slot_taken_with_reserve_keeps_its_place() -> None:
    """reserve() leaves the waiting to its caller: its slot cannot move, and the requests
    booked after it do not overtake it."""
    clock = Clock()
    limiter = RateLimiter(tpm=1000, window=60, slack=0, clock=clock)
    first = limiter.reserve(900)
    fixed = limiter.reserve(500)
    assert fixed.delay == pytest.approx(60)
    limiter.settle(first, 100)
    assert fixed.at == pytest.approx(clock.now + 60)  # its caller sleeps on the old delay
    assert limiter.reserve(50).at >= fixed.at


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 6),
    events=st.lists(
        st.tuples(
            st.integers(0, 5_000_000).map(lambda us: us / 1e6),
            st.integers(0, 12),
            st.one_of(st.none(), st.integers(0, 40)),  # settle the request booked that far back
            st.booleans(),  # give that one back instead (when it has not gone yet)
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_moving_waiters_up_keeps_every_window_within_the_limit(
    limit: int, events: list[tuple[float, int, int | None, bool]]
) -> None:
    """Property: with requests settling for less and given back while others wait (their slots
    booked again), any window still holds at most ``limit`` of each budget at the final costs,
    slots stay in booking order, none is before its request was made, and a waiter whose slot
    moved was woken."""
    clock = Clock()
    window = 10.0
    limiter = RateLimiter(rpm=limit, tpm=limit * 5, window=window, slack=0, clock=clock)
    booked: list[tuple[float, Permit]] = []  # (asked at, permit)
    gone: set[int] = set()
    given_back: set[int] = set()
    woken: list[int] = []
    for gap, tokens, back, cancel in events:
        clock.now += gap
        for _, permit in booked:  # a waiter whose slot has come sends its request
            if permit.at <= clock.now and permit.seq not in gone | given_back:
                gone.add(permit.seq)
                limiter._done_waiting(permit)
        seq = len(booked) + 1
        permit = limiter._book(tokens, lambda seq=seq: woken.append(seq))  # type: ignore[misc]
        booked.append((clock.now, permit))
        if back is None or back >= len(booked):
            continue
        target = booked[-1 - back][1]
        if cancel and target.seq not in gone | given_back:
            limiter.cancel(target)
            given_back.add(target.seq)
        elif target.seq not in given_back:
            limiter.settle(target, target.tokens // 2)
    kept = [(asked, p) for asked, p in booked if p.seq not in given_back]
    slots = [p.at for _, p in kept]
    assert slots == sorted(slots)
    assert all(p.at >= asked - 1e-9 for asked, p in kept)
    for at in slots:
        inside = [p for _, p in kept if at - window + 1e-9 < p.at <= at]  # float noise
        assert len(inside) <= limit
        assert sum(p.tokens for p in inside) <= limit * 5
    for asked, p in kept:
        if p.at < asked + p.delay - 1e-9:  # moved up: its waiter heard of it
            assert p.seq in woken


def test_a_waiter_whose_event_loop_is_gone_does_not_fail_the_settlement() -> None:
    """A task that waited in ``aacquire`` on a loop closed since (a thread's ``asyncio.run``
    cut short) cannot be woken: the settlement that moves it up, in another thread, must not
    raise for it."""
    limiter = RateLimiter(tpm=1000, window=30, slack=0)
    first = limiter.reserve(900)
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(limiter.aacquire(500))
    loop.run_until_complete(asyncio.sleep(0.01))  # it books and waits
    assert not waiting.done()
    loop.close()  # the task is left pending, its wake-up with nowhere to go
    limiter.settle(first, 100)  # moves it up: no RuntimeError
    assert limiter.reserve(10).delay >= 0
