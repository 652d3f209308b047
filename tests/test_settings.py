"""Settings: every value is checked once, as it is read, and a bad one is named."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import pytest

from chatgate.settings import Settings


def _read(tmp_path: Path, env: dict[str, str] | None = None, toml: str = "") -> Settings:
    config = tmp_path / "chatgate.toml"
    config.write_text(toml)
    return Settings.from_env({"CHATGATE_CONFIG": str(config), **(env or {})})


def test_every_number_has_a_range_and_the_defaults_keep_them(tmp_path: Path) -> None:
    """A number without one took 0 or -1 as it came: a retention of 0 deleted every usage
    record, a poll of 0 spun a core, a negative overflow recursed in SQLAlchemy."""
    hints = typing.get_type_hints(Settings)
    kinds = (int, float, int | None, float | None)
    numbers = [f.name for f in fields(Settings) if hints[f.name] in kinds]
    assert "usage_retention_days" in numbers and "db_max_overflow" in numbers
    assert [n for n in numbers if "rule" not in Settings.__dataclass_fields__[n].metadata] == []
    _read(tmp_path)  # the defaults pass


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("usage_retention_days", "0", "from 1 to 36500 days, not 0"),
        ("usage_retention_days", "-1", "from 1 to 36500 days"),
        ("session_retention_days", "-1", "from 0 to 36500 days"),
        ("invalidation_poll", "0", "at least 0.05 seconds, not 0"),
        ("invalidation_poll", "-1", "at least 0.05"),
        ("invalidation_poll", "abc", "a number, not 'abc'"),
        ("usage_flush_interval", "0", "at least 0.05"),
        ("redis_timeout", "0", "more than 0 seconds"),
        ("redis_timeout", "-1", "more than 0"),
        ("redis_timeout", "nan", "a number"),
        ("upstream_timeout", "inf", "a number"),
        ("db_pool_size", "-1", "at least 1"),
        ("db_pool_size", "0", "at least 1"),
        ("db_max_overflow", "-5", "at least 0, not -5"),
        ("db_connect_timeout", "0", "more than 0"),
        ("db_command_timeout", "-1", "more than 0"),
        ("upstream_max_connections", "-1", "at least 0"),
        ("upstream_max_answer_bytes", "1000", "at least 1024 bytes"),
        ("max_body_bytes", "0", "at least 1024 bytes"),
        ("port", "70000", "from 0 to 65535"),
        ("port", "80.5", "a whole number"),
        ("rotation_grace", str(31 * 86400), "from 0 to 2592000 seconds"),
        ("lease_ttl", "2", "at least 3 seconds"),
        ("context_trim", "bogus", "one of drop_oldest, error"),
        ("local_embeddings", "bert", "one of auto, minilm, gguf, off"),
        ("log_level", "loud", "one of DEBUG, INFO"),
        ("local_model", "maybe", "true or false"),
    ],
)
def test_a_value_out_of_its_range_is_named_in_both_places(
    tmp_path: Path, name: str, value: str, said: str
) -> None:
    variable = "CHATGATE_" + name.upper()
    with pytest.raises(ValueError) as raised:
        _read(tmp_path, {variable: value})
    assert str(raised.value).startswith(f"{variable} (or {name} in [server]) must be ")
    assert said in str(raised.value)
    try:  # the same from the file, as a TOML number where it is one
        float(value)
        written = value
    except ValueError:
        written = f'"{value}"'
    with pytest.raises(ValueError, match=f"^{variable} "):
        _read(tmp_path, toml=f"[server]\n{name} = {written}\n")


def test_the_edges_of_the_ranges_are_taken(tmp_path: Path) -> None:
    settings = _read(
        tmp_path,
        {
            "CHATGATE_USAGE_RETENTION_DAYS": "1",
            "CHATGATE_SESSION_RETENTION_DAYS": "0",  # keeps every conversation, as documented
            "CHATGATE_UPSTREAM_MAX_CONNECTIONS": "0",  # no cap
            "CHATGATE_PORT": "0",  # any free port
            "CHATGATE_DB_MAX_OVERFLOW": "0",
            "CHATGATE_MAX_BODY_BYTES": "1e6",
            "CHATGATE_CONTEXT_TRIM": " Error ",
            "CHATGATE_LOG_LEVEL": "warning",
            "CHATGATE_LOCAL_MODEL": "off",
        },
        toml="[server]\ndb_pool_size = 3.0\ninvalidation_poll = 0.05\ncookie_secure = true\n",
    )
    assert (settings.usage_retention_days, settings.session_retention_days) == (1, 0)
    assert (settings.port, settings.db_max_overflow, settings.max_body_bytes) == (0, 0, 10**6)
    assert settings.db_pool_size == 3 and type(settings.db_pool_size) is int
    assert (settings.context_trim, settings.log_level) == ("error", "WARNING")
    assert settings.invalidation_poll == 0.05 and settings.cookie_secure is True
    assert settings.local_model is False


@pytest.mark.parametrize(
    ("toml", "said", "unsaid"),
    [
        (
            "[server]\nsecret = 12345\n",
            "CHATGATE_SECRET (or secret in [server]) must be a string",
            "12345",
        ),
        ('[server]\nredis_url = ["redis://:pw@127.0.0.1:6379/14"]\n', "CHATGATE_REDIS_URL", "pw"),
        ("[server]\nhost = 5\n", "CHATGATE_HOST (or host in [server]) must be a string", ""),
        (
            "[server]\nport = true\n",
            "CHATGATE_PORT (or port in [server]) must be a whole number",
            "",
        ),
        (
            '[server]\nredis_url = "http://:hunter2@cache:6379"\n',
            "a redis://, rediss:// or unix:// URL",
            "hunter2",
        ),
        (
            '[[models]]\nname = "m"\ncontext_window = "big"\n',
            "[[models]] 'm': `context_window` must be a whole number, not 'big'",
            "",
        ),
        ('[[models]]\nname = "m"\ncontext_window = 0\n', "[[models]] 'm': `context_window`", ""),
        ('[[models]]\nname = "m"\napi_key_env = ["K"]\n', "[[models]] 'm': `api_key_env`", ""),
        ("[[models]]\nname = 5\n", "[[models]] table's `name` must be a string", ""),
    ],
)
def test_a_value_of_the_wrong_type_is_named_without_repeating_a_secret(
    tmp_path: Path, toml: str, said: str, unsaid: str
) -> None:
    """Each was a traceback: AttributeError ('int' object has no attribute 'encode'),
    TypeError, or Python's "invalid literal for int()" naming neither model nor key."""
    with pytest.raises(ValueError) as raised:
        _read(tmp_path, toml=toml)
    assert said in str(raised.value)
    assert not unsaid or unsaid not in str(raised.value)


def test_a_config_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"chatgate\.toml: not valid TOML: .*line 1"):
        _read(tmp_path, toml="not toml at all\n")


def test_a_server_key_chatgate_does_not_read_is_named(tmp_path: Path) -> None:
    """A misspelt key in [server] did nothing at all (``retention_days = 0`` kept 90 days
    while the operator thought otherwise): it stops the start, named."""
    with pytest.raises(ValueError, match="no setting `retention_days`"):
        _read(tmp_path, toml="[server]\nretention_days = 0\n")
    assert _read(tmp_path, toml="[server]\nusage_retention_days = 7\n").usage_retention_days == 7


@pytest.mark.parametrize("name", ["host", "default_plan", "data_dir"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_host_data_dir_or_default_plan_is_refused(
    tmp_path: Path, name: str, value: str
) -> None:
    """``CHATGATE_HOST=${HOST}`` with HOST unset listened on every interface (0.0.0.0 and ::,
    an empty host to getaddrinfo); an empty data dir was the current folder, not ./data; an
    empty default plan failed every sign-up (found by QA). As an empty log level is refused."""
    variable = "CHATGATE_" + name.upper()
    with pytest.raises(ValueError, match=f"^{variable} .*must be .*, not empty$"):
        _read(tmp_path, {variable: value})
    with pytest.raises(ValueError, match=f"^{variable} .*, not empty$"):
        _read(tmp_path, toml=f'[server]\n{name} = "{value}"\n')


def test_every_interface_is_still_one_explicit_address_away(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::"):
        assert _read(tmp_path, {"CHATGATE_HOST": host}).host == host


@pytest.mark.parametrize(
    ("toml", "said"),
    [
        ("port = 1\n", "has `port` outside any table (a setting goes under [server])"),
        ('secret = "x"\n[server]\nport = 1\n', "has `secret` outside any table"),
        ("[other]\nport = 1\n", "has a table [other] chatgate does not read"),
        ("[server]\n[serverr]\nport = 1\n", "has a table [serverr]"),
        ('[[model]]\nname = "m"\n', "has a table [model]"),
    ],
)
def test_a_key_or_table_outside_server_and_models_is_named(
    tmp_path: Path, toml: str, said: str
) -> None:
    """A top-level key (``port = 1`` without its [server] header) or another table was passed
    over: forgetting the header dropped every setting, without a word (found by QA)."""
    with pytest.raises(ValueError) as raised:
        _read(tmp_path, toml=toml)
    assert said in str(raised.value) and "[server] and [[models]] only" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_data_dir_is_read_from_server_as_the_readme_says(tmp_path: Path) -> None:
    """README lists CHATGATE_DATA_DIR among the settings of CHATGATE_* or [server]; the file's
    was refused ("[server] has no setting data_dir"). The environment wins, as for the rest."""
    toml = f'[server]\ndata_dir = "{tmp_path / "d"}"\n'
    assert _read(tmp_path, toml=toml).data_dir == tmp_path / "d"
    env = {"CHATGATE_DATA_DIR": str(tmp_path / "e")}
    assert _read(tmp_path, env, toml=toml).data_dir == tmp_path / "e"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:hunter2@host:notaport/x",
        "postgresql://user:hunter2@host:99999/x",
        "postgresql://user:hunter2@[::1:5432/x",
    ],
)
def test_a_database_url_that_does_not_parse_is_named_without_its_password(
    tmp_path: Path, url: str
) -> None:
    """Python's "invalid literal for int() with base 10: 'notaport'" was the whole message,
    naming no setting (found by QA)."""
    with pytest.raises(ValueError) as raised:
        _read(tmp_path, {"CHATGATE_DATABASE_URL": url})
    said = str(raised.value)
    assert said.startswith("CHATGATE_DATABASE_URL (or database_url in [server]) must be a URL")
    assert "hunter2" not in said and "notaport" not in said
    good = "postgresql://user:hunter2@host:5432/x"
    assert _read(tmp_path, {"CHATGATE_DATABASE_URL": good}).database_url == good
