"""Where the client finds its API key and base URL.

Resolution order for each value, first found wins (blank strings count as unset, and
surrounding whitespace, such as the newline of a key read from a file, is dropped):

1. the argument given in code;
2. ``CHATGATE_API_KEY`` / ``CHATGATE_BASE_URL``;
3. ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (so code written for OpenAI runs unchanged);
4. :data:`DEFAULT_BASE_URL` (there is no default key: :class:`MissingAPIKeyError`).

Except that a chatgate key is never sent to ``OPENAI_BASE_URL``: that variable is often set for
another provider, and the key would go there. A key found in ``CHATGATE_API_KEY``, or passed
as the argument in chatgate's format (``sk-cg-...``: ``api_key=os.environ["CHATGATE_API_KEY"]``
is the same key), goes to ``CHATGATE_BASE_URL``, the argument, or the default. Only a key in
``OPENAI_API_KEY`` pairs with ``OPENAI_BASE_URL``: that is OpenAI's own convention, both values
set together.

This is the only place in :mod:`chatgate.client` that reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import openai

__all__ = [
    "API_KEY_VARS",
    "BASE_URL_VARS",
    "DEFAULT_BASE_URL",
    "ClientConfig",
    "MissingAPIKeyError",
    "resolve_config",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
API_KEY_VARS = ("CHATGATE_API_KEY", "OPENAI_API_KEY")
BASE_URL_VARS = ("CHATGATE_BASE_URL", "OPENAI_BASE_URL")
KEY_PREFIX = "sk-cg-"
"""How a chatgate key begins (``chatgate.keys.format.PREFIX``; the client imports nothing of
the server)."""


class MissingAPIKeyError(openai.OpenAIError):
    """No API key was passed and none is set in the environment.

    A subclass of ``openai.OpenAIError``, the root of the ``openai`` package's own tree, so
    ``except openai.OpenAIError`` keeps catching everything the client raises.
    """

    def __init__(self) -> None:
        super().__init__(
            "No API key found: pass api_key=... or set the CHATGATE_API_KEY environment "
            "variable (OPENAI_API_KEY is read too), e.g. export CHATGATE_API_KEY=sk-cg-..."
        )


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The resolved key and base URL. The key never shows in ``repr`` (nor in tracebacks)."""

    api_key: str = field(repr=False)
    base_url: str
    key_source: str  # "argument" or the variable it came from; safe to print

    def __repr__(self) -> str:
        return (
            f"ClientConfig(api_key='**********', base_url={self.base_url!r}, "
            f"key_source={self.key_source!r})"
        )


def resolve_config(
    api_key: str | None = None,
    base_url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Resolve the key and base URL: argument > ``CHATGATE_*`` > ``OPENAI_*`` > default.

    A base URL without a path (``http://host:8000``) gets ``/v1`` appended. Raises
    :class:`MissingAPIKeyError` when no key is found anywhere, and ``openai.OpenAIError``
    when the key has a character no HTTP header can carry or the base URL is not an
    ``http(s)://host...`` URL (both before any request is made).
    """
    env = os.environ if environ is None else environ
    key, source = _first(api_key, env, API_KEY_VARS)
    if not key:
        raise MissingAPIKeyError()
    if not (key.isascii() and key.isprintable()):
        raise _unsendable_key(key, source)
    # A chatgate key goes to CHATGATE_BASE_URL (or the default), never to OPENAI_BASE_URL:
    # that one may name another provider, which would be sent the key (see above).
    chatgate_key = source == API_KEY_VARS[0] or (
        source == "argument" and key.startswith(KEY_PREFIX)
    )
    url_vars = BASE_URL_VARS[:1] if chatgate_key else BASE_URL_VARS
    url, url_source = _first(base_url, env, url_vars)
    url = normalize_base_url(url or DEFAULT_BASE_URL)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _unusable_url(url, url_source)
    return ClientConfig(key, url, source)


def normalize_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme and parts.netloc and parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1"))
    return url


def _unsendable_key(key: str, source: str) -> openai.OpenAIError:
    """The error for a key no HTTP header can carry; it names where the key came from and
    where the bad character is, never the key (httpx's own error would show it whole)."""
    where = "passed as api_key=" if source == "argument" else f"in {source}"
    position = next(i for i, c in enumerate(key) if not (c.isascii() and c.isprintable()))
    return openai.OpenAIError(
        f"The API key {where} has a character that cannot be sent in an HTTP header at "
        f"position {position + 1} of {len(key)} (a line break, a control character, or a "
        "non-ASCII one such as a curly quote or an ellipsis): copy the key again"
    )


def _unusable_url(url: str, source: str) -> openai.OpenAIError:
    """The error for a base URL no request can go to (``localhost:8000``, ``htp://...``)."""
    shown = "" if "@" in url else f" {url!r}"  # user:password@host: not repeated
    where = "" if source == "argument" else f" (from {source})"
    return openai.OpenAIError(
        f"The base URL{shown}{where} is not an http:// or https:// URL with a host; "
        f"it should look like {DEFAULT_BASE_URL}"
    )


def _first(value: str | None, env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    value = (value or "").strip()
    if value:
        return value, "argument"
    for name in names:
        found = env.get(name, "").strip()
        if found:
            return found, name
    return "", ""
