"""Splitting an upstream's SSE bytes into events, as they arrive in arbitrary chunks."""

from __future__ import annotations

from chatgate.backends.sse import split_events

STREAM = b'data: {"a":1}\n\ndata: {"b":2}\n\n: keep-alive\n\n\n\ndata: [DONE]\n\n'
EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b": keep-alive\n\n", b"data: [DONE]\n\n"]


def feed(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    out: list[bytes] = []
    rest = b""
    for chunk in chunks:
        events, rest = split_events(rest + chunk)
        out += events
    return out, rest


def test_any_chunking_gives_the_same_events() -> None:
    for size in (1, 2, 3, 7, 16, len(STREAM)):
        chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
        assert feed(chunks) == (EVENTS, b"")


def test_crlf_upstreams_are_normalised_even_split_between_cr_and_lf() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    for size in (1, 5, 13, len(crlf)):
        chunks = [crlf[i : i + size] for i in range(0, len(crlf), size)]
        assert feed(chunks) == (EVENTS, b"")


def test_an_unfinished_event_stays_for_the_next_read() -> None:
    events, rest = split_events(b'data: {"a":1}\n\ndata: {"b"')
    assert events == [b'data: {"a":1}\n\n'] and rest == b'data: {"b"'


def test_data_without_its_space_gets_it_and_json_text_is_left_alone() -> None:
    raw = b'data:{"c":"\\ndata:{x} data:[y]"}\n\ndata:[DONE]\n\n'
    assert feed([raw[:5], raw[5:]]) == (
        [b'data: {"c":"\\ndata:{x} data:[y]"}\n\n', b"data: [DONE]\n\n"],
        b"",
    )


def test_events_in_another_form_come_canonical() -> None:
    """Field lines (``event:``, ``id:``, ``retry:``), comments beside the data, odd spacing and
    data over several lines are SSE as much as ``data: ...``: each event comes out as the one
    ``data: ...`` line a client reads from it, a comment alone stays a comment, an ``id:``
    alone is nothing."""
    raw = (
        b'event: message\nid: 1\ndata: {"a":1}\n\n'
        b'id: 2\n: note\ndata:{"b":2}\n\n'
        b"retry: 500\n\n"
        b": ping\n\n"
        b'data: {"c":\ndata:  [3]}\n\n'
        b"data: two\ndata: lines\n\n"
        b"event: message\ndata: [DONE]\n\n"
    )
    events = [
        b'data: {"a":1}\n\n',
        b'data: {"b":2}\n\n',
        b": ping\n\n",
        b'data: {"c":  [3]}\n\n',
        b"data: two\ndata: lines\n\n",
        b"data: [DONE]\n\n",
    ]
    for size in (1, 2, 5, len(raw)):
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert feed(chunks) == (events, b""), size
    assert split_events(b'data:{"b":2}\n\n', spaced=True) == ([b'data: {"b":2}\n\n'], b"")


def test_cr_only_line_ends_split_anywhere_give_the_same_events() -> None:
    """A bare ``\\r`` ends a line as ``\\n`` does; one held back at the end of a read (half of a
    ``\\r\\n``?) is decided by the next read, or by the stream's end (the relay then reads the
    rest as if a blank line came), whatever byte the read ends at."""
    cr = STREAM.replace(b"\n", b"\r")
    for at in range(len(cr) + 1):
        for size in (1, 3, len(cr)):
            chunks = [cr[:at]] + [cr[i : i + size] for i in range(at, len(cr), size)]
            events, rest = feed(chunks)
            assert events + split_events(rest + b"\n\n")[0] == EVENTS, (at, size)
