"""The one middleware: a request id on every response, and every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from sqlalchemy import exc as db_errors

from chatgate import errors
from chatgate.ids import ordered_id
from chatgate.keys import format as keyfmt
from chatgate.meter import METER
from chatgate.state import REQUEST_ID, STATE, State
from chatgate.usage.record import CLIENT_CLOSED, UsageRecord

log = logging.getLogger(__name__)


DB_RETRY_AFTER = 5
"""Seconds a client is told to wait when the database is unavailable."""
_CONNECTION_STATES = ("08", "57P")  # SQLSTATE: connection exception, operator intervention


def _database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached or did not answer (a 503 that
    a retry may cure), not that this request was wrong (a 500 with its traceback)."""
    if isinstance(exc, OSError | TimeoutError | db_errors.TimeoutError):  # refused, timed out,
        return True  # a full pool; asyncpg's command timeout is a TimeoutError
    if isinstance(exc, db_errors.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, db_errors.InterfaceError):
            return True
        state = str(getattr(exc.orig, "sqlstate", "") or "")
        if state.startswith(_CONNECTION_STATES):
            return True
        orig = exc.orig
        return isinstance(orig, OSError | TimeoutError) or "database is locked" in str(orig)
    return False


class MalformedRequests(logging.Filter):
    """aiohttp's log of a request it could not parse (a header over 8 KiB, a control
    character in one, a bad chunk size) is an ERROR with a traceback that quotes the bytes
    at fault: an ``Authorization`` header's key, a session cookie. Rewritten here (on the
    ``aiohttp.server`` logger) as one WARNING line naming the error's class and status,
    never its bytes: anyone can send these, and keys are never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "refused a malformed HTTP request from %s: %s (%s)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


MALFORMED_REQUESTS = MalformedRequests()


def _named(exc: BaseException) -> str:
    """The exception's class and its original's: no message (it may hold a query's values)."""
    orig = getattr(exc, "orig", None)
    return type(exc).__name__ + (f" ({type(orig).__name__})" if orig is not None else "")


def _http_error(exc: web.HTTPException) -> errors.APIError:
    """aiohttp's own errors (unknown route, wrong method, body too big) in OpenAI's shape."""
    if exc.status == 404:
        return errors.unknown_url()
    if exc.status == 405:
        return errors.method_not_allowed(getattr(exc, "allowed_methods", ()))
    if exc.status == 413:
        return errors.BodyTooLarge("The request body is too large.")
    error = errors.InvalidRequest(exc.reason or "Bad request.", code="bad_request")
    return error.with_status(exc.status) if exc.status < 500 else errors.APIError(exc.reason)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = ordered_id("req")
    request[REQUEST_ID] = request_id
    error_code: str | None = None
    try:
        response = await handler(request)
    except errors.APIError as exc:
        error_code = exc.code
        response = error_response(exc)
        _limits_of(request, response)
        if error_code == "model_not_found" and METER in request:
            # No model is named like a key: a key sent as the model is recorded as its hint,
            # as the message shows it (usage reports and exports show the model recorded).
            request[METER].model = keyfmt.unkeyed(request[METER].model or "")
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects from the dashboard
            exc.headers["x-request-id"] = request_id
            raise
        response = error_response(_http_error(exc))
    except RequestPayloadError:  # e.g. bytes that are not in their Content-Encoding
        error_code = "invalid_body"
        encoding = request.headers.get("Content-Encoding", "")[:40]
        said = f" as Content-Encoding {encoding!r}" if encoding else ""
        response = error_response(
            errors.InvalidRequest(f"The request body could not be read{said}.", code=error_code)
        )
    except Exception as exc:
        refused = errors.refused_text(exc)
        if refused is not None:
            error_code = refused.code
            response = error_response(refused)
        elif _database_unavailable(exc):
            log.warning(
                "database unavailable in %s %s: %s", request.method, request.path, _named(exc)
            )
            unavailable = errors.ServiceUnavailable(
                "The service's database is unavailable. Please retry shortly.",
                headers={"retry-after": str(DB_RETRY_AFTER)},
            )
            error_code = unavailable.code
            response = error_response(unavailable)
        else:
            # Logged without the request's headers or body: they may hold a key.
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(
                errors.APIError("The server had an error while processing your request.")
            )
        _limits_of(request, response)
    except asyncio.CancelledError:
        _cancelled(request, request_id, CLIENT_CLOSED)
        raise
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    meter = request.get(METER)
    if meter is not None:  # an API request: one usage record, whatever the outcome
        state = request.app[STATE]
        # The metrics count it with usage recording switched off too.
        if state.usage is not None or state.metrics is not None:
            if not response.prepared:
                # Send the answer first, then record it: the client does not wait for the
                # bookkeeping, and the latency recorded runs to the last byte sent.
                try:  # (not contextlib.suppress: a context manager per request costs)
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionResetError:
                    pass
                except asyncio.CancelledError:
                    _cancelled(request, request_id, response.status)
                    raise
            _record(state, meter.record(request_id, response.status, error_code))
    return response


def _limits_of(request: web.Request, response: web.StreamResponse) -> None:
    """An admitted request that failed (an upstream's error, a timeout) still tells the
    client where its limits stand, as its success would have: the ``x-ratelimit-*`` headers."""
    meter = request.get(METER)
    if meter is not None and meter.limit_headers:
        response.headers.update(meter.limit_headers)


def _record(state: State, rec: UsageRecord) -> None:
    if state.usage is not None:
        state.usage.record(rec)
    if state.metrics is not None:
        state.metrics.observe(rec)


def _cancelled(request: web.Request, request_id: str, status: int) -> None:
    """Record an API request whose handler was cancelled: the client went away (the server
    cancels a handler when its connection is lost) or a stop cut it off (after
    ``shutdown_timeout``). Its tokens were metered on the way out (the handlers' ``finally``);
    a stream already begun keeps its status (``Meter.status``), an answer never begun is a
    499. After the recorder has closed (a stop), the record goes to the spool."""
    meter = request.get(METER)
    if meter is None:
        return
    if meter.error_code is None:  # the connection ended first, whichever side closed it
        meter.error_code = "client_disconnected"
    _record(request.app[STATE], meter.record(request_id, status, None))


# Anything shaped like a chatgate key (a typo'd or cut one too) in an error message or param.


def error_response(exc: errors.APIError) -> web.Response:
    # A key never appears in an error message (DESIGN.md): APIError shows any it was given as
    # their hints (a key pasted into a field that messages echo: a model name, an id).
    headers = {"Content-Type": "application/json", **exc.headers}
    return web.Response(status=exc.status, body=exc.body(), headers=headers)
