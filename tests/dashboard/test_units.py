"""Small pieces of the dashboard in process: cookie flags over HTTPS, passwords, periods,
input parsing, charts, CSV safety."""

from __future__ import annotations

import secrets
import ssl
import time
from pathlib import Path

import aiohttp_session
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from chatgate import errors
from chatgate.dashboard import charts, services, usage_view
from chatgate.dashboard.auth import SessionStorage
from chatgate.dashboard.passwords import HASHER, hash_password, password_problem, verify_password
from chatgate.settings import Settings, derive_key
from chatgate.usage.tables import usd_text


async def _cookie(*, https: bool, force: bool | None = None) -> str:
    storage = SessionStorage(derive_key("s3cret", "test"), max_age=60, force_secure=force)
    request = make_mocked_request(
        "GET", "/dashboard/", sslcontext=ssl.create_default_context() if https else None
    )
    session = aiohttp_session.Session(None, data=None, new=True, max_age=60)
    session["account"] = "acct_1"
    response = web.Response()
    await storage.save_session(request, response, session)
    return response.cookies["chatgate_session"].OutputString()


async def test_cookie_is_secure_over_https_only() -> None:
    over_https = await _cookie(https=True)
    assert "Secure" in over_https and "HttpOnly" in over_https
    assert "SameSite=Lax" in over_https
    assert "Secure" not in await _cookie(https=False)
    assert "Secure" in await _cookie(https=False, force=True)  # behind a TLS proxy


async def test_argon2id_with_owasp_parameters() -> None:
    stored = await hash_password("a long enough password")
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert not HASHER.check_needs_rehash(stored)
    assert await verify_password(stored, "a long enough password")
    assert not await verify_password(stored, "a long enough passworD")
    assert not await verify_password(None, "anything at all")  # no account: same work, fails
    assert not await verify_password("not a hash", "anything at all")
    assert password_problem("short") is not None
    assert password_problem("x" * 300) is not None
    assert password_problem("just right!") is None


@pytest.mark.parametrize(
    ("password", "said"),
    [
        (" " * 12, "other than spaces"),
        ("password123", "common"),
        ("aaaaaaaaaaaa", "Repeats"),
        ("qwertyuiop12", "too easy to guess"),
        ("gina@example.com", "your email"),
        ("gina@example.com!", "your email"),
    ],
)
def test_a_password_easy_to_guess_is_refused_saying_why(password: str, said: str) -> None:
    """NIST 800-63B asks for more than a length: not a common password, not a repeat or a
    keyboard row, not the account's own details (each of these made an account)."""
    problem = password_problem(password, "gina@example.com")
    assert problem is not None and said in problem, problem
    assert password_problem("correct horse battery staple", "gina@example.com") is None


@pytest.mark.parametrize("length", [73, 100, 256])
def test_a_long_password_is_judged_not_refused_by_zxcvbn(length: int) -> None:
    """zxcvbn reads at most 72 characters (a ValueError beyond, which was a 500 at sign-up):
    a password manager's long password is strong, a long repeat still is not."""
    strong = (secrets.token_urlsafe(200) * 2)[:length]
    assert password_problem(strong, "gina@example.com") is None
    weak = password_problem("a" * length, "gina@example.com")
    assert weak is not None and "Repeats" in weak, weak
    # A repeated word cut anywhere (QA: judged by a stretch that began inside a word, zxcvbn
    # read it as random text and 'dragon' x 40 cut to 73 characters passed).
    for word in ("dragon", "password", "letmein"):
        for cut in range(length, length + len(word)):
            repeated = (word * 50)[: min(cut, 256)]
            assert password_problem(repeated) is not None, (word, cut)


def test_periods() -> None:
    now = 1_795_600_000.0  # 2026-11-25 (UTC)
    day = 86400
    p7 = usage_view.period_from({"period": "7d"}, now=now)
    assert p7.end - p7.start == 7 * day and p7.start % day == 0 and p7.end > now
    assert len(p7.labels) == 7 and p7.query == "period=7d"
    month = usage_view.period_from({"period": "month"}, now=now)
    assert month.first == "2026-11-01" and month.last == "2026-11-25"
    custom = usage_view.period_from({"from": "2026-10-01", "to": "2026-10-31"}, now=now)
    assert (custom.first, custom.last, len(custom.days)) == ("2026-10-01", "2026-10-31", 31)
    assert custom.query == "from=2026-10-01&to=2026-10-31"
    assert custom.note == "" and p7.note == ""
    assert usage_view.period_from({"period": "bogus"}, now=now).name == "30d"
    # A range that is not quite right is read as far as it can be, and the page says how.
    swapped = usage_view.period_from({"from": "2026-10-31", "to": "2026-10-01"}, now=now)
    assert (swapped.first, swapped.last) == ("2026-10-01", "2026-10-31")
    assert "wrong way round" in swapped.note
    huge = usage_view.period_from({"from": "1990-01-01", "to": "2026-10-01"}, now=now)
    assert len(huge.days) == usage_view.MAX_DAYS and huge.last == "2026-10-01"
    assert "at most 400 days" in huge.note
    future = usage_view.period_from({"from": "2026-11-01", "to": "9999-12-31"}, now=now)
    assert (future.first, future.last) == ("2026-11-01", "2026-11-25")
    assert "after today" in future.note
    ahead = usage_view.period_from({"from": "2027-01-01", "to": "2027-02-01"}, now=now)
    assert (ahead.first, ahead.last) == ("2026-11-25", "2026-11-25") and ahead.note
    for bad in ({"from": "garbage"}, {"from": "2026-10-01", "to": "2026-13-01"}, {"to": "x"}):
        fallback = usage_view.period_from(bad, now=now)
        assert fallback.name == "30d" and "not a range of dates" in fallback.note
        assert len(fallback.days) == 30 and fallback.last == "2026-11-25"
    long = usage_view.period_from({"from": "x" * 500}, now=now)
    assert len(long.note) < 120


def test_parsing() -> None:
    assert services.parse_expiry("") is None and services.parse_expiry("never") is None
    assert services.parse_expiry("30d", now=1000) == 1000 + 30 * 86400
    assert services.parse_expiry("0") is None  # 0 alone is "never"; "0d" expires at once
    for bad in ("tomorrow", "0d", "0s"):
        with pytest.raises(errors.InvalidRequest):
            services.parse_expiry(bad)
    assert services.parse_grace(None, 99) == 99
    assert services.parse_grace("0", 99) == 0
    assert services.parse_grace("24h", 99) == 86400
    assert services.parse_grace(3600, 99) == 3600
    for bad in ("-1", "40d", "soon"):
        with pytest.raises(errors.InvalidRequest):
            services.parse_grace(bad, 99)
    assert services.parse_limits({"rpm": "10", "tpm": "", "rpd": None, "concurrency": 3}) == {
        "rpm": 10,
        "tpm": None,
        "rpd": None,
        "concurrency": 3,
    }
    for bad in ({"rpm": "ten"}, {"rpm": "-3"}, {"nope": "1"}, {"rpm": True}):
        with pytest.raises(errors.InvalidRequest):
            services.parse_limits(bad)


def test_chart_is_self_contained_svg() -> None:
    svg = str(charts.stacked_days("Requests", ["11-24", "11-25"], {"a <b>": [1, 2], "c": [0, 3]}))
    assert svg.startswith("<svg")
    assert "<script" not in svg and "http://kozea" not in svg and "//kozea" not in svg
    assert "a <b>" not in svg and "a &lt;b&gt;" in svg  # labels are escaped
    many = charts.stacked_days("x", ["d"], {f"s{i}": [i] for i in range(20)})
    assert "other" in str(many)
    for empty in ({}, {"a": [0, 0]}):
        assert "No requests in this period" in charts.stacked_days("x", ["d1", "d2"], empty)
    small = charts.stacked_days("x", ["d1", "d2"], {"a": [0, 2]}, ranked=False)
    assert ">0.5<" not in small  # whole-number ticks for small counts


def test_csv_cells_cannot_be_formulas() -> None:
    assert usage_view._csv_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert usage_view._csv_safe("@sum") == "'@sum"
    assert usage_view._csv_safe("prod key") == "prod key"


def test_date_labels_are_utc() -> None:
    period = usage_view.Period(0, 2 * 86400, "custom")
    assert period.labels == ["01-01", "01-02"]
    assert time.strftime("%Y", time.gmtime(period.start)) == "1970"


SESSION_API = ("/api/usage", "/api/admin/backends")  # management routes of other modules


def test_only_the_routes_that_use_the_session_run_inside_it(tmp_path: Path) -> None:
    """Every dashboard page and management API route is wrapped in the session (a route left
    out would fail on its first cookie); the API's own routes are not, and the application
    has one middleware, so a ``/v1`` request never pays for the dashboard."""
    from chatgate import app as app_module
    from chatgate.dashboard import auth
    from chatgate.middleware import api_middleware

    settings = Settings.from_env({"CHATGATE_DATA_DIR": str(tmp_path), "CHATGATE_LOCAL_MODEL": "0"})
    app = app_module.create_app(settings)
    in_session = auth.with_session(api_middleware).__code__  # every wrapper's code
    assert list(app.middlewares) == [api_middleware]
    seen = {"dashboard": 0, "manage": 0, "v1": 0}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path == "/dashboard/static/{name}":  # files, served outside the session
            continue
        wrapped = getattr(route.handler, "__code__", None) is in_session
        if path.startswith("/dashboard"):
            seen["dashboard"] += 1
            assert wrapped, path
        elif route.handler.__module__ == "chatgate.api.manage" or path in SESSION_API:
            seen["manage"] += 1
            assert wrapped, path
        else:
            seen["v1"] += path.startswith("/v1/")
            assert not wrapped, path
    assert seen["dashboard"] > 20 and seen["manage"] > 10 and seen["v1"] > 10, seen


@pytest.mark.parametrize(
    ("nanos", "shown"),
    [
        (0, "$0.00"),
        (1, "$0.0001"),  # never shown as nothing
        (1_234_560, "$0.0013"),  # rounded up, as a spend
        (9_999_999, "$0.0100"),
        (10_000_000, "$0.01"),
        (10_000_001, "$0.02"),
        (123_456_789_000, "$123.46"),
        (1_234_567_000_000, "$1,234.57"),
    ],
)
def test_a_cost_in_a_usage_table(nanos: int, shown: str) -> None:
    assert usd_text(nanos) == shown
