"""Usage endpoints, read from the rollups (:mod:`chatgate.usage.queries`).

- ``GET /v1/organization/usage/completions`` and ``.../usage/embeddings``: OpenAI's usage API
  shape (``start_time``, ``end_time``, ``bucket_width`` 1m/1h/1d, ``group_by`` model and/or
  api_key_id, ``api_key_ids``, ``models``, ``limit``, ``page``). Buckets are aligned to UTC
  (minute, hour, midnight) and clipped to the asked range; every bucket of a page is listed,
  the empty ones with ``results: []``, as OpenAI does. ``num_model_requests`` counts the
  requests that succeeded (rejected and failed ones never reached a model).
- ``GET /api/usage``: the dashboard's JSON, per day x model x key, with cost, mean latency
  (``avg_latency_ms``, null where no request was timed), error and
  rate-limited counts and totals.

Scope: a caller sees its own account's usage only; an admin sees every account. A filter can
only narrow that (another account's key ids simply match nothing).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from chatgate import errors
from chatgate.api.manage import caller
from chatgate.api.openai import authenticate, json_response
from chatgate.dashboard.auth import with_session
from chatgate.timefmt import parse_duration, until_now
from chatgate.usage.queries import Group, UsageRow, key_names, total, usage_rows
from chatgate.usage.tables import DAY, HOUR, MINUTE

# bucket_width -> (seconds, default limit, max limit), as OpenAI documents them.
BUCKET_WIDTHS: Mapping[str, tuple[int, int, int]] = {
    "1m": (MINUTE, 60, 1440),
    "1h": (HOUR, 24, 168),
    "1d": (DAY, 7, 31),
}
GROUP_FIELDS: Mapping[str, Group] = {"model": "model", "api_key_id": "key"}
COMPLETION_ENDPOINTS = ("chat.completions", "responses")
EMBEDDING_ENDPOINTS = ("embeddings",)
DEFAULT_DASHBOARD_SPAN = 30 * DAY
MAX_TIME = 253_402_300_799
"""9999-12-31T23:59:59Z: a later unix time is a mistake (and overflowed the databases)."""


def _list(query: MultiMapping[str], name: str) -> list[str] | None:
    """A list parameter given as ``name=a&name=b``, ``name[]=a`` (the SDK) or ``name=a,b``."""
    raw = [*query.getall(name, []), *query.getall(name + "[]", [])]
    if not raw:
        return None
    return [v.strip() for item in raw for v in item.split(",") if v.strip()]


def _end(query: MultiMapping[str]) -> int:
    """``end_time``, or now when it is not given (``0`` is a time: it was taken for "now")."""
    end = _int(query, "end_time", MAX_TIME)
    return until_now() if end is None else end


def _check_span(query: MultiMapping[str], start: int, end: int) -> None:
    """A 400 unless ``start`` is before ``end``, naming the parameter the caller sent."""
    if end > start:
        return
    if "end_time" in query:
        raise errors.InvalidRequest("'end_time' must be after 'start_time'.", param="end_time")
    raise errors.InvalidRequest(
        "'start_time' must be in the past: 'end_time', not given, is now.", param="start_time"
    )


def _int(query: MultiMapping[str], name: str, most: int | None = None) -> int | None:
    """A whole number from 0 (to ``most``, when given: :data:`MAX_TIME` for a time)."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise errors.InvalidRequest(
            f"Invalid value for '{name}': expected an integer.", param=name
        ) from None
    if number < 0:
        raise errors.InvalidRequest(f"Invalid value for '{name}': must be >= 0.", param=name)
    if most is not None and number > most:
        raise errors.InvalidRequest(
            f"Invalid value for '{name}': must be at most {most}.", param=name
        )
    return number


def _encode_page(width: int, bucket_start: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{width}:{bucket_start}".encode()).decode().rstrip("=")


def _decode_page(page: str, width: int) -> int:
    """The bucket start a ``page`` cursor points at; 400 when it is not ours or not this query's."""
    try:
        text = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4)).decode()
        version, cursor_width, start = text.split(":")
        if version != "v1" or int(cursor_width) != width:
            raise ValueError(text)
        return int(start)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise errors.InvalidRequest("Invalid value for 'page'.", param="page") from None


def _scope(principal_account: str, is_admin: bool) -> str | None:
    """The account a caller may read: its own; ``None`` (every account) for an admin."""
    return None if is_admin else principal_account


async def _usage_api(
    request: web.Request, *, endpoints: tuple[str, ...], result_object: str
) -> web.Response:
    state, principal = await authenticate(request)
    q = request.query
    start = _int(q, "start_time", MAX_TIME)
    if start is None:
        raise errors.InvalidRequest("Missing required parameter: 'start_time'.", param="start_time")
    end = _end(q)
    _check_span(q, start, end)
    bucket = q.get("bucket_width", "1d")
    if bucket not in BUCKET_WIDTHS:
        raise errors.InvalidRequest(
            "Invalid value for 'bucket_width': expected one of 1m, 1h, 1d.", param="bucket_width"
        )
    width, default_limit, max_limit = BUCKET_WIDTHS[bucket]
    limit = _int(q, "limit")
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= max_limit:
        raise errors.InvalidRequest(
            f"Invalid value for 'limit': between 1 and {max_limit} for bucket_width={bucket}.",
            param="limit",
        )
    group_by = _list(q, "group_by") or []
    unknown = [g for g in group_by if g not in GROUP_FIELDS]
    if unknown:
        raise errors.InvalidRequest(
            f"Invalid value for 'group_by': {unknown[0][:40]!r} (supported: model, api_key_id).",
            param="group_by",
        )
    first = start - start % width
    page = q.get("page")
    if page:
        first = _decode_page(page, width)
        if first % width or first < start - start % width or first >= end:
            raise errors.InvalidRequest("Invalid value for 'page'.", param="page")
    window_end = min(end, first + limit * width)
    rows = await usage_rows(
        state.engine,
        start=max(start, first),
        end=window_end,
        group_by=["bucket", *(GROUP_FIELDS[g] for g in group_by)],
        bucket_width=width,
        account_id=_scope(principal.account_id, principal.is_admin),
        key_ids=_list(q, "api_key_ids"),
        models=_list(q, "models"),
        endpoints=endpoints,
    )
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row.bucket_start is None or (row.succeeded == 0 and row.total_tokens == 0):
            continue  # only failures in this group: nothing reached a model
        by_bucket.setdefault(row.bucket_start, []).append(
            {
                "object": result_object,
                "input_tokens": row.prompt_tokens,
                "output_tokens": row.completion_tokens,
                "input_cached_tokens": row.cached_tokens,
                "input_audio_tokens": 0,
                "output_audio_tokens": 0,
                "num_model_requests": row.succeeded,
                "project_id": None,
                "user_id": None,
                "api_key_id": row.key_id if "api_key_id" in group_by else None,
                "model": row.model if "model" in group_by else None,
                "batch": None,
            }
        )
    data = [
        {
            "object": "bucket",
            "start_time": max(b, start),
            "end_time": min(b + width, end),
            "results": by_bucket.get(b, []),
        }
        for b in range(first, window_end, width)
    ]
    has_more = window_end < end
    return json_response(
        {
            "object": "page",
            "data": data,
            "has_more": has_more,
            "next_page": _encode_page(width, window_end) if has_more else None,
        }
    )


async def completions_usage(request: web.Request) -> web.Response:
    return await _usage_api(
        request,
        endpoints=COMPLETION_ENDPOINTS,
        result_object="organization.usage.completions.result",
    )


async def embeddings_usage(request: web.Request) -> web.Response:
    return await _usage_api(
        request,
        endpoints=EMBEDDING_ENDPOINTS,
        result_object="organization.usage.embeddings.result",
    )


def _dashboard_row(row: UsageRow, names: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    out = row.to_dict()
    out.pop("endpoint")
    out["api_key_id"] = out.pop("key_id")
    if row.bucket_start is not None:
        out["date"] = time.strftime("%Y-%m-%d", time.gmtime(row.bucket_start))
    if row.key_id is not None and row.key_id in names:
        out["api_key_name"], out["api_key_hint"] = names[row.key_id]
    return out


async def dashboard_usage(request: web.Request) -> web.Response:
    """``GET /api/usage?since=30d`` (or ``start_time``/``end_time``), ``api_key_id``, ``model``;
    admins may add ``account_id``. Rows per day x model x key (x account for admins)."""
    state, who = await caller(request)
    q = request.query
    end = _end(q)
    since = q.get("since")
    try:
        span = parse_duration(since) if since else DEFAULT_DASHBOARD_SPAN
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc), param="since") from None
    start = _int(q, "start_time", MAX_TIME)
    start = max(0, end - span) if start is None else start
    _check_span(q, start, end)
    account = _scope(who.account.id, who.account.is_admin)
    wanted = q.get("account_id")
    if wanted:
        if account is not None and wanted != account:
            raise errors.PermissionDenied("You can only read your own account's usage.")
        account = wanted
    groups: list[Group] = ["bucket", "model", "key"]
    if account is None:
        groups.append("account")
    rows = await usage_rows(
        state.engine,
        start=start,
        end=end,
        group_by=groups,
        bucket_width=DAY,
        account_id=account,
        key_ids=_list(q, "api_key_id"),
        models=_list(q, "model"),
    )
    names = await key_names(state.engine, {r.key_id for r in rows if r.key_id})
    totals = total(rows).to_dict()
    for name in ("bucket_start", "account_id", "key_id", "model", "endpoint"):
        totals.pop(name)
    return json_response(
        {
            "object": "usage.report",
            "start_time": start,
            "end_time": end,
            "bucket_width": "1d",
            "data": [_dashboard_row(r, names) for r in rows],
            "totals": totals,
        }
    )


def setup(app: web.Application) -> None:
    """Add the usage routes to ``app``."""
    app.router.add_get("/v1/organization/usage/completions", completions_usage)
    app.router.add_get("/v1/organization/usage/embeddings", embeddings_usage)
    app.router.add_get("/api/usage", with_session(dashboard_usage))


__all__ = ["setup"]
