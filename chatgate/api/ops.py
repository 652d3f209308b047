"""Operational endpoints: ``/healthz`` and ``/openapi.json``."""

from __future__ import annotations

from aiohttp import web

from chatgate.api.openai import json_response
from chatgate.api.openapi import openapi_document


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
