"""A lean HTTP/1.1 client for an upstream's answers: chat completions, whole or streamed, and
embeddings.

Keep-alive connections to one origin, kept per process; responses parsed by ``httptools``
(llhttp, the parser of Node.js and uvicorn). Probes stay on aiohttp (:mod:`.openai_compat`).
A stream's body is handed out as it arrives (:class:`StreamBody`), with back-pressure: past
:data:`_HIGH_WATER` unread bytes the connection stops reading until the reader catches up.

Why not aiohttp: an aiohttp ``ClientSession.post`` + ``read`` runs ~3,000 Python
bytecodes of request and response objects, header multidicts, payload registries and stream
readers per call, a third of a whole proxied request in chatgate (measured with
``bench/instr.py``; ``docs/benchmarks.md``). This client writes one buffer and collects the
answer in three parser callbacks.

What it does, as aiohttp did for these calls: one connection per request in flight, reused
when the upstream keeps it alive, dropped after :data:`IDLE_TIMEOUT` idle (an upstream or a
NAT may forget it silently); a cap on the requests in flight (a semaphore, held by a stream
until it ends), a request waiting for a slot counting the wait in the connect timeout; TLS for
``https`` with the system's certificates; ``Content-Length``, chunked and read-until-close
bodies; a gzip or deflate body decoded (none is asked for). A POST is sent twice only when a
kept-alive connection is closed with not a byte of its answer within :data:`RESEND_WINDOW` of
sending it: the upstream's keep-alive timeout running out as the request went out (the
router's retry would resend it anyway, after its backoff and as a failure of the upstream).
Any other connection lost before the answer is an error for the caller (the router retries,
if its retries allow, and counts a failure): an upstream that dies later has worked on the
request, and was not sent it twice behind the router's back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httptools

from chatgate.settings import DEFAULT_UPSTREAM_MAX_ANSWER_BYTES

IDLE_TIMEOUT = 15.0
"""Seconds an idle connection is kept for reuse (aiohttp's keep-alive default)."""
RESEND_WINDOW = 0.5
"""Seconds after sending within which a kept connection closed unanswered is the keep-alive
race (the upstream's close was on its way as the request went out): about one round trip."""
MAX_ANSWER = DEFAULT_UPSTREAM_MAX_ANSWER_BYTES
"""Bytes of a whole answer (as read, and once decoded) a pool takes by default."""
STREAM_INFLATE_MAX = 64 * 1024 * 1024
"""Bytes one read of a compressed stream may decode to (a read is at most a few hundred
kilobytes: 256 times that, far above what text compresses to)."""


class UpstreamConnectionError(Exception):
    """The upstream could not be reached, or broke the connection before a whole answer."""

    def __init__(self, message: str, *, answered: bool = False, sent: bool = True) -> None:
        super().__init__(message)
        self.answered = answered  # the status line had arrived (a broken answer, not no answer)
        self.sent = sent  # a connection was made, and the request went out on it


class AnswerTooLarge(UpstreamConnectionError):
    """An answer larger than the pool's ``max_answer`` bytes, as read or once decoded; its
    connection is dropped."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an answer larger than {limit} bytes", answered=True)
        self.limit = limit


class ConnectTimeout(UpstreamConnectionError):
    """No connection (nor a free slot under the cap) within the connect timeout."""


class AnswerTimeout(UpstreamConnectionError):
    """No status line by the first-byte deadline (``phase`` ``first_byte``), or no whole
    answer by the total one (``total``)."""

    def __init__(self, phase: Literal["first_byte", "total"]) -> None:
        super().__init__(f"no answer by the {phase} deadline", answered=phase == "total")
        self.phase = phase


@dataclass(slots=True)
class Answer:
    """A whole response: status, headers (names lower-cased; the last of a name wins), body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a transport, its parser, and the answer being read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_answer: int = MAX_ANSWER) -> None:
        self.loop = loop  # its loop, kept: asyncio.get_running_loop() is a system call in 3.11
        self.max_answer = max_answer  # bytes of a whole answer read at most (head included)
        self.received = 0  # bytes read of the answer in flight, until it is a stream
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer | StreamBody] | None = None
        self.headers: dict[str, str] = {}
        # The pieces of the body read so far (one per chunk of a chunked body, often many a
        # read); the parser's on_body is this list's append, a call into C with no Python
        # frame. A stream's pieces are handed to it together once a read is parsed.
        self.body: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self.body.append
        self.parser = httptools.HttpResponseParser(self)  # after on_body: it looks it up once
        self.status_seen = False
        self.timer: asyncio.TimerHandle | None = None  # the answer's deadline
        self.total_at = 0.0  # loop time by which the whole answer must be in
        self.until_close = False  # a body without length: it ends with the connection
        self.closed = False
        self.heard = False  # a byte of the answer to the request in flight has arrived
        self.lost_unheard = False  # the upstream closed it with not a byte of that answer
        self.idle_since = 0.0
        self.streaming = False  # the request in flight wants its 2xx body as it arrives
        self.stream: StreamBody | None = None  # that body, once its headers are in

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP (or TLS) transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None and self.stream is None:  # bytes on an idle connection
            self.close()  # nothing we could trust after them
            return
        self.heard = True
        if self.stream is None:  # a whole answer (a stream's reads are held back instead)
            self.received += len(data)
            if self.received > self.max_answer:
                self._fail(AnswerTooLarge(self.max_answer))
                self.close()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamConnectionError("invalid HTTP answer", answered=True))
            self.close()
            return
        if self.body and self.stream is not None:
            self._feed_stream(self.stream)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_unheard = self.waiter is not None and not self.heard
        if self.until_close and (self.waiter is not None or self.stream is not None):
            self.on_message_complete()  # a body that runs to the end of the connection
        else:
            self._fail(
                UpstreamConnectionError("connection closed before the answer", answered=False)
            )

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.status_seen = True  # the first-byte deadline is met: _expire moves on to total

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        headers = self.headers
        self.until_close = "content-length" not in headers and (
            "chunked" not in headers.get("transfer-encoding", "").lower()
        )
        status = self.parser.get_status_code()
        if self.streaming and 200 <= status < 300:  # the body is handed out as it arrives
            self._stop_timer()  # from here the reader's watchdog keeps the time (.sse)
            self.stream = StreamBody(self, status, headers)
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(self.stream)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # an interim answer (103): the real one follows
            self.headers, self.status_seen = {}, False
            self.body.clear()
            return
        stream = self.stream
        if stream is not None:
            if self.body:
                self._feed_stream(stream)
            keep = not self.until_close and self.parser.should_keep_alive()
            self.headers, self.status_seen, self.until_close = {}, False, False
            self.stream, self.streaming = None, False
            stream.feed_eof(keep)
            return
        answer = Answer(self.parser.get_status_code(), self.headers, b"".join(self.body))
        keep = not self.until_close and self.parser.should_keep_alive()
        self.headers, self.status_seen, self.until_close = {}, False, False
        self.body.clear()
        self._stop_timer()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        if not keep:
            self.close()

    # ours

    def _feed_stream(self, stream: StreamBody) -> None:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        stream.feed(data)

    def _fail(self, exc: UpstreamConnectionError) -> None:
        self._stop_timer()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            exc.answered = exc.answered or self.status_seen
            waiter.set_exception(exc)
        stream, self.stream = self.stream, None
        if stream is not None:
            exc.answered = True
            stream.fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(
        self, data: bytes, first_byte_at: float, total_at: float, streaming: bool = False
    ) -> asyncio.Future[Answer | StreamBody]:
        """Write a request; its :class:`Answer` (or, ``streaming``, a 2xx's
        :class:`StreamBody` as soon as its headers are in), failed with
        :class:`AnswerTimeout` past a deadline.

        One timer, at the first-byte deadline, moved on to the total one only if it fires
        after the status line (a plain timer handle: cheaper than a task-cancelling timeout).
        """
        assert self.transport is not None
        loop = self.loop
        self.streaming = streaming
        self.heard = False
        self.received = 0
        self.waiter = loop.create_future()
        self.total_at = total_at
        self.timer = loop.call_at(first_byte_at, self._expire)
        self.transport.write(data)
        return self.waiter

    def _expire(self) -> None:
        self.timer = None
        if self.status_seen:
            loop = self.loop
            if loop.time() < self.total_at:
                self.timer = loop.call_at(self.total_at, self._expire)
                return
        self._fail(AnswerTimeout("total" if self.status_seen else "first_byte"))
        self.close()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_HIGH_WATER = 256 * 1024
"""Bytes of a stream held unread before its connection stops reading (back-pressure)."""


class StreamBody:
    """A 2xx answer read as it arrives (an SSE stream): :meth:`readany` until ``b""``, then
    :meth:`release`; or :meth:`close` to drop it. It holds its connection and its slot under
    the upstream's cap until one of the two, and gives both back once.

    The answer's deadlines end with its headers: from there the reader keeps the time (the
    stream's watchdog in :mod:`.sse` closes it when a limit passes; a pending read raises).
    """

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._pool: Pool | None = None
        self._slots: asyncio.Semaphore | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._keep = False  # the connection may serve another request after this answer
        self._error: UpstreamConnectionError | None = None
        self._finished = False
        self._decoder: Any = None  # a zlib decompressor, for a compressed stream
        coding = headers.get("content-encoding", "").strip().lower()
        if coding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = zlib.decompressobj()
        elif coding not in ("", "identity"):
            self._error = UpstreamConnectionError(f"a stream in an unknown coding ({coding})")

    def _attach(self, pool: Pool, slots: asyncio.Semaphore | None) -> None:
        self._pool, self._slots = pool, slots

    # fed by the connection

    def feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data, STREAM_INFLATE_MAX)
            except zlib.error:
                self.fail(UpstreamConnectionError("an undecodable compressed stream"))
                self._conn.close()
                return
            if self._decoder.unconsumed_tail:  # a bomb: far more than any text compresses to
                self.fail(AnswerTooLarge(STREAM_INFLATE_MAX))
                self._conn.close()
                return
        if data:
            self._chunks.append(data)
            self._size += len(data)
            transport = self._conn.transport
            if self._size > _HIGH_WATER and not self._paused and transport is not None:
                self._paused = True
                transport.pause_reading()
            self._wake()

    def feed_eof(self, keep: bool) -> None:
        if self._decoder is not None:
            self.feed(b"")
            tail = self._decoder.flush()
            self._decoder = None
            if tail:
                self.feed(tail)
        self._eof, self._keep = True, keep
        self._wake()

    def fail(self, exc: UpstreamConnectionError) -> None:
        exc.answered = True
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # read by the caller

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for some); ``b""`` at the end.
        Raises :class:`UpstreamConnectionError` when the stream broke or was closed."""
        while True:
            if self._chunks:
                chunks, self._chunks, self._size = self._chunks, [], 0
                if self._paused:
                    self._paused = False
                    if self._conn.transport is not None:
                        self._conn.transport.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Drop the stream and its connection (its end unread); a pending read raises.

        Nothing once the stream was released: its connection is back in the pool, maybe
        serving another request already (the relay closes every stream it ends, read to
        the end or not).
        """
        if self._finished:
            return
        self.fail(UpstreamConnectionError("stream closed"))
        self._conn.close()
        self._finish()

    def release(self) -> None:
        """Done with the stream: its connection is kept for reuse when the answer ended
        cleanly and may be kept, closed otherwise."""
        if self._finished:
            return
        if self._eof and self._keep and self._error is None and self._pool is not None:
            self._pool._keep_idle(self._conn)
        else:
            self._conn.close()
        self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._slots is not None:
                self._slots.release()


class Pool:
    """Connections to the origin of ``base_url``, for ``POST``s of JSON bodies."""

    def __init__(
        self,
        base_url: str,
        *,
        slots: asyncio.Semaphore | None = None,
        connect_timeout: float = 5.0,
        idle_timeout: float = IDLE_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        max_answer: int = MAX_ANSWER,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._prefix = url.path.rstrip("/")
        self._host_header = f"Host: {url.netloc.rpartition('@')[2]}\r\n".encode("latin-1")
        # Credentials in the URL (``http://user:pass@host``) are sent as Basic auth, as aiohttp
        # did; never beside another Authorization header.
        self._basic: str | None = None
        if url.username is not None:
            userinfo = f"{unquote(url.username)}:{unquote(url.password or '')}"
            self._basic = "Basic " + base64.b64encode(userinfo.encode("latin-1")).decode()
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._slots = slots  # the upstream's connection cap (shared with its streams), if any
        self._max_answer = max_answer  # bytes of a whole answer, as read and once decoded
        self._closed = False

    def head(self, path: str, headers: dict[str, str]) -> bytes:
        """The request line and the fixed headers of ``POST path`` (a call adds the length)."""
        lines = [f"POST {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._host_header]
        if self._basic is not None:
            if any(name.lower() == "authorization" for name in headers):
                raise ValueError("credentials in the URL and an Authorization header together")
            headers = {**headers, "Authorization": self._basic}
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError("a header may not contain a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Accept-Encoding: identity\r\n")
        return b"".join(lines)

    async def post(self, head: bytes, body: bytes, first_byte_at: float, total_at: float) -> Answer:
        """Send ``head`` (from :meth:`head`) with ``body``; the whole answer.

        Deadlines are loop times: the status line by ``first_byte_at`` (waiting for a slot
        and connecting count in it, each also within the connect timeout), the whole answer
        by ``total_at``. Raises :class:`ConnectTimeout`, :class:`AnswerTimeout` or
        :class:`UpstreamConnectionError`; a cancellation drops the connection, whose answer
        is then unknown.
        """
        answer = await self._request(head, body, first_byte_at, total_at, False)
        assert isinstance(answer, Answer)
        return answer

    async def open(
        self, head: bytes, body: bytes, first_byte_at: float, total_at: float
    ) -> Answer | StreamBody:
        """As :meth:`post`, but a 2xx answer comes as soon as its headers are in, its body
        to be read as it arrives (:class:`StreamBody`, which then holds the connection and
        the slot); any other answer comes whole, within ``total_at``."""
        return await self._request(head, body, first_byte_at, total_at, True)

    async def _request(
        self, head: bytes, body: bytes, first_byte_at: float, total_at: float, streaming: bool
    ) -> Answer | StreamBody:
        slots = self._slots
        if slots is not None:
            if slots.locked():  # wait for a free slot, within the deadlines
                async with self._connect_deadline(first_byte_at, "no free connection"):
                    await slots.acquire()
            else:
                await slots.acquire()  # free: taken without suspending
        handed_over = False  # a stream frees the slot itself, when it is let go
        try:
            data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
            conn = self._reuse()
            while True:
                reused = conn is not None
                if conn is None:
                    async with self._connect_deadline(first_byte_at, "connect timed out"):
                        conn = await self._connect()
                sent_at = conn.loop.time()
                try:
                    answer = await conn.send(data, first_byte_at, total_at, streaming)
                    break
                except UpstreamConnectionError:
                    conn.close()
                    raced = conn.loop.time() - sent_at < RESEND_WINDOW
                    if not (reused and conn.lost_unheard and raced):
                        raise
                    # An idle connection the upstream closed as this request went out on it
                    # (its keep-alive timeout, 5 s in uvicorn and llama.cpp, ran out as ours,
                    # 15 s, had not), with not a byte answered: sent once more, on a new one.
                    conn = None
                except BaseException:
                    conn.close()
                    raise
            if isinstance(answer, StreamBody):
                answer._attach(self, slots)
                handed_over = True
                return answer
            self._keep_idle(conn)
            if "content-encoding" in answer.headers:
                answer.body = _decoded(answer, self._max_answer)
            return answer
        finally:
            if slots is not None and not handed_over:
                slots.release()

    def _keep_idle(self, conn: _Connection) -> None:
        """Keep ``conn`` for the next request, unless it or the pool is closed."""
        if self._closed:
            conn.close()
        elif not conn.closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)

    def _reuse(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        oldest_kept = idle[-1].loop.time() - self._idle_timeout  # one loop for them all
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if not conn.closed and conn.idle_since > oldest_kept:
                return conn
            conn.close()
        return None

    @contextlib.asynccontextmanager
    async def _connect_deadline(self, first_byte_at: float, what: str) -> AsyncIterator[None]:
        """Within the connect timeout (:class:`ConnectTimeout`), and within the first-byte
        deadline when that comes first (:class:`AnswerTimeout`, as a late answer would)."""
        loop = asyncio.get_running_loop()
        by_connect = loop.time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(min(by_connect, first_byte_at)):
                yield
        except TimeoutError:
            if first_byte_at < by_connect:
                raise AnswerTimeout("first_byte") from None
            raise ConnectTimeout(f"{what} within the connect timeout") from None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(
                functools.partial(_Connection, loop, self._max_answer),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        except OSError as exc:
            raise UpstreamConnectionError(
                f"connect failed: {exc.strerror or exc}", sent=False
            ) from None
        # uvloop may return before it has called connection_made (it schedules the call).
        conn.transport = transport
        return conn

    def close(self) -> None:
        """Close every idle connection; those in use close when their request ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _decoded(answer: Answer, limit: int) -> bytes:
    """The body without its content coding (asked for none, an upstream may still gzip), at
    most ``limit`` bytes of it (:class:`AnswerTooLarge`: a small gzip may hold gigabytes)."""
    coding = answer.headers["content-encoding"].strip().lower()
    if coding in ("", "identity"):
        return answer.body
    if coding not in ("gzip", "deflate"):
        raise UpstreamConnectionError(f"an answer in an unknown coding ({coding})", answered=True)
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    try:
        body = decoder.decompress(answer.body, limit)
    except zlib.error:
        raise UpstreamConnectionError("an undecodable compressed answer", answered=True) from None
    if decoder.unconsumed_tail:
        raise AnswerTooLarge(limit)
    if not decoder.eof:  # cut short (zlib.decompress said so; a decoder object does not)
        raise UpstreamConnectionError("an undecodable compressed answer", answered=True)
    return body


__all__ = [
    "IDLE_TIMEOUT",
    "Answer",
    "AnswerTimeout",
    "AnswerTooLarge",
    "ConnectTimeout",
    "Pool",
    "StreamBody",
    "UpstreamConnectionError",
]
