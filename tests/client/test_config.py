"""Key and base URL resolution: argument > CHATGATE_* > OPENAI_* > default."""

from __future__ import annotations

import traceback

import httpx
import openai
import pytest

from chatgate.client import DEFAULT_BASE_URL, MissingAPIKeyError, OpenAI, resolve_config

KEY = "sk-cg-abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.mark.parametrize(
    ("arg", "env", "expected", "source"),
    [
        ("sk-arg", {"CHATGATE_API_KEY": "sk-cg", "OPENAI_API_KEY": "sk-oa"}, "sk-arg", "argument"),
        (
            None,
            {"CHATGATE_API_KEY": "sk-cg", "OPENAI_API_KEY": "sk-oa"},
            "sk-cg",
            "CHATGATE_API_KEY",
        ),
        (None, {"OPENAI_API_KEY": "sk-oa"}, "sk-oa", "OPENAI_API_KEY"),
        (None, {"CHATGATE_API_KEY": "  ", "OPENAI_API_KEY": "sk-oa"}, "sk-oa", "OPENAI_API_KEY"),
        ("", {"CHATGATE_API_KEY": "sk-cg"}, "sk-cg", "CHATGATE_API_KEY"),
    ],
)
def test_key_order(arg: str | None, env: dict[str, str], expected: str, source: str) -> None:
    config = resolve_config(arg, environ=env)
    assert (config.api_key, config.key_source) == (expected, source)


@pytest.mark.parametrize(
    ("arg", "env", "expected"),
    [
        ("http://a:1/v1", {"CHATGATE_BASE_URL": "http://b:2/v1"}, "http://a:1/v1"),
        (
            None,
            {"CHATGATE_BASE_URL": "http://b:2/v1", "OPENAI_BASE_URL": "http://c/v1"},
            "http://b:2/v1",
        ),
        (None, {"OPENAI_BASE_URL": "https://api.openai.com/v1/"}, "https://api.openai.com/v1"),
        (None, {}, DEFAULT_BASE_URL),
        (None, {"CHATGATE_BASE_URL": "http://gw:8000"}, "http://gw:8000/v1"),
        (None, {"CHATGATE_BASE_URL": "http://gw:8000/"}, "http://gw:8000/v1"),
        (None, {"CHATGATE_BASE_URL": "http://gw/custom"}, "http://gw/custom"),
    ],
)
def test_base_url_order(arg: str | None, env: dict[str, str], expected: str) -> None:
    assert resolve_config("k", arg, environ={**env}).base_url == expected


def test_a_chatgate_key_is_never_sent_to_another_providers_url() -> None:
    """OPENAI_BASE_URL is often set for another provider: a key from CHATGATE_API_KEY goes to
    CHATGATE_BASE_URL or the default, never there (it went there before); an OpenAI-style
    setup, both values in OPENAI_*, still works unchanged."""
    other = {"OPENAI_BASE_URL": "https://api.other.example/v1"}
    config = resolve_config(environ={"CHATGATE_API_KEY": KEY, **other})
    assert config.base_url == DEFAULT_BASE_URL
    both = {"CHATGATE_API_KEY": KEY, "CHATGATE_BASE_URL": "http://gw:8000/v1", **other}
    assert resolve_config(environ=both).base_url == "http://gw:8000/v1"
    openai_style = resolve_config(environ={"OPENAI_API_KEY": KEY, **other})
    assert openai_style.base_url == "https://api.other.example/v1"
    # A chatgate key passed in code is the same key (it went to the other provider before),
    # whatever the URL's own source; a key of another format passed in code still pairs with
    # OPENAI_BASE_URL.
    in_code = resolve_config(KEY, environ={"CHATGATE_API_KEY": KEY, **other})
    assert in_code.base_url == DEFAULT_BASE_URL
    assert resolve_config(KEY, environ=other).base_url == DEFAULT_BASE_URL
    assert resolve_config(KEY, "http://gw/v1", environ=other).base_url == "http://gw/v1"
    assert resolve_config("sk-other", environ=other).base_url == "https://api.other.example/v1"


def test_no_key_is_a_clear_error_without_secrets() -> None:
    env = {"CHATGATE_BASE_URL": "http://gw/v1", "SOME_TOKEN": KEY}
    with pytest.raises(MissingAPIKeyError) as info:
        resolve_config(environ=env)
    assert isinstance(info.value, openai.OpenAIError)
    message = str(info.value)
    assert "CHATGATE_API_KEY" in message and "OPENAI_API_KEY" in message
    assert KEY not in message


def test_key_never_in_repr() -> None:
    config = resolve_config(KEY, environ={})
    assert KEY not in repr(config) and KEY[6:] not in str(config)
    assert "**********" in repr(config)


def test_factory_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("CHATGATE_API_KEY", KEY)
    monkeypatch.setenv("CHATGATE_BASE_URL", "http://gw.example:8000")
    client = OpenAI()
    assert client.api_key == KEY
    assert str(client.base_url) == "http://gw.example:8000/v1/"
    monkeypatch.delenv("CHATGATE_API_KEY")
    with pytest.raises(MissingAPIKeyError):
        OpenAI()


def test_a_key_read_from_a_file_loses_its_newline() -> None:
    assert resolve_config(KEY + "\n", environ={}).api_key == KEY
    with pytest.raises(MissingAPIKeyError):
        resolve_config(" \n", environ={})


@pytest.mark.parametrize(
    "bad",
    [
        KEY + "\u2026",
        f"\u201c{KEY}\u201d",
        KEY[:12] + "\n" + KEY[12:],
        KEY[:12] + "\x1b" + KEY[12:],
    ],
    ids=["ellipsis", "curly-quotes", "line-break", "escape"],
)
@pytest.mark.parametrize("source", ["argument", "CHATGATE_API_KEY"])
def test_a_key_no_header_can_carry_is_a_clear_error_before_any_request(
    bad: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CHATGATE_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    if source != "argument":
        monkeypatch.setenv(source, bad)
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    with pytest.raises(openai.OpenAIError) as info:
        client = OpenAI(
            api_key=bad if source == "argument" else None,
            base_url="http://gw.example/v1",
            transport=httpx.MockTransport(answer),
        )
        client.models.list()
    assert sent == []
    message = str(info.value)
    assert ("api_key=" if source == "argument" else source) in message
    assert "HTTP header" in message
    shown = "".join(traceback.format_exception(info.value))
    assert KEY[6:] not in shown and KEY[12:] not in shown


@pytest.mark.parametrize(
    "bad", ["localhost:8000", "127.0.0.1:8000/v1", "htp://gw.example/v1", "http://", "/v1"]
)
@pytest.mark.parametrize("source", ["argument", "CHATGATE_BASE_URL", "OPENAI_BASE_URL"])
def test_a_base_url_no_request_can_go_to_is_a_clear_error_at_once(bad: str, source: str) -> None:
    env = {} if source == "argument" else {source: bad}
    # OPENAI_BASE_URL is read for a key from OPENAI_API_KEY only (a chatgate key in code or in
    # CHATGATE_API_KEY never goes there).
    key = KEY if source != "OPENAI_BASE_URL" else None
    env.update({} if key else {"OPENAI_API_KEY": KEY})
    with pytest.raises(openai.OpenAIError) as info:
        resolve_config(key, bad if source == "argument" else None, environ=env)
    message = str(info.value)
    assert repr(bad.rstrip("/")) in message and "http://" in message
    assert source == "argument" or source in message
    assert KEY not in message


def test_a_base_url_with_credentials_is_not_repeated_in_the_error() -> None:
    with pytest.raises(openai.OpenAIError) as info:
        resolve_config(KEY, "admin:hunter2@gw.example:8000/v1", environ={})
    assert "hunter2" not in str(info.value) and "http://" in str(info.value)


def test_the_factory_refuses_a_bad_base_url_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATGATE_BASE_URL", "localhost:8000")
    with pytest.raises(openai.OpenAIError, match="CHATGATE_BASE_URL"):
        OpenAI(api_key=KEY)  # nothing sent yet: no retries, no "Connection error." later


def test_an_http_client_of_ones_own_is_a_clear_error() -> None:
    """It was Python's "got multiple values for keyword argument 'http_client'"."""
    from chatgate.client import AsyncOpenAI

    for factory, client in ((OpenAI, httpx.Client()), (AsyncOpenAI, httpx.AsyncClient())):
        with pytest.raises(TypeError, match="transport="):
            factory(api_key="sk-test", http_client=client)
