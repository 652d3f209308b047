"""Public model names -> (backend, deployment config).

The local embedded model is registered under ``settings.local_model_name`` unless switched off;
upstream models come from the ``[[models]]`` tables of the config file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from chatgate import errors
from chatgate.backends.base import Backend
from chatgate.backends.openai_compat import OpenAICompatBackend
from chatgate.settings import ModelConfig, Settings

log = logging.getLogger(__name__)
LOCAL_CONTEXT_WINDOW = 8192


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request for a public model name goes."""

    backend: Backend
    model: ModelConfig


class Router:
    """Resolves public model names; owns the backends' lifetimes."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._backends: dict[str, Backend] = {}
        self._routes: dict[str, Route] = {}
        configs = list(settings.models)
        if settings.local_model and all(m.name != settings.local_model_name for m in configs):
            configs.insert(
                0,
                ModelConfig(
                    name=settings.local_model_name,
                    backend="local",
                    upstream_model=settings.local_model_name,
                    context_window=LOCAL_CONTEXT_WINDOW,
                ),
            )
        for config in configs:
            self._routes[config.name] = Route(self._backend(config.backend), config)

    def _backend(self, kind: str) -> Backend:
        backend = self._backends.get(kind)
        if backend is None:
            if kind == "openai_compat":
                backend = OpenAICompatBackend(self._settings)
            elif kind == "local":
                from chatgate.backends.local import LocalBackend

                backend = LocalBackend(self._settings)
            else:
                raise ValueError(f"unknown backend kind {kind!r} in the models configuration")
            self._backends[kind] = backend
        return backend

    async def start(self) -> None:
        for backend in self._backends.values():
            await backend.start()

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()

    def resolve(self, name: str) -> Route:
        """The route for public model ``name``; 404 ``model_not_found`` when unknown."""
        route = self._routes.get(name)
        if route is None:
            raise errors.ModelNotFound(name)
        return route

    def models(self) -> list[ModelConfig]:
        return [route.model for route in self._routes.values()]
