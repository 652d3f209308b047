"""Usage end to end through the real server: every request recorded once, rollups equal the
raw records, nothing lost when PostgreSQL goes away mid-run or the server is stopped."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import requests

from tests.helpers import Gateway, Upstream, make_gateway, stop
from tests.usage.pgserver import PgServer

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "count me"}]}


def new_key(gw: Gateway) -> tuple[str, str]:
    email = f"u{secrets.token_hex(4)}@example.com"
    gw.cli("accounts", "create", email, "--plan", "enterprise")
    return email, str(gw.cli_json("keys", "create", "--account", email)["key"])


def records(gw: Gateway, email: str) -> list[dict[str, str]]:
    out = gw.cli("usage", "export", "--since", "1d", "--account", email, "--output", "-").stdout
    return list(csv.DictReader(io.StringIO(out)))


def wait_records(gw: Gateway, email: str, n: int, timeout: float = 60) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    rows = records(gw, email)
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = records(gw, email)
    return rows


async def mixed_load(url: str, key: str, n: int) -> list[dict[str, Any]]:
    """``n`` concurrent requests: JSON, full streams, and streams the client cuts off."""
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

        async def one(i: int) -> dict[str, Any]:
            kind = ("json", "stream", "cut")[i % 3]
            body = dict(BODY)
            if kind != "json":
                body.update(stream=True, stream_options={"include_usage": True})
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=headers
            ) as resp:
                out = {"kind": kind, "status": resp.status, "id": resp.headers["x-request-id"]}
                if kind == "cut":
                    await resp.content.readline()  # read one line, then hang up
                    resp.close()
                elif kind == "json":
                    out["usage"] = (await resp.json())["usage"]
                else:
                    text = await resp.text()
                    events = text.split("\n\n")
                    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
                    out["usage"] = chunks[-1]["usage"]
                return out

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_thousand_requests_exactly_recorded(gateway: Gateway) -> None:
    email, key = new_key(gateway)
    results = asyncio.run(mixed_load(gateway.url, key, 1000))
    assert all(r["status"] == 200 for r in results)
    rows = wait_records(gateway, email, 1000)
    assert len(rows) == 1000
    assert len({r["request_id"] for r in rows}) == 1000
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {r["id"] for r in results}
    for result in results:
        row = by_id[result["id"]]
        assert (row["streamed"] in ("True", "true", "1")) == (result["kind"] != "json")
        if "usage" in result:  # completed: exactly what the upstream reported
            assert int(row["prompt_tokens"]) == result["usage"]["prompt_tokens"]
            assert int(row["completion_tokens"]) == result["usage"]["completion_tokens"]
        else:  # cut off by the client: still metered (at least the prompt was read)
            assert int(row["prompt_tokens"]) > 0
    # Rollups (what reports read) equal the raw records.
    summary = json.loads(
        gateway.cli(
            "usage", "--account", email, "--since", "1d", "--by", "model", "--format", "json"
        ).stdout
    )
    totals = summary["totals"]
    assert totals["requests"] == 1000
    assert totals["prompt_tokens"] == sum(int(r["prompt_tokens"]) for r in rows)
    assert totals["completion_tokens"] == sum(int(r["completion_tokens"]) for r in rows)


def _shown_usage(resp: requests.Response, stream: bool) -> dict[str, int] | None:
    """The usage a client is shown: a JSON answer's, or a stream's usage chunks' (at most one,
    just before ``[DONE]``; no chunk with choices carries one)."""
    if not stream:
        usage: dict[str, int] | None = resp.json().get("usage")
        return usage
    data = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    with_usage = [i for i, c in enumerate(chunks) if c.get("usage") is not None]
    assert with_usage in ([], [len(chunks) - 1]), data
    if not with_usage:
        return None
    last = chunks[-1]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert last["id"] == chunks[0]["id"] and last["created"] == chunks[0]["created"]
    return dict(last["usage"])


def test_nonsense_usage_from_an_upstream_is_counted_instead(gateway: Gateway) -> None:
    """An upstream reporting 2**40 prompt tokens and -3 completion tokens (JSON and streamed):
    the requests are metered with the gateway's own count, the same as for an upstream that
    reports nothing, and usage goes on being recorded (a count beyond the tables' columns
    would have failed, for good, every batch of usage it was in). The client is shown the
    count it is billed for, in the JSON answer and in the usage chunk it asked for; a
    stream whose client did not ask for usage gets no usage chunk, nonsense or counted."""
    email, key = new_key(gateway)
    headers = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "count these words yourself"}]
    shown: dict[tuple[str, bool], dict[str, int] | None] = {}
    for model in ("gpt-bad-usage", "gpt-no-usage", "gpt-test"):
        for stream in (False, True):
            body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            resp = requests.post(
                gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
            )
            assert resp.status_code == 200, resp.text
            shown[model, stream] = _shown_usage(resp, stream)
        quiet = requests.post(
            gateway.url + "/v1/chat/completions",
            json={"model": model, "messages": messages, "stream": True},
            headers=headers,
            timeout=30,
        )
        assert quiet.status_code == 200 and _shown_usage(quiet, True) is None
    rows = wait_records(gateway, email, 9)
    assert len(rows) == 9
    counted: dict[tuple[str, bool], list[tuple[int, int]]] = {}
    for r in rows:
        key_ = (r["model"], r["streamed"] in ("True", "true", "1"))
        counted.setdefault(key_, []).append((int(r["prompt_tokens"]), int(r["completion_tokens"])))
    for streamed in (False, True):
        bad, none = counted["gpt-bad-usage", streamed], counted["gpt-no-usage", streamed]
        assert bad[0] == none[0] and len(set(bad)) == 1 and len(set(none)) == 1
        assert 0 < bad[0][0] < 100 and 0 < bad[0][1] < 100
        for model in ("gpt-bad-usage", "gpt-no-usage", "gpt-test"):
            usage = shown[model, streamed]
            assert usage is not None, (model, streamed)
            billed = counted[model, streamed][0]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == billed
            assert usage["total_tokens"] == sum(billed)
    # The fake upstream's own count differs from the gateway's: the upstream's was shown.
    assert counted["gpt-test", False][0] != counted["gpt-no-usage", False][0]


def test_embeddings_without_a_believable_usage_show_the_counted_one(gateway: Gateway) -> None:
    """Embeddings from an upstream that reports no usage or a nonsense one: the answer's usage
    is the gateway's count, the one recorded; a reported count is shown and recorded as is."""
    email, key = new_key(gateway)
    shown = {}
    for model in ("gpt-no-usage", "gpt-bad-usage", "gpt-test"):
        resp = requests.post(
            gateway.url + "/v1/embeddings",
            json={"model": model, "input": ["count these words yourself", "and these"]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        shown[model] = resp.json()["usage"]
    rows = {r["model"]: r for r in wait_records(gateway, email, 3)}
    for model, usage in shown.items():
        assert usage["prompt_tokens"] == usage["total_tokens"]
        assert usage["prompt_tokens"] == int(rows[model]["prompt_tokens"]), model
    assert shown["gpt-no-usage"] == shown["gpt-bad-usage"]
    assert 6 <= shown["gpt-no-usage"]["prompt_tokens"] < 20
    assert shown["gpt-test"]["prompt_tokens"] == 2  # the fake upstream's own: one per input


def test_rejected_requests_are_recorded_too(gateway: Gateway) -> None:
    email, key = new_key(gateway)
    bad = requests.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "nope", "messages": []},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert bad.status_code == 400
    rows = wait_records(gateway, email, 1)
    assert len(rows) == 1 and rows[0]["status"] == "400"
    assert rows[0]["request_id"] == bad.headers["x-request-id"]


def test_database_outage_loses_nothing(
    upstream: Upstream, own_pg: PgServer, tmp_path: Path
) -> None:
    gw = make_gateway(
        tmp_path / "gw",
        database_url=own_pg.url,
        upstream=upstream,
        extra_env={"CHATGATE_SECRET": "o" * 40},
    ).start()
    try:
        email, key = new_key(gw)
        headers = {"Authorization": f"Bearer {key}"}
        url = gw.url + "/v1/chat/completions"
        statuses = [
            requests.post(url, json=BODY, headers=headers, timeout=10).status_code
            for _ in range(20)
        ]
        own_pg.stop()  # the database goes away mid-run
        statuses += [
            requests.post(url, json=BODY, headers=headers, timeout=10).status_code
            for _ in range(60)
        ]
        time.sleep(2)  # at least one flush while the database is down: to the spool
        assert "chatgate_usage_spool" in requests.get(gw.url + "/metrics", timeout=10).text
        own_pg.start()
        statuses += [
            requests.post(url, json=BODY, headers=headers, timeout=10).status_code
            for _ in range(20)
        ]
        assert statuses == [200] * 100  # no request failed because of the database
        rows = wait_records(gw, email, 100)
        assert len(rows) == 100
        assert len({r["request_id"] for r in rows}) == 100
    finally:
        gw.stop()


def test_sigterm_with_the_database_frozen_stops_and_spools(
    upstream: Upstream, own_pg: PgServer, tmp_path: Path
) -> None:
    """A database that stops answering (a frozen host) while the gateway stops: the stop still
    ends, with status 0, its queued records in the spool; the next start replays them. The
    last-used stamps' final write used to wait for the database for ever."""
    gw = make_gateway(
        tmp_path / "gw",
        database_url=own_pg.url,
        upstream=upstream,
        extra_env={"CHATGATE_USAGE_FLUSH_INTERVAL": "3600", "CHATGATE_SECRET": "f" * 40},
    ).start()
    email, key = new_key(gw)
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(5):
        ok = requests.post(gw.url + "/v1/chat/completions", json=BODY, headers=headers)
        assert ok.status_code == 200
    own_pg.freeze()
    assert gw.proc is not None
    assert stop(gw.proc, timeout=120) == 0  # not killed after waiting
    spooled = [p.read_text() for p in (tmp_path / "gw" / "data" / "spool").glob("*.spool")]
    assert sum(text.count("\n") for text in spooled) == 5
    own_pg.thaw()
    gw.env["CHATGATE_USAGE_FLUSH_INTERVAL"] = "1"  # a flush replays the spool
    gw.start()
    try:
        assert len(wait_records(gw, email, 5)) == 5
    finally:
        gw.stop()


def test_sigterm_flushes_a_full_queue(upstream: Upstream, pg_url: str, tmp_path: Path) -> None:
    gw = make_gateway(
        tmp_path / "gw",
        database_url=pg_url,
        upstream=upstream,
        extra_env={"CHATGATE_USAGE_FLUSH_INTERVAL": "3600"},
    ).start()
    email, key = new_key(gw)
    results = asyncio.run(mixed_load(gw.url, key, 300))
    assert all(r["status"] == 200 for r in results)
    assert records(gw, email) == []  # still queued: the flush interval is an hour
    assert gw.stop() == 0
    assert len(records(gw, email)) == 300


def test_sigkill_loses_at_most_the_last_flush_interval(
    upstream: Upstream, pg_url: str, tmp_path: Path
) -> None:
    gw = make_gateway(
        tmp_path / "gw",
        database_url=pg_url,
        upstream=upstream,
        extra_env={"CHATGATE_USAGE_FLUSH_INTERVAL": "0.2"},
    ).start()
    email, key = new_key(gw)
    headers = {"Authorization": f"Bearer {key}"}

    def send(n: int) -> set[str]:
        return {
            requests.post(
                gw.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10
            ).headers["x-request-id"]
            for _ in range(n)
        }

    early = send(60)
    time.sleep(1.0)  # several flush intervals: these are in the database now
    late = send(30)
    gw.stop(signal.SIGKILL)  # no chance to flush
    gw.start()  # a restarted process replays whatever a dead one spooled
    try:
        rows = wait_records(gw, email, 60)
        ids = [r["request_id"] for r in rows]
        assert len(ids) == len(set(ids))  # nothing counted twice
        assert early <= set(ids)  # nothing older than the flush interval was lost
        assert set(ids) <= early | late
    finally:
        gw.stop()


def test_an_embeddings_encoding_format_of_null_is_the_default(
    gateway: Gateway, upstream: Upstream
) -> None:
    """QA: ``"encoding_format": null`` was a 400 ("Expected `str`, got `null`") where
    ``"dimensions": null`` is the default; null now means the default here too, and is not
    sent on to the upstream (which may not take it)."""
    _, key = new_key(gateway)
    marker = secrets.token_hex(4)
    resp = requests.post(
        gateway.url + "/v1/embeddings",
        json={"model": "gpt-test", "input": [marker], "encoding_format": None},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert isinstance(resp.json()["data"][0]["embedding"], list)  # floats: the default
    [sent] = [b for b in upstream.received() if b.get("input") == [marker]]
    assert "encoding_format" not in sent
