"""The package surface: an honest ``__all__``, no server imports, real ``openai`` objects."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import httpx
import openai

import chatgate.client
from chatgate.client import AsyncOpenAI, AsyncTransport, OpenAI, RateLimiter, Transport

CLIENT_DIR = Path(chatgate.client.__file__).parent


def test_all_is_unique_and_every_name_resolves() -> None:
    names = chatgate.client.__all__
    assert len(set(names)) == len(names)
    for name in names:
        value = getattr(chatgate.client, name)
        module = getattr(value, "__module__", "chatgate.client._config")
        assert module.startswith("chatgate.client._"), (name, module)
    namespace: dict[str, object] = {}
    exec("from chatgate.client import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(names)


def test_all_matches_the_lazy_table_and_the_type_checking_imports() -> None:
    source = (CLIENT_DIR / "__init__.py").read_text()
    imported: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatgate.client."):
            module = node.module.rsplit(".", 1)[1]  # type: ignore[union-attr]
            imported.setdefault(module, set()).update(a.name for a in node.names)
    lazy = {module: set(names) for module, names in chatgate.client._HOME.items()}
    assert imported == lazy
    assert set(chatgate.client.__all__) == set().union(*lazy.values())
    # Each name is public in its own module too.
    for module, names in lazy.items():
        home = sys.modules.get(f"chatgate.client.{module}") or __import__(
            f"chatgate.client.{module}", fromlist=["__all__"]
        )
        assert names <= set(home.__all__), module


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        _ = chatgate.client.NoSuchThing
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


ISOLATION = r"""
import importlib.abc, sys

BLOCKED = ("aiohttp", "sqlalchemy", "alembic", "asyncpg", "aiosqlite", "redis", "msgspec",
           "orjson", "uvloop", "llama_cpp")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())

import chatgate.client
import chatgate.client.chat
assert "openai" not in sys.modules, "importing chatgate.client must not import openai yet"
from chatgate.client import AsyncOpenAI, OpenAI, RateLimiter, Transport
client = OpenAI(api_key="sk-cg-test", base_url="http://127.0.0.1:9/v1", rpm=10)
aclient = AsyncOpenAI(api_key="sk-cg-test", base_url="http://127.0.0.1:9/v1")
loaded = sorted(m for m in sys.modules if m == "chatgate" or m.startswith("chatgate."))
print("\n".join(loaded))
"""


def test_client_imports_nothing_of_the_server() -> None:
    """As installed with only the ``client`` extra: server libraries cannot be imported."""
    result = subprocess.run(
        [sys.executable, "-c", ISOLATION], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    allowed = {"chatgate", "chatgate.client"} | {
        f"chatgate.client.{p.stem}" for p in CLIENT_DIR.glob("*.py")
    }
    assert loaded <= allowed, loaded - allowed
    assert "chatgate.client._openai" in loaded


def test_factories_return_the_sdks_own_clients() -> None:
    client = OpenAI(api_key="sk-cg-test", base_url="http://127.0.0.1:9/v1", rpm=30)
    assert isinstance(client, openai.OpenAI)  # a subclass that changes only copy()
    assert client.max_retries == 0  # the transport retries; the SDK must not retry again
    assert str(client.base_url) == "http://127.0.0.1:9/v1/"
    http_client = client._client
    assert isinstance(http_client, httpx.Client)
    transport = http_client._transport
    assert isinstance(transport, Transport)
    assert isinstance(transport.limiter, RateLimiter)
    client.close()

    aclient = AsyncOpenAI(api_key="sk-cg-test", base_url="http://127.0.0.1:9/v1")
    assert isinstance(aclient, openai.AsyncOpenAI)
    assert aclient.max_retries == 0
    assert isinstance(aclient._client._transport, AsyncTransport)


def test_shared_limiter_and_no_limiter() -> None:
    limiter = RateLimiter(rpm=10)
    a = OpenAI(api_key="k", base_url="http://x/v1", limiter=limiter)
    b = AsyncOpenAI(api_key="k", base_url="http://x/v1", limiter=limiter)
    assert a._client._transport.limiter is limiter  # type: ignore[attr-defined]
    assert b._client._transport.limiter is limiter  # type: ignore[attr-defined]
    c = OpenAI(api_key="k", base_url="http://x/v1", rate_limit=False)
    assert c._client._transport.limiter is None  # type: ignore[attr-defined]


def test_public_callables_have_docstrings() -> None:
    for name in chatgate.client.__all__:
        value = getattr(chatgate.client, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name
