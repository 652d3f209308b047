"""A stream relayed in batches: the events of one read together, filtered as one by one.

The relay looks into an event only when a usage object may be in it (counted over the whole
read first), so these check that the batching changes nothing of what the client gets, what is
metered or what text is counted, however the upstream's bytes are cut into reads.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest

from chatgate.api.openai import _usage_before_done
from chatgate.backends import sse
from chatgate.backends.base import DONE_EVENT, Usage
from chatgate.backends.http1 import StreamBody, UpstreamConnectionError, _Connection
from chatgate.backends.sse import SSEPassThrough
from chatgate.settings import ModelConfig
from tests.backends.upstreams import CHUNKED, Reads, chunk, stream_server


def _event(choices: list[Any], usage: Any = None, **extra: Any) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return (
        b"data: " + orjson.dumps({**chunk, **extra, "choices": choices, "usage": usage}) + b"\n\n"
    )


def _text(word: str) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": word}, "finish_reason": None}


GOOD = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
NONSENSE = {"prompt_tokens": 2**40, "completion_tokens": -3, "total_tokens": 2**40 - 3}
WORDS = ["one ", "two ", "three ", "four"]

# A usage on a chunk with choices mid-stream (some servers report it on every chunk), one the
# gateway refuses on another, a null usage spelled with unusual spaces, a comment (a keep-alive
# before the first event: dropped, as nothing has started), and the usage-only chunk before
# [DONE].
ODD_NULL = b'data: {"choices": [], "usage" :  null}\n\n'
STREAM = [
    b": opening comment\n\n",
    _event([_text(WORDS[0])]),
    _event([_text(WORDS[1])], GOOD),
    _event([_text(WORDS[2])], NONSENSE),
    _event([_text(WORDS[3])]),
    ODD_NULL,
    _event([], GOOD),
    DONE_EVENT,
]


def _expected(include_usage: bool) -> list[bytes]:
    """What the client gets, event by event: no opening comment, a refused usage shown as
    null, the usage-only chunk only when asked for."""
    out = [*STREAM[1:3], _event([_text(WORDS[2])]), STREAM[4], ODD_NULL]
    return [*out, STREAM[6], DONE_EVENT] if include_usage else [*out, DONE_EVENT]


async def _batches(pieces: list[bytes], include_usage: bool) -> tuple[list[list[bytes]], Any]:
    stream = SSEPassThrough(Reads(*pieces), ModelConfig(name="m"), include_usage=include_usage)  # type: ignore[arg-type]
    return [batch async for batch in stream.batches()], stream


@pytest.mark.parametrize("include_usage", [True, False])
async def test_any_cut_into_reads_relays_meters_and_counts_the_same(include_usage: bool) -> None:
    whole = b"".join(STREAM)
    for size in (1, 7, 40, 97, 150, len(whole) // 2, len(whole)):
        pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
        batches, stream = await _batches(pieces, include_usage)
        assert all(batches), size  # never an empty batch
        assert [e for batch in batches for e in batch] == _expected(include_usage), size
        assert stream.usage == Usage(5, 4), size
        assert stream.completion_text == "".join(WORDS), size
        assert stream.envelope()["id"] == "c1", size  # from the first data event, not the comment


@pytest.mark.parametrize("include_usage", [True, False])
async def test_data_without_its_space_relays_meters_and_counts_the_same(
    include_usage: bool,
) -> None:
    """``data:{...}`` is SSE as much as ``data: {...}`` (the space is optional, and some
    servers leave it out): the usage is still read, the text still counted, an unasked usage
    chunk still dropped, and ``[DONE]`` still recognised."""
    whole = b"".join(event.replace(b"data: ", b"data:", 1) for event in STREAM)
    assert b"data: " not in whole
    for size in (1, 7, 97, len(whole)):
        pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
        batches, stream = await _batches(pieces, include_usage)
        assert stream.usage == Usage(5, 4), size
        assert stream.completion_text == "".join(WORDS), size
        assert [e for batch in batches for e in batch] == _expected(include_usage), size
        assert stream.envelope()["id"] == "c1", size


async def test_the_events_of_one_read_come_as_one_batch() -> None:
    reads = [b"".join(STREAM[:3]), b"".join(STREAM[3:5]), b"".join(STREAM[5:])]
    batches, _ = await _batches(reads, include_usage=True)
    assert [len(batch) for batch in batches] == [2, 2, 3]  # the opening comment dropped


async def test_a_long_stream_keeps_its_text_in_order_past_the_held_events() -> None:
    words = [f"w{i} " for i in range(sse._UNPARSED_MAX * 3 + 5)]
    events = [_event([_text(word)]) for word in words] + [_event([], GOOD), DONE_EVENT]
    reads = [b"".join(events[i : i + 100]) for i in range(0, len(events), 100)]
    batches, stream = await _batches(reads, include_usage=False)
    assert len(stream._unparsed) <= sse._UNPARSED_MAX + 100  # held events are parsed on the way
    assert stream.completion_text == "".join(words)
    assert [e for batch in batches for e in batch] == [*events[:-2], DONE_EVENT]


async def test_a_chunk_of_an_unexpected_shape_is_relayed_and_counts_no_text() -> None:
    """A chunk whose choices, delta or tool calls are not the objects OpenAI sends is passed
    on as it is; reading the text of a long stream (or of one cut off) never fails on it."""
    odd = [
        b'data: {"choices": {"0": {"delta": {"content": "x"}}}}\n\n',
        b'data: {"choices": 7}\n\n',
        b'data: {"choices": [{"index": 0, "delta": "x"}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [7, {"function": "f"}]}}]}\n\n',
    ]
    words = [f"w{i} " for i in range(sse._UNPARSED_MAX + 5)]
    events = [_event([_text(word)]) for word in words[:3]] + odd
    events += [_event([_text(word)]) for word in words[3:]] + [_event([], GOOD), DONE_EVENT]
    batches, stream = await _batches([b"".join(events)], include_usage=True)
    assert [e for batch in batches for e in batch] == events
    assert stream.usage == Usage(5, 4)
    assert stream.completion_text == "".join(words)
    _, cut = await _batches([b"".join(events[:5])], include_usage=False)
    assert cut.usage is None and cut.completion_text == "".join(words[:3])


async def test_usage_objects_are_found_wherever_they_are_in_a_read() -> None:
    plain = _event([_text("a")])
    assert sse._plain([plain, plain, DONE_EVENT], plain + plain + DONE_EVENT) == 3
    usage = _event([], GOOD)
    read = [plain, usage, plain, DONE_EVENT]
    assert sse._plain(read, b"".join(read)) == 1  # from the usage on, each is looked at
    assert sse._plain([plain], plain + b'data: {"usage": {"prompt_tokens"') == 0  # in the rest
    nulls = [b'data: {"usage":null}\n\n', b'data: {"usage": null}\n\n', plain]
    assert sse._plain(nulls, b"".join(nulls)) == 3  # nulls as encoders write them: no look
    odd = [plain, ODD_NULL, plain]
    assert sse._plain(odd, b"".join(odd)) == 1  # otherwise looked at (by _keep, which knows)


async def _gathered(batches: list[list[bytes]], usage: Usage | None) -> list[list[bytes]]:
    class _Stream:
        pass

    stream = _Stream()
    stream.usage = usage  # type: ignore[attr-defined]
    stream.usage_event = lambda u: b"data: usage\n\n"  # type: ignore[attr-defined]

    async def source() -> Any:
        for batch in batches:
            yield batch

    out = _usage_before_done(source(), stream, lambda: Usage(1, 1))  # type: ignore[arg-type]
    return [batch async for batch in out]


async def test_the_gateway_usage_goes_just_before_done_inside_its_batch() -> None:
    a, b = _event([_text("a")]), _event([_text("b")])
    assert await _gathered([[a], [b, DONE_EVENT]], None) == [
        [a],
        [b, b"data: usage\n\n", DONE_EVENT],
    ]
    assert await _gathered([[a, DONE_EVENT]], Usage(2, 2)) == [[a, DONE_EVENT]]  # reported
    assert await _gathered([[a], [b]], None) == [[a], [b], [b"data: usage\n\n"]]  # no [DONE]


async def test_a_read_of_many_chunks_reaches_the_stream_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httptools calls on_body once per chunk of a chunked body; the stream is fed once per
    read of the socket (seven chunks written at once: as many feeds as reads, not chunks)."""
    url, _ = await stream_server([[CHUNKED + b"".join(map(chunk, STREAM)) + b"0\r\n\r\n"]])
    port = int(url.rsplit(":", 1)[1].split("/")[0])

    fed: list[bytes] = []
    reads: list[bytes] = []
    feed, data_received = StreamBody.feed, _Connection.data_received

    def spy_feed(self: StreamBody, data: bytes) -> None:
        fed.append(data)
        feed(self, data)

    def spy_data_received(self: _Connection, data: bytes) -> None:
        reads.append(data)
        data_received(self, data)

    monkeypatch.setattr(StreamBody, "feed", spy_feed)
    monkeypatch.setattr(_Connection, "data_received", spy_data_received)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Connection(loop), "127.0.0.1", port)
    request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    body = await conn.send(request, 1e12, 1e12, streaming=True)
    assert isinstance(body, StreamBody)
    got = b""
    while piece := await body.readany():
        got += piece
    assert got == b"".join(STREAM)
    assert 1 <= len(fed) <= len(reads) < len(STREAM)  # here, usually one read and one feed
    conn.close()


async def test_a_stream_ended_without_done_is_done_or_an_error() -> None:
    """An upstream that closes the stream without ``[DONE]``: after its answer finished (a
    finish reason came), the client gets the ``[DONE]`` it waits for; cut short, an error
    event (it got neither, and the SDK failed on what it had, or waited)."""
    finished = [*STREAM[:5], _event([{"index": 0, "delta": {}, "finish_reason": "stop"}])]
    batches, stream = await _batches([b"".join(finished)], include_usage=False)
    relayed = [e for batch in batches for e in batch]
    assert relayed[-1] == DONE_EVENT and stream.failure is None
    # Its last event, the usage chunk, without the blank line that ends an event: still done.
    last = b"".join([*finished, _event([], GOOD)]).rstrip(b"\n")
    batches, stream = await _batches([last], include_usage=True)
    relayed = [e for batch in batches for e in batch]
    assert relayed[-1] == DONE_EVENT and stream.failure is None, relayed[-2:]
    # The finish reason a read before the last (the usage chunk alone in its own read).
    batches, stream = await _batches([*finished, _event([], GOOD)], include_usage=True)
    assert [e for batch in batches for e in batch][-1] == DONE_EVENT and not stream.failure
    for cut in (STREAM[:3], [STREAM[1], b"data: {garbage\n\n"], []):
        batches, stream = await _batches([b"".join(cut)] if cut else [], include_usage=True)
        relayed = [e for batch in batches for e in batch]
        assert stream.failure is not None and stream.failure.code == "upstream_error"
        assert relayed[-1].startswith(b'data: {"error"'), relayed
        assert DONE_EVENT not in relayed


class _BreaksAtTheEnd(Reads):
    """Reads its pieces, then the connection breaks instead of ending."""

    async def readany(self) -> bytes:
        if self._pieces:
            return self._pieces.pop(0)
        raise UpstreamConnectionError("broke")


@pytest.mark.parametrize("cut", [1, 2, 3])
async def test_nothing_follows_done(cut: int) -> None:
    """Events an upstream sends after ``[DONE]`` (a stray one, a second usage, an error): the
    relay passed them on, and then, the last event not being ``[DONE]``, added one of its
    own: a client storing its turn at each ``[DONE]`` stored it twice. Now the relay ends at
    the first ``[DONE]``, whatever comes after, in its read or later ones; a break after it is
    no failure (the answer was whole)."""
    after = [b'data: {"stray": "after [DONE]"}\n\n', _event([], NONSENSE), LEAKY]
    whole = b"".join([*STREAM[1:5], STREAM[6], DONE_EVENT, *after])
    end = whole.index(DONE_EVENT) + len(DONE_EVENT)
    at = end - 3 + cut  # a read ends in [DONE]'s blank line, or just after it
    for reads in (Reads(whole), Reads(whole[:at], whole[at:]), _BreaksAtTheEnd(whole[:end])):
        stream = SSEPassThrough(reads, ModelConfig(name="m"), include_usage=True)  # type: ignore[arg-type]
        relayed = [e for batch in [b async for b in stream.batches()] for e in batch]
        assert relayed[-1] == DONE_EVENT and relayed.count(DONE_EVENT) == 1, relayed[-3:]
        assert not any(b"stray" in e or b"error" in e for e in relayed)
        assert stream.failure is None and stream.usage == Usage(5, 4)


LEAKY = (
    b'data: {"error": {"message": "overloaded at http://10.1.2.3:8000/internal, '
    b'your key Bearer sk-upstream-SECRET", "type": "server_error"}}\n\n'
)


@pytest.mark.parametrize("cut", [1, 13, 10_000])
async def test_an_upstream_error_event_ends_the_relay_with_ours(cut: int) -> None:
    """An upstream's own error event mid-stream was relayed byte for byte (its text may hold
    its key or internal URLs), then chatgate's error event after it. Now the events before it
    go on, then chatgate's error event alone, and the relay ends: nothing after it is read."""
    whole = b"".join([*STREAM[1:4], LEAKY, *STREAM[4:]])
    pieces = [whole[i : i + cut] for i in range(0, len(whole), cut)]
    batches, stream = await _batches(pieces, include_usage=True)
    relayed = [e for batch in batches for e in batch]
    assert relayed[:3] == [*STREAM[1:3], _event([_text(WORDS[2])])]
    assert len(relayed) == 4 and relayed[-1].startswith(b'data: {"error"')
    assert b"SECRET" not in relayed[-1] and b"10.1.2.3" not in relayed[-1]
    assert stream.failure is not None and stream.failure.code == "upstream_error"
    assert "sent an error in its stream" in stream.failure.message
    # vLLM's older shape, and one as the stream's last bytes without its blank line.
    vllm = b'data: {"object": "error", "message": "bad", "code": 400}\n\n'
    for tail in (vllm, LEAKY.rstrip(b"\n")):
        batches, stream = await _batches([STREAM[1], tail], include_usage=True)
        relayed = [e for batch in batches for e in batch]
        assert relayed[0] == STREAM[1] and len(relayed) == 2, relayed
        assert stream.failure is not None and b"SECRET" not in relayed[1]
    # The word in a text is no error: its quotes are escaped.
    said = _event([_text('say "error" twice')])
    batches, stream = await _batches([STREAM[1], said, DONE_EVENT], include_usage=True)
    assert [e for batch in batches for e in batch] == [STREAM[1], said, DONE_EVENT]
    assert stream.failure is None


async def test_comments_before_the_first_event_are_not_its_start() -> None:
    """Keep-alive comments (``: PROCESSING``, as OpenRouter sends) before the first event
    counted as its first byte: the router judged the comment, not the first event, so an
    error that followed it was never a reason to move on. Now they are dropped; after the
    start a comment is relayed as it is."""
    reads = [b": PROCESSING\n\n", b": PROCESSING\n\n", LEAKY]
    batches, stream = await _batches(reads, include_usage=True)
    relayed = [e for batch in batches for e in batch]
    assert len(relayed) == 1 and relayed[0].startswith(b'data: {"error"')
    assert stream.failure is not None and stream.first_byte_at is None
    later = b": still here\n\n"
    batches, _ = await _batches([b": hi\n\n", STREAM[1], later, DONE_EVENT], include_usage=True)
    assert [e for batch in batches for e in batch] == [STREAM[1], later, DONE_EVENT]


async def test_a_first_event_that_is_no_completion_chunk_is_the_upstreams_failure() -> None:
    """A 200 streaming ``{"hello": "world"}`` was relayed and billed, while the same answer
    whole was a 502: now a stream's first event must have ``choices``."""
    batches, stream = await _batches([b'data: {"hello": "world"}\n\n', DONE_EVENT], True)
    relayed = [e for batch in batches for e in batch]
    assert len(relayed) == 1 and relayed[0].startswith(b'data: {"error"')
    assert stream.failure is not None and "did not answer with a stream" in stream.failure.message


async def test_a_large_event_in_many_reads_is_relayed_and_one_too_large_ends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event arriving in many reads is gathered (once, not joined again at every read);
    one beyond ``EVENT_MAX`` ends the relay with an error instead of growing without end."""
    big = _event([_text("x" * 300_000)])
    pieces = [STREAM[1]] + [big[i : i + 1000] for i in range(0, len(big), 1000)] + [DONE_EVENT]
    batches, stream = await _batches(pieces, include_usage=True)
    assert [e for batch in batches for e in batch] == [STREAM[1], big, DONE_EVENT]
    assert stream.completion_text == WORDS[0] + "x" * 300_000
    monkeypatch.setattr(sse, "EVENT_MAX", 100_000)
    batches, stream = await _batches(pieces, include_usage=True)
    relayed = [e for batch in batches for e in batch]
    assert relayed[0] == STREAM[1] and relayed[-1].startswith(b'data: {"error"')
    assert len(relayed) == 2 and stream.failure is not None
    assert "too large" in stream.failure.message


def _fielded(event: bytes, n: int) -> bytes:
    """``event`` with the field lines some servers put before its data."""
    return b"id: %d\nevent: message\n%s" % (n, event) if event.startswith(b"data:") else event


@pytest.mark.parametrize("include_usage", [True, False])
async def test_events_with_field_lines_relay_meter_and_end_as_without_them(
    include_usage: bool,
) -> None:
    """``event: message`` or ``id: N`` lines before each ``data:`` (and keep-alive comments
    between events) hid ``[DONE]`` and the usage chunk: the client got the upstream's usage
    and ``[DONE]``, then chatgate's own usage (completion 0) and a second ``[DONE]``, or an
    error event after ``[DONE]``, and the usage was not metered. Now the client gets the
    events as it would without the field lines (canonical), metered the same."""
    ping = b": ping\n\n"
    plain = [*STREAM[:4], ping, *STREAM[4:6], ping, *STREAM[6:]]
    whole = b"".join(_fielded(event, n) for n, event in enumerate(plain))
    for size in (1, 7, 97, len(whole)):
        pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
        batches, stream = await _batches(pieces, include_usage)
        relayed = [e for batch in batches for e in batch]
        # (a comment in the read of the first event is dropped with those before it)
        assert [e for e in relayed if e != ping] == _expected(include_usage), size
        assert relayed.count(DONE_EVENT) == 1 and relayed[-1] == DONE_EVENT, size
        assert stream.usage == Usage(5, 4) and stream.failure is None, size
        assert stream.completion_text == "".join(WORDS), size
        assert stream.envelope()["id"] == "c1", size


SECRET_JSON = LEAKY[6:-2]
ERROR_FORMS = [
    b"event: error\n" + LEAKY,
    b"id: 3\n" + LEAKY,
    b"data:  " + SECRET_JSON + b"\n\n",
    b"data:" + SECRET_JSON + b"\n\n",  # after "data: " was seen: no longer looked for
    b"data: " + SECRET_JSON.replace(b'"error"', b'"\\u0065rror"') + b"\n\n",
    b"data: " + SECRET_JSON.replace(b'"type"', b'\ndata: "type"') + b"\n\n",
    b"event: error\ndata: overloaded, Bearer sk-upstream-SECRET at http://10.1.2.3:8000\n\n",
]


@pytest.mark.parametrize("form", range(len(ERROR_FORMS)))
async def test_an_upstream_error_event_in_any_form_ends_the_relay_with_ours(form: int) -> None:
    """An upstream's error event was relayed verbatim, its key and internal URLs with it,
    unless it was written exactly ``data: {"error"...``: with an ``event:`` or ``id:`` line,
    two spaces or none after ``data:``, its key JSON-escaped, over two ``data:`` lines, or
    typed ``error`` with a text. Mid-stream, the events before it go on, then ours; as the
    first event, ours alone, before anything was relayed (the router falls back)."""
    error = ERROR_FORMS[form]
    for cut in (1, 10_000):
        whole = b"".join([STREAM[1], error, *STREAM[2:]])
        pieces = [STREAM[1], *(whole[i : i + cut] for i in range(len(STREAM[1]), len(whole), cut))]
        batches, stream = await _batches(pieces, include_usage=True)
        relayed = [e for batch in batches for e in batch]
        assert relayed[0] == STREAM[1] and len(relayed) == 2, (cut, relayed)
        assert b"SECRET" not in relayed[1] and b"10.1.2.3" not in relayed[1]
        assert stream.failure is not None and stream.failure.code == "upstream_error"
        assert "sent an error in its stream" in stream.failure.message
        batches, stream = await _batches([error, *STREAM[1:]], include_usage=True)
        relayed = [e for batch in batches for e in batch]
        assert len(relayed) == 1 and b"SECRET" not in relayed[0], relayed
        assert stream.failure is not None and stream.first_byte_at is None


@pytest.mark.parametrize("include_usage", [True, False])
async def test_cr_only_line_ends_relay_meter_and_end_as_lf_at_any_split(
    include_usage: bool,
) -> None:
    """``data: ...\\r\\r`` is SSE as ``\\n\\n`` is: a ``\\r`` held back at the end of a read (half
    of a ``\\r\\n``?) was relayed as a stray event, or at the stream's end left ``[DONE]``
    unrecognised (an error event after it, recorded as a failure, or a second ``[DONE]``)."""
    whole = b"".join(STREAM).replace(b"\n", b"\r")
    for at in range(len(whole) + 1):
        lines = [whole[:at], *re.split(b"(?<=\r)", whole[at:])]  # a read a line after it
        for pieces in ([whole[:at], whole[at:]], lines):
            pieces = [piece for piece in pieces if piece]
            batches, stream = await _batches(pieces, include_usage)
            relayed = [e for batch in batches for e in batch]
            assert relayed == _expected(include_usage), at
            assert stream.usage == Usage(5, 4) and stream.failure is None, at
