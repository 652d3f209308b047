"""Operational endpoints: ``/healthz``, ``/metrics`` (Prometheus) and ``/openapi.json``."""

from __future__ import annotations

from aiohttp import web

from chatgate.api.openai import json_response
from chatgate.api.openapi import openapi_document
from chatgate.state import STATE


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics; labels never carry a key or a key id."""
    registry = request.app[STATE].metrics
    if registry is None:
        return web.Response(status=404)
    body, content_type = registry.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
