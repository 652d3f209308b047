"""Relaying an upstream's SSE stream (``/chat/completions`` with ``stream: true``).

Streams are passed through as they are read (the events of one read together, see
:meth:`~chatgate.backends.base.ChatStream.batches`), never buffered whole;
``stream_options.include_usage`` is always asked of the upstream so usage can be metered, and
the usage-only chunk is dropped when the client did not ask for it. A usage the gateway does
not believe (see :func:`~chatgate.backends.base.reported_tokens`) never reaches the client: a
usage-only chunk carrying one is dropped, one riding on a chunk with choices is replaced by
``null``; the API layer then sends its own count in its place.

A stream the upstream ends without ``[DONE]`` gets one: ``[DONE]`` when its answer had finished
(a finish reason came), else an ``upstream_error`` event, as for a connection that broke. Nothing
follows ``[DONE]``: what an upstream sends after it (some do) is read to the end, so that the
connection is kept, and dropped, and a break or a timeout after it is no failure.

The events are relayed without being parsed, with three exceptions that cost a byte search per
read: an upstream's own error event (``data: {"error": ...}``, its key JSON-escaped or not, or
an event typed ``error``: it may carry its key or its internal URLs) ends the relay with
chatgate's error event in its place; comments (``: ...``,
keep-alives) before the first event are dropped, so that it is the first event the router judges
and the first-byte limit waits for; and a first event that is not a completion chunk (no
``choices``) is the upstream's failure, as a whole answer without them is. An event that grows
beyond :data:`EVENT_MAX` bytes ends the relay; one that arrives in many reads is gathered in
time linear in its size. Events are looked at in their canonical form, ``data: ...\n\n``: one
in another (``event:``/``id:``/``retry:`` lines, comments beside its data, several ``data:``
lines, no space after ``data:``) is rewritten so (:func:`split_events`); a read of canonical
events costs a memchr and a startswith per event to tell it is one, and is not parsed.

One watchdog timer per stream re-arms itself lazily (at most once per idle period, never per
chunk) and closes the upstream response when a limit passes (first byte, idle, total), which
ends the relay with an SSE ``upstream_timeout`` error event.
"""

from __future__ import annotations

import asyncio
import operator
import re
import time
from collections.abc import AsyncGenerator
from itertools import repeat
from typing import Any

import orjson

from chatgate import errors
from chatgate.backends.base import DONE_EVENT, ChatStream, Usage
from chatgate.backends.deployment import Timeouts
from chatgate.backends.http1 import StreamBody, UpstreamConnectionError
from chatgate.backends.upstream_errors import Phase, timeout_error
from chatgate.settings import ModelConfig

_UNPARSED_MAX = 256  # events held before their text is extracted anyway
EVENT_MAX = 16 << 20
"""The largest event relayed (a chunk of an answer is a few hundred bytes)."""
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a reason, not null
_CRLF = re.compile(rb"\r\n|\r")
_NO_SPACE = re.compile(rb"^data:(?=[{\[])", re.MULTILINE)  # at a line's start, never in JSON
_ESCAPED = re.compile(rb"\\u00(?:6[5fF]|72)")  # e, o, r JSON-escaped: "error" spelt otherwise


def split_events(data: bytes, spaced: bool = False) -> tuple[list[bytes], bytes]:
    """Complete SSE events in ``data`` (each ending in a blank line), and the rest.

    Events come out canonical: ``data: <its data>\n\n``, one line, with ``\n`` line ends
    and ``data: `` with its space (optional in SSE, and left out by some servers: usage,
    ``[DONE]`` and error events are looked for with it; ``spaced``: the upstream is known to
    write it, nothing to look for). An event in another form (``event:``, ``id:`` or
    ``retry:`` lines, comments beside its data, several ``data:`` lines) is rewritten so
    (:func:`_canonical`); one of comments alone stays a comment; blank lines between events
    are skipped. A read of canonical events costs a memchr and a startswith per event to tell.
    """
    events, rest, _ = _split(data, spaced)
    return events, rest


def _split(data: bytes, spaced: bool) -> tuple[list[bytes], bytes, bool]:
    """:func:`split_events`, and whether the events came canonical (none was rewritten)."""
    hold = b""
    if b"\r" in data:
        if data.endswith(b"\r"):  # maybe half of a \r\n: decide with the next read
            data, hold = data[:-1], b"\r"
        data = _CRLF.sub(b"\n", data)
    if not spaced and (b"data:{" in data or b"data:[" in data):
        data = _NO_SPACE.sub(b"data: ", data)
    parts = data.split(b"\n\n")
    rest = parts.pop()
    rest = (rest if rest.strip(b"\n") else b"") + hold
    if not parts:
        return [], rest, True
    # Canonical when no event holds a line end but its last two (so one line each), and each
    # starts with "data: ". Both looked at in C: a memchr over the events joined (a byte count
    # of the read costs several times more), and startswith mapped over them.
    if b"\n" not in b"".join(parts) and all(map(bytes.startswith, parts, repeat(b"data: "))):
        return list(map(operator.add, parts, repeat(b"\n\n"))), rest, True
    return [event for part in parts if (event := _canonical(part)) is not None], rest, False


def _canonical(part: bytes) -> bytes | None:
    """One event (its lines, without the blank line that ends it) as ``data: ...\n\n``, as
    SSE reads it: the ``data`` fields joined by ``\n``, other fields (``event``, ``id``,
    ``retry``) and comments left out. Its data of several lines stays one line when it is
    JSON (where a line end is only whitespace); otherwise it is written as several ``data:``
    lines. An event of comments alone is kept as those comments (a keep-alive), one with
    neither data nor comments (an ``id:`` alone) is nothing to relay: ``None``. An event
    typed ``error`` is the upstream's error whatever its data: it becomes
    ``{"error": <its data>}``, which the relay then replaces with its own."""
    if part.startswith(b"data: ") and b"\n" not in part:
        return part + b"\n\n"
    data: list[bytes] = []
    comments: list[bytes] = []
    kind = b""
    for line in part.split(b"\n"):
        if line.startswith(b":"):
            comments.append(line)
            continue
        if not line:
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            kind = value
    if not data:
        return b"\n".join(comments) + b"\n\n" if comments else None
    text = b"\n".join(data)
    if kind == b"error" and not _is_error(decoded := _json(text)):
        text = orjson.dumps(
            {"error": text.decode(errors="replace") if decoded is _NO_JSON else decoded}
        )
    if b"\n" in text:
        if _json(text) is _NO_JSON:  # SSE's own form of data of several lines
            return b"".join([b"data: " + line + b"\n" for line in data]) + b"\n"
        text = text.replace(b"\n", b" ")  # in JSON, outside its strings: whitespace
    return b"data: " + text + b"\n\n"


_NO_JSON = object()


def _json(text: bytes) -> Any:
    """``text`` decoded as JSON, or ``_NO_JSON``."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NO_JSON


def _is_error(chunk: Any) -> bool:
    """Whether a decoded event is an upstream's error: ``{"error": ...}``, or vLLM's old
    ``{"object": "error"}``."""
    return isinstance(chunk, dict) and bool(chunk.get("error") or chunk.get("object") == "error")


def _error_at(events: list[bytes]) -> int | None:
    """The index of the first of ``events`` that is an upstream's error (:func:`_is_error`),
    if any: only events that may name ``"error"`` are decoded, those holding the word in
    quotes (a JSON string holding it has its quotes escaped, so only a key or a value
    matches) or an escaped letter of it (``"\\u0065rror"`` is ``"error"`` too)."""
    for i, event in enumerate(events):
        if not _may_name_error(event):
            continue
        if event.startswith(b"data: ") and _is_error(_json(event[6:])):
            return i
    return None


def _may_name_error(data: bytes) -> bool:
    """Whether ``data`` may hold an error event: the word in quotes, or one of its letters
    JSON-escaped (no encoder escapes an ASCII letter, so ``\\u00`` then the regular
    expression is a look only at text that escapes others). The backslash is looked for
    first: a memchr, where ``\\u00`` is a slow search through the digits of a chunk."""
    return b'"error"' in data or (
        b"\\" in data and b"\\u00" in data and _ESCAPED.search(data) is not None
    )


def _is_object(event: bytes) -> bool:
    """Whether an event's data is a JSON object (``data: {``, or with spaces before it)."""
    return event.startswith(b"data: {") or (
        event.startswith(b"data: ") and event[6:].lstrip().startswith(b"{")
    )


def _writes_space(chunk: bytes) -> bool | None:
    """Whether an upstream writes ``data: `` with its space, told by the first ``data:`` at a
    line's start of a read as it came (never of text already normalised); ``None`` when the
    read holds none to tell by."""
    at = 0 if chunk.startswith(b"data:") else chunk.find(b"\ndata:") + 1
    if not at and not chunk.startswith(b"data:"):
        return None
    after = chunk[at + 5 : at + 6]
    return after == b" " if after else None


def _usages(data: bytes) -> int:
    """How many ``"usage"`` keys in ``data`` are not followed by ``null`` as JSON encoders
    write it (``:null``, ``: null``): byte counts, no regular expression over the read. A null
    written otherwise counts as a usage object too: its event is then looked at, needlessly
    but safely (:meth:`SSEPassThrough._keep` decides)."""
    found = data.count(b'"usage"')
    if found:
        found -= data.count(b'"usage":null') + data.count(b'"usage": null')
    return found


def _plain(events: list[bytes], data: bytes) -> int:
    """How many of ``events`` (split from ``data``), from the start, carry no usage object.

    Counted over the whole read in C, then from its end back: a usage chunk comes last but
    for ``[DONE]``, so a read holding one looks at two or three events, not at all of them.
    """
    usages = _usages(data)
    plain = len(events)
    while usages > 0 and plain > 0:  # (one in a partial event left over: all are looked at)
        plain -= 1
        usages -= _usages(events[plain])
    return plain


_SLACK = 0.001  # timer handles may fire up to the loop's clock resolution early


class SSEPassThrough(ChatStream):
    """Relays an upstream SSE response as it is read, noting usage and generated text.

    A transport failure or a passed time limit ends the relay with one
    ``data: {"error": ...}`` event; ``failure`` then holds that error (the router uses it to
    retry when nothing has reached the client yet).
    """

    def __init__(
        self,
        resp: StreamBody,
        model: ModelConfig,
        *,
        include_usage: bool,
        timeouts: Timeouts | None = None,
        started: float | None = None,
    ) -> None:
        super().__init__()
        self._resp = resp
        self._model = model
        self._include_usage = include_usage
        self.failure: errors.APIError | None = None
        self._unparsed: list[bytes] = []  # events whose text is not extracted yet
        self._first: bytes | None = None  # the first chunk: its id, created, model...
        self._loop = asyncio.get_running_loop()
        self._timeouts = timeouts
        self._reading_since: float | None = None  # loop time a read of the upstream began
        self._expired: Phase | None = None
        self._timer: asyncio.TimerHandle | None = None
        if timeouts is not None:
            begin = self._loop.time() if started is None else started
            self._first_at = begin + min(timeouts.first_byte, timeouts.total)
            self._total_at = begin + timeouts.total
            self._timer = self._loop.call_at(self._deadline()[0], self._check)

    # -- the watchdog: one timer per stream, re-armed lazily ------------------------------------

    def _deadline(self) -> tuple[float, Phase]:
        """The next instant a limit may pass, and which limit that is."""
        assert self._timeouts is not None
        phase: Phase
        if self.first_byte_at is None:
            when, phase = self._first_at, "first_byte"
        elif self._reading_since is not None:
            when, phase = self._reading_since + self._timeouts.idle, "idle"
        else:  # the client is slow to take events: that is not the upstream's idleness
            when, phase = self._loop.time() + self._timeouts.idle, "idle"
        if self._total_at <= when:
            return self._total_at, "total"
        return when, phase

    def _check(self) -> None:
        self._timer = None
        when, phase = self._deadline()
        if self._loop.time() + _SLACK >= when:
            self._expired = phase
            self._resp.close()  # the pending read raises UpstreamConnectionError
        else:
            self._timer = self._loop.call_at(when, self._check)

    def _rearm(self) -> None:
        """Set the timer for the next deadline now. Moved later, a limit waits for the timer
        (lazily); moved earlier (from the first-byte limit to a shorter idle one), it must not."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline()[0], self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> errors.UpstreamTimeout:
        assert self._timeouts is not None and self._expired is not None
        limits = {
            "first_byte": min(self._timeouts.first_byte, self._timeouts.total),
            "idle": self._timeouts.idle,
            "total": self._timeouts.total,
            "connect": self._timeouts.connect,
        }
        return timeout_error(self._model, self._expired, limits[self._expired])

    # -- relaying ---------------------------------------------------------------------------

    async def _batches(self) -> AsyncGenerator[list[bytes], None]:
        # The upstream is read in whatever chunks arrive (not line by line): one read often
        # holds many events, which are split here and handed on together.
        rest = b""
        more: list[bytes] = []  # reads that continue ``rest`` without ending a line
        held = 0  # bytes in ``rest`` and ``more``
        spaced: bool | None = None  # whether its "data:" has a space: seen on the first read
        read = self._resp.readany
        clock = self._loop.time
        tail: list[bytes] = []  # the last events relayed: is the stream done when it ends?
        done = False  # [DONE] relayed: the rest is read to its end (the connection is kept)
        try:
            ending = False
            while not ending:
                # Idle time counts only while we wait for the upstream, not for the client.
                self._reading_since = clock()
                chunk = await read()
                self._reading_since = None
                if done:  # nothing follows [DONE]: what an upstream sends after it is dropped
                    if chunk:
                        continue
                    break
                if not chunk:
                    if not rest and not more:
                        break
                    # The end of the stream ends the event in hand, and the line in hand (its
                    # end may be a \r held back): read as the others, as if a blank line came.
                    chunk, ending = b"\n\n", True
                if rest and b"\n" not in chunk and b"\r" not in chunk:
                    # The event in hand goes on and cannot end in this read: kept aside, not
                    # joined and split again at every read (quadratic in the event's size).
                    more.append(chunk)
                    held += len(chunk)
                    if held > EVENT_MAX:
                        yield [self._failed(self._broken("sent an event too large to relay"))]
                        return
                    continue
                if more:
                    data = b"".join([rest, *more, chunk])
                    more.clear()
                else:
                    data = rest + chunk if rest else chunk
                if spaced is None:  # an upstream writes it one way: looked at until seen
                    spaced = _writes_space(chunk)
                events, rest, canonical = _split(data, bool(spaced))
                held = len(rest)
                if held > EVENT_MAX:
                    yield [self._failed(self._broken("sent an event too large to relay"))]
                    return
                if self.first_byte_at is None:  # keep-alive comments before it: nothing yet
                    events = [e for e in events if not e.startswith(b":")]
                if b"[DONE]" in data and DONE_EVENT in events:  # once a stream
                    del events[events.index(DONE_EVENT) + 1 :]
                    done = True
                failure = None
                if not canonical or _may_name_error(data):
                    at = _error_at(events)
                    if at is not None:  # its text may hold its key or URLs: ours instead
                        failure = self._broken("sent an error in its stream")
                        events = events[:at]
                if self._first is None:
                    self._first = next((e for e in events if _is_object(e)), None)
                    if self._first is not None and b'"choices"' not in self._first:
                        failure = self._broken("did not answer with a stream of completions")
                        events = []
                # Events before the first that may carry a usage object (usually all of them,
                # or all but the last two) need no look: held as they are, no step per event.
                plain = _plain(events, data)
                if plain:
                    if len(self._unparsed) + plain > _UNPARSED_MAX:
                        self._parse_text()  # a long stream: keep memory flat
                    self._unparsed += events[:plain] if plain < len(events) else events
                if plain < len(events):
                    looked = [out for e in events[plain:] if (out := self._keep(e)) is not None]
                    events = events[:plain] + looked if plain else looked
                if failure is not None:  # the events before it, then ours; the relay ends
                    yield [*events, self._failed(failure)]
                    return
                if not events:
                    continue
                if self.first_byte_at is None:
                    self.first_byte_at = time.perf_counter()
                    self._rearm()  # the first-byte limit is met: the idle limit is next
                tail = events[-3:] if len(events) > 2 else (tail + events)[-3:]
                yield events
            if not tail or tail[-1] != DONE_EVENT:
                yield [self._unended(tail)]
        except (TimeoutError, UpstreamConnectionError):
            if done:  # broken or timed out after [DONE]: the answer was whole
                return
            if self._expired is not None:
                yield [self._failed(self._timeout())]
            else:
                yield [self._failed(self._broken("broke off the stream"))]
        finally:
            self._reading_since = None
            self._stop_timer()
            self._resp.release()

    def _unended(self, tail: list[bytes]) -> bytes:
        """The event for a stream the upstream ended without ``[DONE]``: ``[DONE]`` itself
        when its answer had finished (a finish reason came), else an error event (``failure``
        set): clients wait for one or the other, and an answer cut short is no answer."""
        if any(_FINISHED.search(event) for event in tail):
            return DONE_EVENT
        return self._failed(self._broken("ended the stream before its answer"))

    def _broken(self, what: str) -> errors.UpstreamError:
        return errors.UpstreamError(f"The upstream for model `{self._model.name}` {what}.")

    def _failed(self, failure: errors.APIError) -> bytes:
        """The error event that ends the relay with ``failure`` (kept in ``failure``)."""
        self.failure = failure
        return b"data: " + failure.body() + b"\n\n"

    def _keep(self, event: bytes) -> bytes | None:
        """Note usage and text of one event; the event to relay, or ``None`` for a usage-only
        chunk nobody asked for or whose usage is refused.

        Only an event that carries a usage object is parsed here; the others are kept as
        they are and parsed for their text only if it is ever asked for (a stream cut off
        before its usage came: :attr:`completion_text`), so a normal stream parses one
        event, not every one.
        """
        if not _is_object(event):
            return event
        if self._first is None:
            self._first = event
        if len(self._unparsed) >= _UNPARSED_MAX:
            self._parse_text()  # a long stream: keep memory flat, parse what is held
        self._unparsed.append(event)
        if b'"usage"' not in event or _NULL_USAGE.search(event):
            return event
        try:
            chunk = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict) or chunk.get("usage") is None:
            return event
        usage = Usage.from_openai(chunk["usage"])
        if usage is not None:
            self.usage = usage
        if chunk.get("choices"):
            if usage is None:  # refused: the client is not shown what is not billed
                return b"data: " + orjson.dumps({**chunk, "usage": None}) + b"\n\n"
            return event
        if usage is None or not self._include_usage:
            self._unparsed.pop()  # dropped: nothing in it to count
            return None
        return event

    def envelope(self) -> dict[str, Any]:
        """The first chunk's ``id``, ``object``, ``created``, ``model`` and
        ``system_fingerprint``, as the upstream sent them."""
        envelope = super().envelope()
        try:
            first = orjson.loads(self._first[6:]) if self._first is not None else None
        except orjson.JSONDecodeError:
            first = None
        if isinstance(first, dict):
            for field in ("id", "object", "created", "model", "system_fingerprint"):
                if field in first:
                    envelope[field] = first[field]
        return envelope

    @property
    def completion_text(self) -> str:
        """The text generated so far (content and tool-call arguments)."""
        self._parse_text()
        return "".join(self._text)

    def _parse_text(self) -> None:
        for event in self._unparsed:
            try:
                chunk = orjson.loads(event[6:])
                choices = chunk.get("choices") if isinstance(chunk, dict) else None
                if not choices or not isinstance(choices[0], dict):
                    continue
                delta = choices[0].get("delta") or {}
                content = delta.get("content")
                if isinstance(content, str):
                    self._text.append(content)
                for call in delta.get("tool_calls") or ():
                    args = (call.get("function") or {}).get("arguments")
                    if isinstance(args, str):
                        self._text.append(args)
            # A chunk of another shape (choices, delta or a tool call not an object) has no
            # text to count; it must not end the relay, nor the metering of what was sent.
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
                continue
        self._unparsed.clear()

    async def aclose(self) -> None:
        self._stop_timer()
        self._resp.close()
        await self._close_batches()


__all__ = ["SSEPassThrough", "split_events"]
