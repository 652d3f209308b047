"""The article's journey in a real headless Chromium (Debian's, driven by Playwright) against
the real server: sign up -> log in -> create a key -> copy it -> call the API with it -> see
it in the usage page -> rotate -> revoke -> 401. Screenshots of every page go to
``tests/artifacts/dashboard/`` (desktop and phone width) for review."""

from __future__ import annotations

import functools
import io
import re
import secrets
import time
from collections.abc import Iterator
from csv import DictReader
from typing import Any

import pytest
import requests

from chatgate.keys import format as keyfmt
from tests.dashboard.conftest import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    chat,
    make_user,
)
from tests.dashboard.test_security import wait_status
from tests.helpers import ROOT, Gateway, Upstream

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    expect,
)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
CHARTS = (
    "[...document.querySelectorAll('.card.chart')]"
    ".map(c => [c.scrollWidth, c.clientWidth, c.scrollLeft])"
)
# Usage recording is wired into create_app by the usage work (issue: usage records); until
# then the usage page has nothing to show and that one check is an expected failure.
USAGE_WIRED = "UsageRecorder" in (ROOT / "chatgate" / "app.py").read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def new_context(browser: Browser, gw: Gateway, **kw: Any) -> BrowserContext:
    context = browser.new_context(base_url=gw.url, viewport=DESKTOP, **kw)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    context.set_default_timeout(15_000)
    return context


def _console_errors(into: list[str], message: ConsoleMessage) -> None:
    if message.type == "error":
        into.append(message.text)


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def submit(page: Page, button: str) -> None:
    with page.expect_navigation():
        page.get_by_role("button", name=button, exact=True).click()


def log_in(page: Page, email: str) -> None:
    page.goto("/dashboard/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    submit(page, "Log in")


def test_sign_up_to_revoked_key(browser: Browser, dash: Gateway) -> None:
    context = new_context(browser, dash)
    page = context.new_page()
    email = f"journey-{secrets.token_hex(4)}@example.com"

    # Any page sends a visitor to the login page.
    page.goto("/dashboard/keys")
    assert "/dashboard/login" in page.url
    shot(page, "01-login")

    # Sign up.
    page.get_by_role("link", name="Sign up").click()
    shot(page, "02-signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=False).first.fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    submit(page, "Sign up")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_text("Welcome to chatgate")).to_be_visible()
    shot(page, "03-overview")

    # Log out and back in.
    submit(page, "Log out")
    assert page.url.endswith("/dashboard/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill("not the password")
    submit(page, "Log in")
    expect(page.get_by_text("Incorrect email or password.")).to_be_visible()
    shot(page, "04-login-failed")
    page.get_by_label("Password").fill(PASSWORD)
    submit(page, "Log in")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    # Create a key for gpt-test only, expiring in 30 days.
    page.get_by_role("link", name="API keys").click()
    expect(page.get_by_text("No keys yet")).to_be_visible()
    shot(page, "05-keys-empty")
    page.get_by_label("Name").fill("journey key")
    page.get_by_label("Expires").select_option("30d")
    page.get_by_label("gpt-test").check()
    submit(page, "Create key")
    expect(page.get_by_text("It will not be shown again")).to_be_visible()
    key = page.locator("#new-key").input_value()
    assert keyfmt.is_well_formed(key)
    # Copy it with the button, as a person would, and read the clipboard back.
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == key
    shot(page, "06-key-created")

    # Call the API with it (the article's snippet), and once with a model it may not use.
    resp = chat(dash, key, content="Tell me a joke")
    assert resp.status_code == 200, resp.text
    assert "Tell me a joke" in resp.json()["choices"][0]["message"]["content"]
    assert chat(dash, key, model="gpt-other").status_code == 404  # as an unknown model

    # The key list shows it, never the key itself.
    page.get_by_role("link", name="Done, back to keys").click()
    row = page.locator("tr", has_text="journey key")
    expect(row).to_contain_text(keyfmt.hint(key))
    expect(row).to_contain_text("gpt-test")
    expect(row).to_contain_text("active")
    expect(row).not_to_contain_text("never")  # used a moment ago
    assert key not in page.content()
    shot(page, "07-keys")

    # The request shows in the usage page (the recorder writes in batches, ~1 s).
    page.get_by_role("link", name="Usage").click()
    seen = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if page.locator("#total-requests").inner_text().strip() not in ("0", ""):
            seen = True
            break
        time.sleep(0.5)
        page.reload()
    shot(page, "08-usage")
    assert seen or not USAGE_WIRED, "the request never showed in the usage page"
    if seen:
        expect(page.locator("#usage-table")).to_contain_text("journey key")
        expect(page.locator("#chart-requests svg")).to_be_visible()
        csv = context.request.get("/dashboard/usage.csv?period=7d")
        assert csv.ok and "journey key" in csv.text()
        # Each row's mean latency, rolled up with its tokens (blank only where untimed).
        table = list(DictReader(io.StringIO(csv.text())))
        journey = [row for row in table if "journey key" in row["key"]]
        assert journey and all(float(row["avg_latency_ms"]) > 0 for row in journey), table

    # Rotate with no grace: the old secret stops, the new one works.
    page.get_by_role("link", name="API keys").click()
    page.locator("tr", has_text="journey key").get_by_role("link", name="Rotate").click()
    shot(page, "09-rotate")
    page.get_by_label("The old secret keeps working").select_option("0")
    submit(page, "Rotate key")
    expect(page.get_by_role("heading", name="Key rotated")).to_be_visible()
    new_key = page.locator("#new-key").input_value()
    assert keyfmt.is_well_formed(new_key) and new_key != key
    shot(page, "10-rotated")
    assert wait_status(dash, key, 401) == 401
    assert chat(dash, new_key).status_code == 200

    # Revoke, with a confirmation page: then the key gets 401.
    page.get_by_role("link", name="Done, back to keys").click()
    page.locator("tr", has_text="journey key").get_by_role("link", name="Revoke").click()
    expect(page.get_by_text("This cannot be undone")).to_be_visible()
    shot(page, "11-revoke-confirm")
    submit(page, "Revoke key")
    expect(page.get_by_text("revoked. It stops working")).to_be_visible()
    expect(page.locator("tr", has_text="journey key")).to_contain_text("revoked")
    shot(page, "12-revoked")
    assert wait_status(dash, new_key, 401) == 401
    error = chat(dash, new_key).json()["error"]
    assert error["code"] == "invalid_api_key" and new_key not in str(error)
    context.close()
    if not seen:  # everything else passed; only the usage step waits for the recorder
        pytest.xfail("usage recording is not wired into create_app yet")


def test_playground_streams_with_your_key(browser: Browser, dash: Gateway) -> None:
    user = make_user(dash)
    key = user.new_key(name="playground")["key"]
    context = new_context(browser, dash)
    context.add_cookies(
        [{"name": c.name, "value": c.value or "", "url": dash.url} for c in user.http.cookies]
    )
    page = context.new_page()
    page.goto("/dashboard/playground")
    page.get_by_label("Content writing").check()
    expect(page.locator("#pg-system")).to_have_value(re.compile("content writer"))
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").dispatch_event("change")
    page.locator("#pg-input").fill("Write a haiku about gateways")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".msg.assistant").first
    expect(answer).to_contain_text("haiku", timeout=20_000)
    expect(answer.locator(".meta")).to_contain_text("tokens")
    # A second turn keeps the history (client side).
    page.locator("#pg-input").fill("And another")
    page.locator("#pg-input").press("Enter")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator(".msg.assistant").nth(1)).to_contain_text("another", timeout=20_000)
    shot(page, "13-playground")
    # A wrong key shows the API's error in the chat.
    page.get_by_label("API key").fill("sk-cg-wrong")
    page.locator("#pg-input").fill("hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".msg.error")).to_contain_text("Incorrect API key")
    context.close()


def test_logging_out_forgets_the_playground_key(browser: Browser, dash: Gateway) -> None:
    """A key handed to the playground (or pasted into it) is kept in the tab's
    ``sessionStorage``; it outlived the session, and the next person to log in in that tab,
    as another account, found the first one's key filled in. A page for a visitor who is not
    logged in (the log-in page after logging out, or after a session ended) forgets it."""
    first = make_user(dash, login=False)
    second = make_user(dash, login=False)
    context = new_context(browser, dash)
    page = context.new_page()
    log_in(page, first.email)
    page.goto("/dashboard/keys")
    page.get_by_label("Name").fill("handed over")
    submit(page, "Create key")
    key = page.locator("#new-key").input_value()
    with page.expect_navigation():
        page.get_by_role("link", name="Try it in the playground").click()
    expect(page.get_by_label("API key")).to_have_value(key)
    submit(page, "Log out")
    page.get_by_label("Email").fill(second.email)
    page.get_by_label("Password").fill(PASSWORD)
    submit(page, "Log in")
    page.goto("/dashboard/playground")
    expect(page.get_by_label("API key")).to_have_value("")
    assert key not in page.evaluate("JSON.stringify(sessionStorage)")
    context.close()


def test_pages_at_phone_width_and_admin(browser: Browser, dash: Gateway) -> None:
    """Every page renders at phone width with no horizontal scroll; admin pages work."""
    admin = make_user(dash, admin=True)
    user = make_user(dash)
    user.new_key(name="phone key", models=["gpt-test"])
    pages = [
        ("/dashboard/", "overview"),
        ("/dashboard/keys", "keys"),
        ("/dashboard/usage", "usage"),
        ("/dashboard/playground", "playground"),
        ("/dashboard/plan", "plan"),
        ("/dashboard/account", "account"),
    ]
    admin_pages = [
        ("/dashboard/admin/accounts", "admin-accounts"),
        ("/dashboard/admin/plans", "admin-plans"),
        ("/dashboard/admin/models", "admin-models"),
        ("/dashboard/admin/usage", "admin-usage"),
    ]
    for who, todo in ((user, pages), (admin, pages[:1] + admin_pages)):
        for viewport, suffix in ((PHONE, "phone"), (DESKTOP, "desktop")):
            context = new_context(browser, dash)
            context.add_cookies(
                [
                    {"name": c.name, "value": c.value or "", "url": dash.url}
                    for c in who.http.cookies
                ]
            )
            page = context.new_page()
            page.set_viewport_size(viewport)
            console: list[str] = []
            page.on("console", functools.partial(_console_errors, console))
            for path, name in todo:
                resp = page.goto(path)
                assert resp is not None and resp.status == 200, path
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"] + 1, f"{path} scrolls sideways at {width}px"
                # A chart fits its card on a desktop; on a phone it scrolls, showing today.
                for wide, shown, at in page.evaluate(CHARTS):
                    if viewport is DESKTOP:
                        assert wide <= shown, f"{path}: a chart is cut off ({wide} > {shown})"
                    else:
                        assert wide <= shown or at >= wide - shown - 1, f"{path}: {at}"
                if who is user or "admin" in name:
                    shot(page, f"{name}-{suffix}")
            assert console == [], console  # e.g. a missing favicon
            context.close()

    # Admin actions through the pages: find the user, move them to pro, edit a plan.
    context = new_context(browser, dash)
    context.add_cookies(
        [{"name": c.name, "value": c.value or "", "url": dash.url} for c in admin.http.cookies]
    )
    page = context.new_page()
    page.goto("/dashboard/admin/accounts")
    page.get_by_placeholder("Search by email").fill(user.email)
    page.get_by_role("button", name="Search").click()
    row = page.locator("tr", has_text=user.email)
    expect(row).to_have_count(1)
    row.get_by_label(f"Plan of {user.email}").select_option("pro")
    with page.expect_navigation():
        row.get_by_role("button", name="Set").click()
    expect(page.get_by_text(f"{user.email} is now on the pro plan.")).to_be_visible()
    assert user.api("GET", "/api/me").json()["plan"] == "pro"
    shot(page, "admin-accounts-changed")
    page.goto("/dashboard/admin/plans")
    page.locator("form[action='/dashboard/admin/plans/pro'] input[name='rpm']").fill("601")
    submit(page, "Save pro")
    expect(page.get_by_text("Plan pro saved.")).to_be_visible()
    plans = {p["name"]: p for p in user.api("GET", "/api/plans").json()["data"]}
    assert plans["pro"]["rpm"] == 601
    page.goto("/dashboard/admin/models")
    expect(page.get_by_role("heading", name="gpt-test")).to_be_visible()
    context.close()


def test_essential_flows_without_javascript(browser: Browser, dash: Gateway) -> None:
    user = make_user(dash, login=False)
    context = new_context(browser, dash, java_script_enabled=False)
    page = context.new_page()
    log_in(page, user.email)
    page.goto("/dashboard/keys")
    page.get_by_label("Name").fill("no-js key")
    submit(page, "Create key")
    key = page.locator("#new-key").input_value()
    assert keyfmt.is_well_formed(key)
    expect(page.get_by_role("button", name="Copy")).to_be_hidden()  # shown by the script only
    assert requests.get(
        dash.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).ok
    page.goto("/dashboard/keys")
    page.locator("tr", has_text="no-js key").get_by_role("link", name="Revoke").click()
    submit(page, "Revoke key")
    expect(page.locator("tr", has_text="no-js key")).to_contain_text("revoked")
    shot(page, "nojs-keys")
    context.close()


def test_playground_keeps_a_server_side_conversation(
    browser: Browser, dash: Gateway, upstream: Upstream
) -> None:
    user = make_user(dash)
    key = user.new_key(name="conversation")["key"]
    context = new_context(browser, dash)
    context.add_cookies(
        [{"name": c.name, "value": c.value or "", "url": dash.url} for c in user.http.cookies]
    )
    page = context.new_page()
    page.goto("/dashboard/playground")
    page.get_by_label("Support bot").check()
    page.get_by_label("API key").fill(key)
    page.get_by_label("Keep the conversation on the server").check()
    page.locator("#pg-input").fill("My order 1234 is late")
    page.locator("#pg-input").press("Enter")
    expect(page.locator(".msg.assistant").first.locator(".meta")).to_be_visible(timeout=20_000)
    page.locator("#pg-input").fill("Any news?")
    page.locator("#pg-input").press("Enter")
    expect(page.locator(".msg.assistant").nth(1).locator(".meta")).to_be_visible(timeout=20_000)
    expect(page.locator(".msg.error")).to_have_count(0)
    expect(page.locator("#pg-status")).not_to_contain_text("unavailable")
    # The second call carried only the new turn; the server prepended the stored history.
    sent = [r for r in upstream.received() if r.get("model") == "fake-model"][-1]
    texts = [m.get("content") for m in sent["messages"]]
    assert texts[0].startswith("You are a friendly customer-support agent")
    assert "My order 1234 is late" in texts and texts[-1] == "Any news?"
    shot(page, "14-playground-conversation")
    context.close()


def test_a_key_form_waits_for_its_answer_after_a_click(browser: Browser, dash: Gateway) -> None:
    """QA (a slow connection): a second click on "Create key" while the first answer was on
    its way aborted it and sent the form again, which was refused as sent before: the key
    the first one made was shown to nobody. The form's buttons now wait for the answer."""
    user = make_user(dash, login=False)
    context = new_context(browser, dash)
    page = context.new_page()
    log_in(page, user.email)
    page.goto("/dashboard/keys")
    page.get_by_label("Name").fill("clicked once")
    # The answer never comes here: the form is kept from leaving, as a slow one would be.
    page.evaluate(
        "document.querySelector('input[name=once]').form"
        ".addEventListener('submit', (event) => event.preventDefault())"
    )
    button = page.get_by_role("button", name="Create key", exact=True)
    button.click()
    expect(button).to_be_disabled()
    page.reload()  # a page loaded anew: the button is back
    expect(page.get_by_role("button", name="Create key", exact=True)).to_be_enabled()
    context.close()
