"""Settings, read once from ``CHATGATE_*`` environment variables and an optional TOML file.

Resolution order for every value: explicit argument > environment > ``DEFAULT_*`` constant.
Nothing else in the package reads the environment; everything takes a ``Settings``.
Secrets are wrapped in :class:`Secret` so they never show up in a ``repr`` or a log line.

Every value is checked once, here: its type as it is read (:func:`_convert`), then its range or
choices, declared on its field (a :class:`Rule` in the field's metadata, see :func:`_checked`).
A bad value stops any command with one line naming the variable and the TOML key, before the
first start makes its admin account and shows its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import SplitResult, urlsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
# Twice the largest legitimate answer: 2,048 embeddings of 3,072 dimensions, ~125 MB of JSON.
DEFAULT_UPSTREAM_MAX_ANSWER_BYTES = 256 * 1024 * 1024
DEFAULT_KEY_CACHE_TTL = 60.0
LEASE_TTL_MIN = 3.0
DEFAULT_INVALIDATION_POLL = 0.25  # seconds; without Redis (see effective_invalidation_poll)
DEFAULT_INVALIDATION_POLL_REDIS = 1.0  # seconds; with Redis pub/sub waking the servers
DEFAULT_ROTATION_GRACE = 24 * 3600
DEFAULT_UPSTREAM_CONNECT_TIMEOUT = 5.0
DEFAULT_UPSTREAM_TIMEOUT = 600.0
DEFAULT_LOCAL_MODEL_NAME = "chatgate-mini"
DEFAULT_DB_CONNECT_TIMEOUT = 10.0  # seconds; asyncpg's own is 60
DEFAULT_DB_COMMAND_TIMEOUT = 30.0
MAX_RETENTION_DAYS = 36500  # a hundred years: the cutoff stays a date the databases hold
ContextTrim = Literal["drop_oldest", "error"]
CONTEXT_TRIMS: tuple[ContextTrim, ...] = ("drop_oldest", "error")  # chatgate.sessions.trim
LOCAL_EMBEDDINGS = ("auto", "minilm", "gguf", "off")  # chatgate.backends.local_embed
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Secret:
    """A string that never prints. ``str()`` and ``repr()`` give ``'**********'``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the wrapped value; call only where the secret is really used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def derive_key(secret: str, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` derived from the server secret (HMAC-SHA256)."""
    return hmac.new(secret.encode(), b"chatgate/" + purpose.encode(), hashlib.sha256).digest()


class Rule(Protocol):
    """The values a setting may take beyond its type: a field's ``metadata["rule"]``."""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value``, as the end of "<setting> must be ...", or None."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """A number from ``low`` to ``high`` (either may be open), and more than ``above``."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    unit: str = ""

    def problem(self, value: Any) -> str | None:
        """See :meth:`Rule.problem`."""
        if (
            (self.low is None or value >= self.low)
            and (self.high is None or value <= self.high)
            and (self.above is None or value > self.above)
        ):
            return None
        unit = f" {self.unit}" if self.unit else ""
        if self.above is not None:
            wanted = f"more than {_number(self.above)}{unit}"
        elif self.low is not None and self.high is not None:
            wanted = f"from {_number(self.low)} to {_number(self.high)}{unit}"
        elif self.low is not None:
            wanted = f"at least {_number(self.low)}{unit}"
        else:
            wanted = f"at most {_number(self.high or 0)}{unit}"
        return f"{wanted}, not {_number(value)}"


@dataclass(frozen=True, slots=True)
class OneOf:
    """One of a few names."""

    choices: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        """See :meth:`Rule.problem`."""
        if value in self.choices:
            return None
        return f"one of {', '.join(self.choices)}, not {str(value)[:40]!r}"


def split_url(value: str) -> SplitResult | None:
    """``value`` split as a URL, or ``None`` when it does not parse: a port that is not a
    number from 0 to 65535, a broken ``[IPv6]`` host (``urlsplit`` finds the port only when
    asked for it)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError:
        return None
    return parts


@dataclass(frozen=True, slots=True)
class UrlOf:
    """A URL of one of ``schemes``. A wrong one is not repeated: it may hold a password."""

    schemes: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        """See :meth:`Rule.problem`."""
        parts = split_url(value)
        if parts is not None and parts.scheme in self.schemes:
            return None
        *first, last = [f"{scheme}://" for scheme in self.schemes]
        return f"a {', '.join(first)} or {last} URL (with a numeric port, if any)"


@dataclass(frozen=True, slots=True)
class Given:
    """A text that is not empty (nor spaces alone): ``what`` it must be instead. An empty
    value read as no value at all (``CHATGATE_HOST=${HOST}`` with HOST unset): all
    interfaces for the host, the current folder for the data directory."""

    what: str

    def problem(self, value: Any) -> str | None:
        """See :meth:`Rule.problem`."""
        return None if str(value).strip() else f"{self.what}, not empty"


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A database URL that parses, its port a number (the scheme is checked where the engine
    is made). A wrong one is not repeated: it may hold a password. Python's own message was
    "invalid literal for int() with base 10: 'notaport'", naming no setting."""

    def problem(self, value: Any) -> str | None:
        """See :meth:`Rule.problem`."""
        if not value or split_url(value) is not None:  # "": SQLite in the data directory
            return None
        return "a URL whose port is a number from 0 to 65535 (postgresql://user@host:5432/db)"


def _rule(rule: Rule) -> dict[str, Rule]:
    return {"rule": rule}


def _range(
    low: float | None = None,
    high: float | None = None,
    *,
    above: float | None = None,
    unit: str = "",
) -> dict[str, Rule]:
    return _rule(Bounds(low, high, above, unit))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One public model name and where it is served (a deployment)."""

    name: str
    backend: str = "openai_compat"
    base_url: str = ""
    upstream_model: str = ""
    api_key_env: str | None = None
    context_window: int = 8192
    options: Mapping[str, Any] = field(default_factory=dict)

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """What that many prompt and completion tokens cost at the model's prices, in US
        dollars (0 when unpriced): a usage record's cost, and what a budget holds.

        ``cached_tokens`` of the prompt's are priced at ``cached_input_price_per_mtok`` when
        the model has one (OpenAI bills a prompt's cached part at a discount), else as input.
        """
        prices = self.options  # validated numbers (chatgate.backends.deployment)
        per_input: float = prices.get("input_price_per_mtok", 0.0)
        per_output: float = prices.get("output_price_per_mtok", 0.0)
        cost = prompt_tokens * per_input + completion_tokens * per_output
        if cached_tokens:
            per_cached: float = prices.get("cached_input_price_per_mtok", per_input)
            cost -= cached_tokens * (per_input - per_cached)
        return cost / 1e6


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server, the CLI and the tests need to know, read once.

    A field's ``metadata["rule"]`` (a :class:`Rule`) is what :meth:`from_env` accepts for it;
    every number has one.
    """

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    database_url: str = field(  # may hold a password
        default="", repr=False, metadata=_rule(DatabaseUrl())
    )
    redis_url: str | None = field(
        default=None, repr=False, metadata=_rule(UrlOf(("redis", "rediss", "unix")))
    )
    secret: Secret = field(default_factory=lambda: Secret(""))
    secret_previous: Secret | None = None  # accepted while stored key hashes are re-keyed
    # An explicit 0.0.0.0 or :: listens on every interface; empty is refused, not read as that.
    host: str = field(default=DEFAULT_HOST, metadata=_rule(Given("an address to listen on")))
    port: int = field(default=DEFAULT_PORT, metadata=_range(0, 65535))  # 0: any free port
    # Below a kilobyte no chat request fits: every call would be a 413.
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata=_range(1024, unit="bytes"))
    key_cache_ttl: float = field(default=DEFAULT_KEY_CACHE_TTL, metadata=_range(0, unit="seconds"))
    # None: see effective_invalidation_poll. Each poll is a query: 0 spun a core on it.
    invalidation_poll: float | None = field(default=None, metadata=_range(0.05, unit="seconds"))
    rotation_grace: int = field(  # at most what the API takes (dashboard.services.parse_grace)
        default=DEFAULT_ROTATION_GRACE, metadata=_range(0, 30 * 86400, unit="seconds")
    )
    upstream_connect_timeout: float = field(
        default=DEFAULT_UPSTREAM_CONNECT_TIMEOUT, metadata=_range(above=0, unit="seconds")
    )
    upstream_timeout: float = field(
        default=DEFAULT_UPSTREAM_TIMEOUT, metadata=_range(above=0, unit="seconds")
    )
    # A whole upstream answer (as read and once decoded; a stream is read as it is relayed).
    upstream_max_answer_bytes: int = field(
        default=DEFAULT_UPSTREAM_MAX_ANSWER_BYTES, metadata=_range(1024, unit="bytes")
    )
    # Per upstream base URL and process; 0: no cap.
    upstream_max_connections: int = field(default=0, metadata=_range(0))
    local_model: bool = True
    local_model_name: str = DEFAULT_LOCAL_MODEL_NAME
    local_model_path: str | None = None
    models: tuple[ModelConfig, ...] = ()
    log_level: str = field(default="INFO", metadata=_rule(OneOf(LOG_LEVELS)))
    ratelimit_fail_open: bool = True
    # Seconds a concurrency slot outlives a process that died holding it (renewed meanwhile,
    # every third of it: at least once a second).
    lease_ttl: float = field(default=60.0, metadata=_range(LEASE_TTL_MIN, unit="seconds"))
    redis_timeout: float = field(default=1.0, metadata=_range(above=0, unit="seconds"))
    redis_prefix: str = "chatgate:"
    # Each flush is a pass of the writer: 0 spun a core on it.
    usage_flush_interval: float = field(default=1.0, metadata=_range(0.05, unit="seconds"))
    usage_batch_size: int = field(default=2000, metadata=_range(1))
    # The prune deletes what is older than this: 0 or less deleted every record, hourly.
    usage_retention_days: int = field(
        default=90, metadata=_range(1, MAX_RETENTION_DAYS, unit="days")
    )
    signup_open: bool = True
    default_plan: str = field(default="free", metadata=_rule(Given("a plan's name")))
    session_max_age: int = field(default=7 * 86400, metadata=_range(60, unit="seconds"))
    cookie_secure: bool | None = None
    trust_forwarded_for: bool = False
    context_trim: str = field(default="drop_oldest", metadata=_rule(OneOf(CONTEXT_TRIMS)))
    default_max_tokens: int = field(default=4096, metadata=_range(1))
    # 0 keeps every conversation (chatgate.api.conversations).
    session_retention_days: int = field(
        default=30, metadata=_range(0, MAX_RETENTION_DAYS, unit="days")
    )
    local_threads: int = field(default=0, metadata=_range(0))  # 0: see local.default_threads
    local_queue_size: int = field(default=8, metadata=_range(0))
    # Tokens; the chat template alone takes tens of them.
    local_context: int = field(default=4096, metadata=_range(256))
    local_preload: bool = True
    local_embeddings: str = field(default="auto", metadata=_rule(OneOf(LOCAL_EMBEDDINGS)))
    usage_enabled: bool = True
    # On SIGTERM, requests in flight get twice this long to finish (aiohttp waits for them
    # twice); then those left are cancelled, and recorded with what they used.
    shutdown_timeout: float = field(default=10.0, metadata=_range(0, unit="seconds"))
    # PostgreSQL connections per process: the request path uses none in steady state (keys
    # are cached, usage is written in batches), so a small pool serves a busy process; the
    # dashboard, the management API, sessions and the feed share it. (SQLAlchemy reads a
    # pool of 0 as no limit, and a negative overflow as none: neither is what was meant.)
    db_pool_size: int = field(default=5, metadata=_range(1))
    db_max_overflow: int = field(default=10, metadata=_range(0))
    # Seconds to open a PostgreSQL connection: a server that takes the connection and never
    # answers held every command a minute (asyncpg's own timeout) before an empty error.
    db_connect_timeout: float = field(
        default=DEFAULT_DB_CONNECT_TIMEOUT, metadata=_range(above=0, unit="seconds")
    )
    # Seconds a PostgreSQL statement of the server may take (asyncpg's command timeout; not
    # for migrations): a database that takes connections but stops answering held a request
    # for as long as it kept silent.
    db_command_timeout: float = field(
        default=DEFAULT_DB_COMMAND_TIMEOUT, metadata=_range(above=0, unit="seconds")
    )
    upstream_keys: Mapping[str, Secret] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) and a config file.

        The config file is ``CHATGATE_CONFIG`` or ``./chatgate.toml`` when present;
        it may hold ``[server]`` values and ``[[models]]`` tables. A value of the wrong type,
        out of its range or not among its choices is a ``ValueError`` naming the setting.
        """
        env = os.environ if environ is None else environ
        config_path = env.get("CHATGATE_CONFIG") or (
            "chatgate.toml" if Path("chatgate.toml").is_file() else ""
        )
        file_cfg: dict[str, Any] = {}
        if config_path:
            try:
                fh = open(config_path, "rb")  # noqa: SIM115 - closed below
            except OSError as exc:  # QA: "[Errno 2] No such file or directory", no setting named
                raise ValueError(
                    f"CHATGATE_CONFIG: cannot read {config_path}: {exc.strerror or exc}"
                ) from None
            with fh:
                try:
                    file_cfg = tomllib.load(fh)
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{config_path}: not valid TOML: {exc}") from None
        for name, value in file_cfg.items():  # forgetting [server] dropped every setting
            if name in ("server", "models"):
                continue
            if isinstance(value, dict) or (
                isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
            ):
                what = f"has a table [{name[:64]}] chatgate does not read"
            else:
                what = f"has `{name[:64]}` outside any table (a setting goes under [server])"
            raise ValueError(f"{config_path} {what}: it reads [server] and [[models]] only")
        server = file_cfg.get("server", {})
        tables = file_cfg.get("models", [])
        if not isinstance(server, dict):
            raise ValueError(f"{config_path}: `server` must be a [server] table")
        if not isinstance(tables, list) or not all(isinstance(m, dict) for m in tables):
            raise ValueError(f"{config_path}: each model must be a [[models]] table")

        read: set[str] = set()

        def pick(name: str, default: Any, kind: type | None = None) -> Any:
            """The environment's value, else [server]'s, else ``default``, as the default's
            type (``kind`` where the default is None, and then "" is None too)."""
            read.add(name)
            value = env.get("CHATGATE_" + name.upper())
            if value is None:
                value = server.get(name, default)
            if value is default or (default is None and value == ""):
                return default
            return _convert(value, kind or type(default), _label(name))

        models = tuple(_model_from_table(m) for m in tables)
        key_envs = {m.api_key_env for m in models if m.api_key_env}
        for name in sorted(key_envs):
            value = env.get(name) or ""
            if not (value.isascii() and value.isprintable()):  # refused at start, not per call
                raise ValueError(
                    f"{name} (an upstream key) has a character no HTTP header can carry: a "
                    "line break, a control character or a non-ASCII one"
                )
        previous = pick("secret_previous", "")
        data_dir: str = pick("data_dir", DEFAULT_DATA_DIR)
        empty = Given("a folder").problem(data_dir)  # Path("") is the current folder, not ./data
        if empty is not None:
            raise ValueError(f"{_label('data_dir')} must be {empty}")
        settings = cls(
            data_dir=Path(data_dir),
            database_url=pick("database_url", ""),
            redis_url=pick("redis_url", None, str),
            secret=Secret(pick("secret", "")),
            secret_previous=Secret(previous) if previous else None,
            host=pick("host", DEFAULT_HOST),
            port=pick("port", DEFAULT_PORT),
            max_body_bytes=pick("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
            key_cache_ttl=pick("key_cache_ttl", DEFAULT_KEY_CACHE_TTL),
            invalidation_poll=pick("invalidation_poll", None, float),
            rotation_grace=pick("rotation_grace", DEFAULT_ROTATION_GRACE),
            upstream_connect_timeout=pick(
                "upstream_connect_timeout", DEFAULT_UPSTREAM_CONNECT_TIMEOUT
            ),
            upstream_timeout=pick("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT),
            upstream_max_answer_bytes=pick(
                "upstream_max_answer_bytes", DEFAULT_UPSTREAM_MAX_ANSWER_BYTES
            ),
            upstream_max_connections=pick("upstream_max_connections", 0),
            local_model=pick("local_model", True),
            local_model_name=pick("local_model_name", DEFAULT_LOCAL_MODEL_NAME),
            local_model_path=pick("local_model_path", None, str),
            models=models,
            log_level=pick("log_level", "INFO").strip().upper(),
            ratelimit_fail_open=pick("ratelimit_fail_open", True),
            lease_ttl=pick("lease_ttl", 60.0),
            redis_timeout=pick("redis_timeout", 1.0),
            redis_prefix=pick("redis_prefix", "chatgate:"),
            usage_flush_interval=pick("usage_flush_interval", 1.0),
            usage_batch_size=pick("usage_batch_size", 2000),
            usage_retention_days=pick("usage_retention_days", 90),
            signup_open=pick("signup_open", True),
            default_plan=pick("default_plan", "free"),
            session_max_age=pick("session_max_age", 7 * 86400),
            cookie_secure=pick("cookie_secure", None, bool),
            trust_forwarded_for=pick("trust_forwarded_for", False),
            context_trim=pick("context_trim", "drop_oldest").strip().lower(),
            default_max_tokens=pick("default_max_tokens", 4096),
            session_retention_days=pick("session_retention_days", 30),
            local_threads=pick("local_threads", 0),
            local_queue_size=pick("local_queue_size", 8),
            local_context=pick("local_context", 4096),
            local_preload=pick("local_preload", True),
            local_embeddings=pick("local_embeddings", "auto").strip().lower(),
            usage_enabled=pick("usage_enabled", True),
            shutdown_timeout=pick("shutdown_timeout", 10.0),
            db_pool_size=pick("db_pool_size", 5),
            db_max_overflow=pick("db_max_overflow", 10),
            db_connect_timeout=pick("db_connect_timeout", DEFAULT_DB_CONNECT_TIMEOUT),
            db_command_timeout=pick("db_command_timeout", DEFAULT_DB_COMMAND_TIMEOUT),
            upstream_keys={k: Secret(env[k]) for k in key_envs if env.get(k)},
        )
        unknown = sorted(set(server) - read)
        if unknown:  # a misspelt key did nothing at all: `retention_days = 0`
            raise ValueError(
                f"{config_path}: [server] has no setting `{unknown[0][:64]}` (see README.md's "
                "settings; each is also CHATGATE_<NAME> in the environment)"
            )
        return _checked(replace(settings, **overrides) if overrides else settings)

    @property
    def effective_database_url(self) -> str:
        """The SQLAlchemy async URL: the configured one, or SQLite under ``data_dir``."""
        return async_database_url(self.database_url or f"sqlite:///{self.data_dir / 'chatgate.db'}")

    @property
    def effective_invalidation_poll(self) -> float:
        """Seconds between polls of the invalidation feed: as configured, else 0.25 without
        Redis and 1.0 with it.

        Without Redis the poll is the only way a change travels between processes, so it is
        what keeps a revocation under a second everywhere. With Redis, every change also wakes
        every server at once over pub/sub (:mod:`chatgate.notify`: milliseconds), and the poll
        is the backstop for a lost message or a Redis outage; once a second keeps that backstop
        at about the promised second while each process polls the database a quarter as often.
        """
        if self.invalidation_poll is not None:
            return self.invalidation_poll
        return DEFAULT_INVALIDATION_POLL_REDIS if self.redis_url else DEFAULT_INVALIDATION_POLL

    def make_data_dir(self) -> None:
        """``data_dir``, made if missing, for its owner only (0700): it holds the secret, the
        SQLite database (conversations, hashes) and the usage spool. One already there keeps
        the mode its operator gave it."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def stored_secret(self) -> Secret | None:
        """The server secret, configured or in ``data_dir``; None when there is neither (it
        is not generated here: see :meth:`resolved_secret`)."""
        if self.secret:
            return self.secret
        path = self.data_dir / "secret"
        if path.is_file():
            return Secret(path.read_text().strip())
        return None

    def resolved_secret(self) -> Secret:
        """The server secret: configured, or generated once and kept in ``data_dir`` (0600)."""
        found = self.stored_secret()
        if found is not None:
            return found
        path = self.data_dir / "secret"
        self.make_data_dir()
        value = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        return Secret(value)


def async_database_url(url: str) -> str:
    """Map plain ``sqlite://`` and ``postgresql://`` URLs to their async drivers."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _label(name: str) -> str:
    """How a message names the setting ``name``: both of the places it can be set."""
    return f"CHATGATE_{name.upper()} (or {name} in [server])"


def _convert(value: Any, kind: type, where: str) -> Any:
    """``value`` (a string from the environment, or any TOML value) as a ``kind`` (bool, int,
    float or str), else a ``ValueError`` saying "<where> must be ...". Where a string is
    wanted the wrong value is not repeated (a secret may be one); elsewhere its first 40
    characters are. A whole number may be written 3 or 3.0, not 3.5."""
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string (in quotes), not {_toml_kind(value)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str | int) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(
            f"{where} must be true or false (1 or 0, yes or no, on or off), not {_shown(value)}"
        )
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            number = int(value)  # exactly, where it is one: 2**63 is not a float's 2**63
    if isinstance(number, float) and not (
        math.isfinite(number) and (kind is float or number.is_integer())
    ):
        number = None  # infinite, not a number, or not whole where a whole one is wanted
    if number is None:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{where} must be {what}, not {_shown(value)}")
    return int(number) if kind is int else float(number)


def _shown(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else _toml_kind(value)


def _toml_kind(value: Any) -> str:
    """What TOML calls ``value``'s type, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time" if value is not None else "nothing"


def _number(value: float) -> str:
    """A number as one writes it: 20971520 and 0.25, not 2.09715e+07; huge ones cut short."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = str(value) if isinstance(value, int) else f"{value:g}"
    return text if len(text) <= 20 else text[:20] + "..."


def _checked(settings: Settings) -> Settings:
    """``settings``, if each field's value keeps its rule; else a ``ValueError`` naming the
    first that does not."""
    for item in fields(settings):
        rule: Rule | None = item.metadata.get("rule")
        value = getattr(settings, item.name)
        if rule is None or value is None:  # None: the setting is off, or left to its default
            continue
        problem = rule.problem(value)
        if problem is not None:
            raise ValueError(f"{_label(item.name)} must be {problem}")
    return settings


def _model_from_table(table: Mapping[str, Any]) -> ModelConfig:
    known = {"name", "backend", "base_url", "upstream_model", "api_key_env", "context_window"}
    if not table.get("name"):
        raise ValueError("every [[models]] table needs a `name` (the model's public name)")
    name: str = _convert(table["name"], str, "a [[models]] table's `name`")
    where = f"[[models]] {name!r}:"

    def get(key: str, default: Any, kind: type) -> Any:
        value = table.get(key)
        return default if value is None else _convert(value, kind, f"{where} `{key}`")

    context_window: int = get("context_window", 8192, int)
    problem = Bounds(1).problem(context_window)
    if problem is not None:
        raise ValueError(f"{where} `context_window` must be {problem}")
    return ModelConfig(
        name=name,
        backend=get("backend", "openai_compat", str),
        base_url=get("base_url", "", str).rstrip("/"),
        upstream_model=get("upstream_model", "", str) or name,
        api_key_env=get("api_key_env", None, str),
        context_window=context_window,
        options={k: v for k, v in table.items() if k not in known},
    )
