"""The one middleware: a request id on every response, and every error in OpenAI's shape."""

from __future__ import annotations

import logging
import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

from chatgate import errors
from chatgate.meter import METER
from chatgate.state import REQUEST_ID, STATE

log = logging.getLogger(__name__)


def _http_error(exc: web.HTTPException) -> errors.APIError:
    """aiohttp's own errors (unknown route, wrong method, body too big) in OpenAI's shape."""
    if exc.status == 404:
        return errors.NotFound(
            "Unknown request URL. Please check the URL and method.", code="unknown_url"
        )
    if exc.status == 405:
        return errors.InvalidRequest(
            "Method not allowed for this URL.", code="method_not_allowed"
        ).with_status(405)
    if exc.status == 413:
        return errors.BodyTooLarge("The request body is too large.")
    error = errors.InvalidRequest(exc.reason or "Bad request.", code="bad_request")
    return error.with_status(exc.status) if exc.status < 500 else errors.APIError(exc.reason)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = "req_" + secrets.token_hex(12)
    request[REQUEST_ID] = request_id
    error_code: str | None = None
    try:
        response = await handler(request)
    except errors.APIError as exc:
        error_code = exc.code
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects from the dashboard
            exc.headers["x-request-id"] = request_id
            raise
        response = error_response(_http_error(exc))
    except Exception:
        # Logged without the request's headers or body: they may hold a key.
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = error_response(
            errors.APIError("The server had an error while processing your request.")
        )
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    meter = request.get(METER)
    if meter is not None:  # an API request: one usage record, whatever the outcome
        state = request.app[STATE]
        if state.usage is not None:
            rec = meter.record(request_id, response.status, error_code)
            state.usage.record(rec)
            if state.metrics is not None:
                state.metrics.observe(rec)
    return response


def error_response(exc: errors.APIError) -> web.Response:
    headers = {"Content-Type": "application/json", **exc.headers}
    return web.Response(status=exc.status, body=exc.body(), headers=headers)
