"""What one API request used, gathered along the request path and recorded once at its end.

A handler calls :func:`start` first; the middleware turns the meter into a
:class:`~chatgate.usage.record.UsageRecord` after the response (errors and rejections
included) and hands it to the recorder, which never blocks the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from chatgate.auth import Principal
from chatgate.backends.base import Usage
from chatgate.errors import APIError
from chatgate.settings import ModelConfig
from chatgate.usage.record import UsageRecord


@dataclass(slots=True)
class Meter:
    endpoint: str
    arrived: float
    started: float
    account_id: str | None = None
    key_id: str | None = None
    model: str = ""
    backend: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    first_byte_at: float | None = None
    streamed: bool = False
    conversation_id: str | None = None
    error_code: str | None = None
    status: int = 0  # a stream's status once sent, or the outcome's where it differs (broken())
    admitted: bool = False  # the limits let it through (and took it): see Call.admit
    limit_headers: dict[str, str] | None = None  # theirs, for an answer that fails after

    def identify(self, principal: Principal) -> None:
        self.account_id = principal.account_id
        self.key_id = principal.key_id

    def add_usage(self, usage: Usage, model: ModelConfig | None = None) -> None:
        """Note the tokens of an answer and what they cost under the model's prices."""
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.cached_tokens = cached = usage.cached_tokens
        if model is not None:
            self.cost = model.cost(usage.prompt_tokens, usage.completion_tokens, cached)

    def broken(self, failure: APIError) -> None:
        """A stream the upstream broke after its start: the client saw a 200 and then an error
        event, and the record keeps the failure's status and code, so the rollups and the
        metrics count it among the errors. A client gone first is what ended it instead."""
        if self.error_code is None:
            self.error_code, self.status = failure.code, failure.status

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def record(self, request_id: str, status: int, error_code: str | None) -> UsageRecord:
        now = time.perf_counter()
        first_byte_at = self.first_byte_at
        return UsageRecord(  # positional, in field order: a request's cost, not a config's
            request_id,
            self.arrived,
            self.account_id,
            self.key_id,
            self.model,
            self.backend,
            self.endpoint,
            self.prompt_tokens,
            self.completion_tokens,
            self.cost,
            (now - self.started) * 1000.0,
            None if first_byte_at is None else (first_byte_at - self.started) * 1000.0,
            self.status or status,
            error_code or self.error_code,
            self.conversation_id,
            self.streamed,
            self.admitted,
            self.cached_tokens,
        )


METER = web.RequestKey("chatgate_meter", Meter)


def start(request: web.Request, endpoint: str) -> Meter:
    """Begin metering ``request``; the middleware records it when the response is done."""
    meter = Meter(endpoint, time.time(), time.perf_counter())
    request[METER] = meter
    return meter
