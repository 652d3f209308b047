"""The server's error tree. Every error the API returns is one of these classes.

    APIError                         500 server_error
    ├── InvalidRequest               400 invalid_request_error   (param names the field)
    │   ├── BodyTooLarge             413
    │   ├── ContextTooLong           400 context_length_exceeded
    │   ├── NotFound                 404 (resources: keys, conversations, responses)
    │   └── ModelNotFound            404 model_not_found
    ├── AuthenticationError          401 invalid_api_key
    │   └── ExpiredAPIKey            401 expired_api_key
    ├── PermissionDenied             403 permission_error
    ├── RateLimited                  429 requests|tokens rate_limit_exceeded
    ├── InsufficientQuota            429 insufficient_quota (x-should-retry: false)
    ├── ServiceUnavailable           503 server_error
    ├── UpstreamError                502 upstream_error
    └── UpstreamTimeout              504 upstream_timeout

One handler (:func:`error_body`) turns any of them into OpenAI's JSON shape:
``{"error": {"message", "type", "param", "code"}}``. Messages never contain a key: not even one
pasted into a field that a message echoes (a model name, a plan, an id), whether the message
goes to the API, a dashboard page or the command line; a key-shaped string in a message or a
``param`` is shown as its hint from the start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from chatgate.keys.format import unkeyed


class APIError(Exception):
    """Base of the tree; ``status``, ``type`` and ``code`` are class attributes."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message = unkeyed(message)
        super().__init__(message)
        self.message = message
        self.param = param if param is None else unkeyed(param)
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.headers: dict[str, str] = dict(headers or {})

    def with_status(self, status: int) -> APIError:
        """The same error answered with another HTTP status (405, 415, ...)."""
        self.status = status
        return self

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        """The JSON body of the error response."""
        return orjson.dumps(self.to_dict())


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class ContextTooLong(InvalidRequest):
    """The prompt does not fit the model's context window (beside the output reserved).

    Its own class because context trimming reads it from a token counter as "does not fit"
    (a text too long to tokenize), while the counter's other refusals still go to the client.
    """

    code = "context_length_exceeded"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{_clip(model)}` does not exist or you do not have access to it.",
            param="model",
        )


def unknown_url() -> NotFound:
    """The 404 of a URL with nothing behind it, also for a route that is not the caller's to
    know of (the admin API to anyone but an admin)."""
    return NotFound("Unknown request URL. Please check the URL and method.", code="unknown_url")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its class's name when it has none (a bare
    ``TimeoutError()`` printed "chatgate: error: " and nothing more)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def method_not_allowed(allowed: Iterable[str] = ()) -> APIError:
    """The 405 of a known URL asked with another method, with the ``Allow`` header RFC 9110
    requires of it (the methods the URL takes; QA: there was none)."""
    error = InvalidRequest("Method not allowed for this URL.", code="method_not_allowed")
    methods = sorted({m.upper() for m in allowed if m != "*"})
    if methods:
        error.headers["allow"] = ", ".join(methods)
    return error.with_status(405)


class AuthenticationError(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ExpiredAPIKey(AuthenticationError):
    code = "expired_api_key"


class AccountDeactivated(AuthenticationError):
    """OpenAI's 401 for a key of a deactivated account (it said "Incorrect API key": QA)."""

    code = "account_deactivated"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimited(APIError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class InsufficientQuota(APIError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(APIError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(APIError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


NUL_IN_TEXT = "22021"
"""PostgreSQL's SQLSTATE for a character its text cannot hold: a NUL (U+0000)."""


def refused_text(exc: BaseException) -> InvalidRequest | None:
    """The 400 for a database error that is the request's own fault: PostgreSQL refuses a NUL
    in any text it is given, a lookup's value too (a key id in a URL, a usage filter, an
    email), where SQLite simply finds nothing; ``None`` for any other error."""
    if getattr(getattr(exc, "orig", None), "sqlstate", None) != NUL_IN_TEXT:
        return None
    return nul_refused()


def nul_refused() -> InvalidRequest:
    """The 400 for a NUL character in a value (see :func:`refused_text`)."""
    return InvalidRequest(
        "The request contains a NUL character (\\u0000), which no value may hold.",
        code="invalid_text",
    )


def _clip(text: str, limit: int = 80) -> str:
    """Bound user text echoed in messages (never a key: keys are not echoed at all)."""
    return text if len(text) <= limit else text[:limit] + "…"


def error_body(exc: APIError) -> bytes:
    """Serialise ``exc`` as OpenAI's error JSON."""
    return exc.body()
