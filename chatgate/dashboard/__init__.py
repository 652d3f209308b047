"""The web dashboard: server-rendered pages under ``/dashboard/`` (Jinja2, no build step).

- :mod:`.auth` — session cookie, CSRF, log in / log out; :mod:`.passwords` — argon2id;
  :mod:`.throttle` — login throttling.
- :mod:`.services` — actions shared with the JSON API (:mod:`chatgate.api.manage`).
- :mod:`.render` — templates and the page wrapper (login, admin, CSRF, HTML errors).
- ``pages_*`` — the pages; :mod:`.usage_view` and :mod:`.charts` — usage data and SVG charts.
- ``templates/`` and ``static/`` (our own small CSS and scripts; charts are pygal SVG).

Essential flows are plain forms that post and redirect; scripts only add the copy button and
the streaming playground.
"""

from __future__ import annotations

from aiohttp import web

from chatgate.dashboard import auth, pages_account, pages_admin, pages_keys, pages_usage, render
from chatgate.dashboard.auth import with_session

STATIC = render.HERE / "static"
FILES = {path.name: path for path in STATIC.iterdir() if path.is_file()}
"""The static files, by name: a request names one of these or gets a 404. No path a
client sends reaches the file system (a name too long for it was an OSError, which the
middleware took for the database's and answered 503)."""


async def _static(request: web.Request) -> web.StreamResponse:
    path = FILES.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()  # as the static directory's own 404 was
    return web.FileResponse(path)  # with ETag and Last-Modified, conditional requests


async def _home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(render.PREFIX + "/")


async def _missing(request: web.Request) -> web.StreamResponse:
    """Any other ``/dashboard/...`` path: an HTML 404 (the API's would be JSON)."""
    return await render.not_found(request, await auth.current_user(request))


def setup(app: web.Application) -> None:
    """Add the dashboard's routes (each in its session, :func:`auth.with_session`) and templates."""
    auth.setup(app)
    render.setup_templates(app)
    app.router.add_get("/", _home)
    app.router.add_get(render.PREFIX, with_session(_home))
    app.router.add_get(render.PREFIX + "/static/{name}", _static)
    pages_account.setup(app)
    pages_keys.setup(app)
    pages_usage.setup(app)
    pages_admin.setup(app)
    app.router.add_get(render.PREFIX + "/{tail:.*}", with_session(_missing))


__all__ = ["setup"]
