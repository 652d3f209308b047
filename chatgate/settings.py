"""Settings, read once from ``CHATGATE_*`` environment variables and an optional TOML file.

Resolution order for every value: explicit argument > environment > ``DEFAULT_*`` constant.
Nothing else in the package reads the environment; everything takes a ``Settings``.
Secrets are wrapped in :class:`Secret` so they never show up in a ``repr`` or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = "./data"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_KEY_CACHE_TTL = 60.0
LEASE_TTL_MIN = 3.0
DEFAULT_INVALIDATION_POLL = 0.25  # seconds; without Redis (see effective_invalidation_poll)
DEFAULT_INVALIDATION_POLL_REDIS = 1.0  # seconds; with Redis pub/sub waking the servers
DEFAULT_ROTATION_GRACE = 24 * 3600
DEFAULT_UPSTREAM_CONNECT_TIMEOUT = 5.0
DEFAULT_UPSTREAM_TIMEOUT = 600.0
DEFAULT_LOCAL_MODEL_NAME = "chatgate-mini"


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

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What that many prompt and completion tokens cost at the model's prices, in US
        dollars (0 when unpriced): a usage record's cost, and what a budget holds."""
        prices = self.options  # validated numbers (chatgate.backends.deployment)
        per_input: float = prices.get("input_price_per_mtok", 0.0)
        per_output: float = prices.get("output_price_per_mtok", 0.0)
        return (prompt_tokens * per_input + completion_tokens * per_output) / 1e6


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server, the CLI and the tests need to know, read once."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    database_url: str = field(default="", repr=False)  # may hold a password
    redis_url: str | None = field(default=None, repr=False)
    secret: Secret = field(default_factory=lambda: Secret(""))
    secret_previous: Secret | None = None  # accepted while stored key hashes are re-keyed
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    key_cache_ttl: float = DEFAULT_KEY_CACHE_TTL
    invalidation_poll: float | None = None  # None: see effective_invalidation_poll
    rotation_grace: int = DEFAULT_ROTATION_GRACE
    upstream_connect_timeout: float = DEFAULT_UPSTREAM_CONNECT_TIMEOUT
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    upstream_max_connections: int = 0  # per upstream base URL and process; 0: no cap
    local_model: bool = True
    local_model_name: str = DEFAULT_LOCAL_MODEL_NAME
    local_model_path: str | None = None
    models: tuple[ModelConfig, ...] = ()
    log_level: str = "INFO"
    ratelimit_fail_open: bool = True
    # Seconds a concurrency slot outlives a process that died holding it (renewed meanwhile).
    lease_ttl: float = 60.0
    redis_timeout: float = 1.0
    redis_prefix: str = "chatgate:"
    usage_flush_interval: float = 1.0
    usage_batch_size: int = 2000
    usage_retention_days: int = 90
    signup_open: bool = True
    default_plan: str = "free"
    session_max_age: int = 7 * 86400
    cookie_secure: bool | None = None
    trust_forwarded_for: bool = False
    context_trim: str = "drop_oldest"
    default_max_tokens: int = 4096
    session_retention_days: int = 30
    local_threads: int = 0
    local_queue_size: int = 8
    local_context: int = 4096
    local_preload: bool = True
    local_embeddings: str = "auto"
    usage_enabled: bool = True
    # On SIGTERM, requests in flight get twice this long to finish (aiohttp waits for them
    # twice); then those left are cancelled, and recorded with what they used.
    shutdown_timeout: float = 10.0
    # PostgreSQL connections per process: the request path uses none in steady state (keys
    # are cached, usage is written in batches), so a small pool serves a busy process; the
    # dashboard, the management API, sessions and the feed share it.
    db_pool_size: int = 5
    db_max_overflow: int = 10
    upstream_keys: Mapping[str, Secret] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) and a config file.

        The config file is ``CHATGATE_CONFIG`` or ``./chatgate.toml`` when present;
        it may hold ``[server]`` values and ``[[models]]`` tables.
        """
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("CHATGATE_DATA_DIR", DEFAULT_DATA_DIR))
        config_path = env.get("CHATGATE_CONFIG") or (
            "chatgate.toml" if Path("chatgate.toml").is_file() else ""
        )
        file_cfg: dict[str, Any] = {}
        if config_path:
            with open(config_path, "rb") as fh:
                file_cfg = tomllib.load(fh)
        server = file_cfg.get("server", {})
        tables = file_cfg.get("models", [])
        if not isinstance(server, dict):
            raise ValueError(f"{config_path}: `server` must be a [server] table")
        if not isinstance(tables, list) or not all(isinstance(m, dict) for m in tables):
            raise ValueError(f"{config_path}: each model must be a [[models]] table")

        def pick(name: str, default: Any) -> Any:
            value = env.get("CHATGATE_" + name.upper())
            if value is None:
                value = server.get(name, default)
            if type(default) in (int, float) and value is not default:  # a number: or say which
                try:
                    return type(default)(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"CHATGATE_{name.upper()} (or {name} in [server]) must be "
                        f"{'a whole number' if type(default) is int else 'a number'}, "
                        f"not {str(value)[:40]!r}"
                    ) from None
            return value

        models = tuple(_model_from_table(m) for m in tables)
        key_envs = {m.api_key_env for m in models if m.api_key_env}
        for name in sorted(key_envs):
            value = env.get(name) or ""
            if not (value.isascii() and value.isprintable()):  # refused at start, not per call
                raise ValueError(
                    f"{name} (an upstream key) has a character no HTTP header can carry: a "
                    "line break, a control character or a non-ASCII one"
                )
        settings = cls(
            data_dir=data_dir,
            database_url=pick("database_url", ""),
            redis_url=pick("redis_url", None) or None,
            secret=Secret(pick("secret", "")),
            secret_previous=Secret(pick("secret_previous", ""))
            if pick("secret_previous", "")
            else None,
            host=pick("host", DEFAULT_HOST),
            port=int(pick("port", DEFAULT_PORT)),
            max_body_bytes=int(pick("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
            key_cache_ttl=float(pick("key_cache_ttl", DEFAULT_KEY_CACHE_TTL)),
            invalidation_poll=_optional_float(pick("invalidation_poll", None)),
            rotation_grace=int(pick("rotation_grace", DEFAULT_ROTATION_GRACE)),
            upstream_connect_timeout=float(
                pick("upstream_connect_timeout", DEFAULT_UPSTREAM_CONNECT_TIMEOUT)
            ),
            upstream_timeout=float(pick("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT)),
            upstream_max_connections=int(pick("upstream_max_connections", 0)),
            local_model=_truthy(pick("local_model", True)),
            local_model_name=pick("local_model_name", DEFAULT_LOCAL_MODEL_NAME),
            local_model_path=pick("local_model_path", None) or None,
            models=models,
            log_level=str(pick("log_level", "INFO")).upper(),
            ratelimit_fail_open=_truthy(pick("ratelimit_fail_open", True)),
            lease_ttl=float(pick("lease_ttl", 60.0)),
            redis_timeout=float(pick("redis_timeout", 1.0)),
            redis_prefix=str(pick("redis_prefix", "chatgate:")),
            usage_flush_interval=float(pick("usage_flush_interval", 1.0)),
            usage_batch_size=int(pick("usage_batch_size", 2000)),
            usage_retention_days=int(pick("usage_retention_days", 90)),
            signup_open=_truthy(pick("signup_open", True)),
            default_plan=str(pick("default_plan", "free")),
            session_max_age=int(pick("session_max_age", 7 * 86400)),
            cookie_secure=_optional_bool(pick("cookie_secure", None)),
            trust_forwarded_for=_truthy(pick("trust_forwarded_for", False)),
            context_trim=str(pick("context_trim", "drop_oldest")),
            default_max_tokens=int(pick("default_max_tokens", 4096)),
            session_retention_days=int(pick("session_retention_days", 30)),
            local_threads=int(pick("local_threads", 0)),
            local_queue_size=int(pick("local_queue_size", 8)),
            local_context=int(pick("local_context", 4096)),
            local_preload=_truthy(pick("local_preload", True)),
            local_embeddings=str(pick("local_embeddings", "auto")),
            usage_enabled=_truthy(pick("usage_enabled", True)),
            shutdown_timeout=float(pick("shutdown_timeout", 10.0)),
            db_pool_size=int(pick("db_pool_size", 5)),
            db_max_overflow=int(pick("db_max_overflow", 10)),
            upstream_keys={k: Secret(env[k]) for k in key_envs if env.get(k)},
        )
        if not settings.lease_ttl >= LEASE_TTL_MIN:  # renewed every third: once a second
            raise ValueError(
                f"CHATGATE_LEASE_TTL (or lease_ttl in [server]) must be at least "
                f"{LEASE_TTL_MIN:g} seconds, not {settings.lease_ttl:g}"
            )
        return replace(settings, **overrides) if overrides else settings

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

    def resolved_secret(self) -> Secret:
        """The server secret: configured, or generated once and kept in ``data_dir`` (0600)."""
        if self.secret:
            return self.secret
        path = self.data_dir / "secret"
        if path.is_file():
            return Secret(path.read_text().strip())
        self.data_dir.mkdir(parents=True, exist_ok=True)
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


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("0", "false", "no", "off", "")


def _optional_bool(value: object) -> bool | None:
    return None if value is None or value == "" else _truthy(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def _model_from_table(table: Mapping[str, Any]) -> ModelConfig:
    known = {"name", "backend", "base_url", "upstream_model", "api_key_env", "context_window"}
    if not table.get("name"):
        raise ValueError("every [[models]] table needs a `name` (the model's public name)")
    return ModelConfig(
        name=str(table["name"]),
        backend=str(table.get("backend", "openai_compat")),
        base_url=str(table.get("base_url", "")).rstrip("/"),
        upstream_model=str(table.get("upstream_model") or table["name"]),
        api_key_env=table.get("api_key_env"),
        context_window=int(table.get("context_window", 8192)),
        options={k: v for k, v in table.items() if k not in known},
    )
