"""The compiled admission and settlement of a key's checks (chatgate/ratelimit/program.py).

What they decide is held to an exact model by test_memory_property.py; these pin what the
compiling itself promises: the source comes from the checks' shape alone, one per shape.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.ratelimit import Check, MemoryLimiter
from chatgate.ratelimit import program as prog
from chatgate.ratelimit.base import Reservation, decide


def test_scopes_and_limits_never_enter_the_source() -> None:
    """A scope is caller-influenced text (an account or key id): it is a closure's value,
    so text that would mean something to Python is only a bucket's name."""
    scope = "x')\nimport os; os._exit(3) #"
    checks = (Check.rpm(scope, 2), Check.tpm(scope, 100), Check.concurrent(scope, 5))
    limiter = MemoryLimiter(clock=lambda: 1_796_000_000.0)

    async def three() -> list[bool]:
        return [(await limiter.acquire(checks, 10)).allowed for _ in range(3)]

    assert asyncio.run(three()) == [True, True, False]  # the rpm of 2, in that scope's bucket
    assert len(limiter) == 3


def test_one_compiled_source_per_shape() -> None:
    """Keys on the same plan share one compiled factory; another plan's shape gets its own."""
    shape = (("requests", True, True), ("tokens", True, True), ("quota", True, True))
    before = prog._factory.cache_info()
    for key in ("key:a", "key:b", "key:c"):
        checks = (Check.rpm(key, 5), Check.tpm(key, 50), Check.monthly_quota(key, 9, "2026-12"))
        prog.compile_checks(checks)
    after = prog._factory.cache_info()
    assert after.misses - before.misses <= 1  # the first may be new to this process
    assert after.hits - before.hits >= 2
    assert prog._factory(shape) is prog._factory(shape)


def test_twelve_checks_and_no_checks_compile() -> None:
    """Any number of checks, of any kinds in any order (a key's and its account's)."""
    now = 1_796_000_000.0
    kinds = (Check.rpm, Check.rpd, Check.tpm, Check.concurrent)
    checks = tuple(make(f"s{i}", 3) for i in range(3) for make in kinds)
    admit, settle, _ = prog.compile_checks(checks)
    state: dict[str, prog.Entry] = {}
    decision = admit(state, now, 2, "lease-1", now + 60)
    assert decision is not None and decision.allowed
    assert decision.requests is not None and decision.requests.remaining == 2
    assert decision.tokens is not None and decision.tokens.remaining == 1
    assert len(state) == 12
    assert settle(state, "lease-1", -2, lambda: now) == 0  # the reserved tokens given back
    assert admit(state, now, 4, "lease-2", now + 60) is None  # 4 tokens > a tpm of 3
    empty_admit, empty_settle, _ = prog.compile_checks(())
    allowed = empty_admit(state, now, 0, "lease-3", now)
    assert allowed is not None and allowed.requests is None and allowed.tokens is None
    assert empty_settle(state, "lease-3", 5, lambda: now) == 0


_MAKERS = {"rpm": Check.rpm, "rpd": Check.rpd, "tpm": Check.tpm, "conc": Check.concurrent}


@st.composite
def _levels_of_checks(draw: st.DrawFn) -> tuple[tuple[Check, ...], list[float], int]:
    """Checks of any kinds and limits (zero ones too, a scope named twice), each bucket's
    level before a request, and the request's token cost."""
    checks = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from([*_MAKERS, "quota"]))
        scope = draw(st.sampled_from(["key:a", "acct:x"]))
        limit = draw(st.integers(0, 500))
        if kind == "quota":
            checks.append(Check.monthly_quota(scope, limit, "2026-12"))
        else:
            checks.append(_MAKERS[kind](scope, limit))
    level = st.one_of(st.integers(0, 600).map(float), st.floats(0, 600, allow_nan=False))
    levels = [draw(level) for _ in checks]
    return tuple(checks), levels, draw(st.integers(0, 400))


@settings(max_examples=300, deadline=None)
@given(_levels_of_checks())
def test_granted_from_the_scripts_reply_is_what_decide_makes(
    drawn: tuple[tuple[Check, ...], list[float], int],
) -> None:
    """The Redis limiter's allowed decision comes from the compiled ``granted``, reading the
    levels as the script writes them (text, %.17g); it must equal the shared rule's."""
    checks, levels, cost = drawn
    granted = prog.compile_checks(checks).granted
    reply = [b"1", b"0", b"0", *(b"%.17g" % level for level in levels)]
    reservation = Reservation("lease-1", checks, cost)
    costs = [cost if check.charges_tokens else 1 for check in checks]
    expected = decide(checks, levels, costs, None, 0.0, reservation)
    assert granted(reply, cost, reservation) == expected
