"""A minimal asyncio Redis client for the limiter's hot path: one pipelined RESP2 connection.

Why not redis-py here: its asyncio client spends ~100 us of CPU per ``EVALSHA`` (argument
encoding, connection-pool locking, observability hooks, a reader task), as much as half of
what serving a whole request costs; this client spends ~25 us (measured in ``bench/``).
redis-py stays the client for everything else in chatgate.

What it does: every command is written at once to one connection and its future is queued;
Redis answers in order, so replies are matched first-in first-out (pipelining: any number of
requests share the connection without waiting for each other). URLs: ``redis://``,
``rediss://`` (TLS, with redis-py's ``ssl_*`` query options), ``unix://``, with a user/password and
a database number.

Failures: no reply within ``timeout`` or a broken connection fails *every* pending command
with :class:`ConnectionError` (a late reply could no longer be matched) and closes the
connection; the next command reconnects. Nothing is ever retried here: a command whose reply
was lost may have run. Error replies raise :class:`ReplyError`; those that mean "the server
cannot serve now" (``LOADING``, ``READONLY``, ``MASTERDOWN``, ``OOM``, ``BUSY``,
``CLUSTERDOWN``, ``TRYAGAIN``; ``MISCONF``: writes refused while a snapshot cannot be saved;
``NOAUTH``, or ``ERR Protocol error`` for a longer command, after which the server closes the
connection: a password required and none sent) raise :class:`ServerUnavailable`, a
:class:`ConnectionError`. A command that could not be sent at all (no connection) raises
:class:`NotSent`, also a :class:`ConnectionError`: of the failures, only these two say the
command did not run.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "NotSent",
    "ReplyError",
    "RespClient",
    "ServerUnavailable",
    "encode",
    "encode_int",
    "encode_once",
    "pack",
    "parse_command",
]

_UNAVAILABLE_PREFIXES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "OOM",
    "BUSY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MISCONF",
    "NOAUTH",
    "ERR Protocol error",
)

_NO_PASSWORD_SET = (
    "ERR AUTH <password> called without any password configured",  # Redis 6 and later
    "ERR Client sent AUTH, but no password is set",
)


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class ServerUnavailable(ConnectionError):
    """An error reply meaning the server cannot serve commands right now."""


class NotSent(ConnectionError):
    """No connection could be made: the command was never sent (so it did not run)."""


def _bulk(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, (bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, float):
        data = repr(value).encode()  # exact round trip, as Lua's tonumber reads it
    else:
        data = str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


_ENCODED: dict[tuple[type, Any], bytes] = {}
"""Short arguments already encoded, by type and value (1, 1.0 and True encode apart)."""
_ENCODED_KEPT = 4096
_ENCODED_SIZE = 128


def pack(*args: Any) -> bytes:
    """One command in RESP2: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + encode(*args)


def encode(*args: Any) -> bytes:
    """``args`` as bulk strings, one after the other: a part of a command (see :func:`pack`).

    The limiter's arguments repeat from one request to the next (bucket keys, limits,
    windows, small costs): each short one is encoded once and looked up after (a lookup is
    a third of an encoding). The memo is dropped when full: lease ids, each new, fill it.
    """
    parts = []
    encoded = _ENCODED
    for value in args:
        key = (value.__class__, value)
        try:
            data = encoded.get(key)
        except TypeError:  # unhashable (a bytearray): encoded each time
            parts.append(_bulk(value))
            continue
        if data is None:
            data = _bulk(value)
            if len(data) <= _ENCODED_SIZE:
                if len(encoded) >= _ENCODED_KEPT:
                    encoded.clear()
                encoded[key] = data
        parts.append(data)
    return b"".join(parts)


_INTS = [_bulk(n) for n in range(1024)]


def encode_int(n: int) -> bytes:
    """An int as a bulk string: :func:`encode` of one int, a table's lookup for the small
    ones a limiter call is made of (counts of keys and settlements, token costs)."""
    if 0 <= n < 1024:
        return _INTS[n]
    digits = b"%d" % n
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


def encode_once(text: str) -> bytes:
    """``text`` as a bulk string, without the memo of :func:`encode`: for a value sent once
    (a lease id), which would only push the values that repeat out of it."""
    data = text.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def parse_command(packed: bytes) -> list[bytes]:
    """The arguments of a command in RESP2 (:func:`pack`'s inverse, arguments as bytes)."""
    try:
        command, end = _parse(packed, 0)
    except (_Incomplete, ValueError, IndexError) as exc:
        raise ValueError("not a whole RESP command") from exc
    if not isinstance(command, list) or end != len(packed):
        raise ValueError("not a RESP command: one array of bulk strings")
    return command


class _Incomplete(Exception):
    """The buffer does not hold a whole reply yet."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One reply from ``buf`` at ``pos``: (value, next position); :class:`_Incomplete`."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == 58:  # ':' integer
        return int(line), pos
    if kind == 36:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return buf[pos : pos + size], pos + size + 2
    if kind == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, pos
        items: list[Any] = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # '+' simple string
        return line.decode(), pos
    if kind == 45:  # '-' error
        text = line.decode(errors="replace")
        if text.startswith(_UNAVAILABLE_PREFIXES):
            return ServerUnavailable(f"redis: {text}"), pos
        return ReplyError(text), pos
    raise ConnectionError(f"redis: unexpected reply type {chr(kind)!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self.loop = loop  # kept: asyncio.get_running_loop() is a system call in 3.11
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.outbox: list[bytes] = []
        self._buf = b""
        self.closed = False

    def flush(self) -> None:
        """Write the commands queued in this turn of the loop, in one system call."""
        data = b"".join(self.outbox)
        self.outbox.clear()
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        pending = self.pending
        try:
            while pending and pos < len(buf):
                value, pos = _parse(buf, pos)
                future = pending.popleft()
                if not future.done():
                    if isinstance(value, Exception):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except _Incomplete:
            pass
        except (ValueError, ConnectionError) as exc:
            self.fail(ConnectionError(f"redis: unreadable reply ({exc})"))
            return
        self._buf = buf[pos:]
        if not pending:
            self._client._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"redis: connection lost ({exc or 'closed by the server'})"))

    def fail(self, exc: Exception) -> None:
        """Fail every pending command and drop the connection."""
        self.closed = True
        self._client._lost(self)
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a caller that went away must not warn
        if self.transport is not None:
            self.transport.close()


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _tls(query: dict[str, list[str]]) -> ssl.SSLContext:
    """The TLS context of a ``rediss://`` URL, from the query options redis-py reads too:
    ``ssl_ca_certs`` (a CA file; else the system's), ``ssl_cert_reqs`` (``none``, ``optional``,
    ``required``: the default), ``ssl_check_hostname`` and ``ssl_certfile`` / ``ssl_keyfile``
    (a client certificate)."""

    def option(name: str) -> str:
        return query.get(name, [""])[0]

    try:
        context = ssl.create_default_context(cafile=option("ssl_ca_certs") or None)
    except OSError as exc:  # it said "[Errno 2] No such file or directory", naming nothing (QA)
        raise ValueError(
            f"CHATGATE_REDIS_URL: its ssl_ca_certs file cannot be read ({exc.strerror or exc})"
        ) from None
    reqs = option("ssl_cert_reqs").lower() or "required"
    if reqs not in _CERT_REQS:
        raise ValueError(f"unsupported ssl_cert_reqs {reqs!r}: none, optional or required")
    if reqs != "required" or option("ssl_check_hostname").lower() in ("false", "0", "no"):
        context.check_hostname = False  # before verify_mode: ssl refuses CERT_NONE with it
    context.verify_mode = _CERT_REQS[reqs]
    if option("ssl_certfile"):
        try:
            context.load_cert_chain(option("ssl_certfile"), option("ssl_keyfile") or None)
        except OSError as exc:
            raise ValueError(
                "CHATGATE_REDIS_URL: its ssl_certfile/ssl_keyfile cannot be read "
                f"({exc.strerror or exc})"
            ) from None
    return context


class RespClient:
    """Commands over one pipelined connection to the Redis named by a URL (see the module)."""

    def __init__(self, url: str, *, connect_timeout: float = 1.0, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme: {parts.scheme!r}")
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = _tls(query) if parts.scheme == "rediss" else None
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = query.get("db", [""])[0] or (parts.path.strip("/") if parts.scheme != "unix" else "")
        self._db = int(db or 0)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self.commands_sent = 0  # for tests and the benchmark: round trips made

    async def call(self, *args: Any) -> Any:
        """Send one command and wait for its reply (see the module for failures)."""
        return await self.send(pack(*args))

    def submit_packed(self, packed: bytes) -> asyncio.Future[Any] | None:
        """Send one command already packed (:func:`pack`, or :func:`encode`d parts under an
        array header) now if connected: the future of its reply (no task, no await).

        ``None`` when not connected: use :meth:`send`, which connects first.
        """
        proto = self._proto
        if proto is None or proto.closed:
            return None
        return self._write(proto, packed)

    async def send(self, packed: bytes) -> Any:
        """Send one command already packed with :func:`pack`; its reply. :class:`NotSent`
        when no connection could be made (the command certainly did not run)."""
        proto = self._proto
        if proto is None or proto.closed:
            try:
                proto = await self._connect()
            except OSError as exc:
                raise NotSent(str(exc)) from exc
        return await self._write(proto, packed)

    def _write(self, proto: _Protocol, packed: bytes) -> asyncio.Future[Any]:
        loop = proto.loop
        future: asyncio.Future[Any] = loop.create_future()
        proto.pending.append(future)
        # Commands issued in the same turn of the event loop (concurrent requests) go out
        # in one write: one system call instead of one each (what a loopback send costs
        # dominates a call). A lone command waits only for the end of this turn.
        if not proto.outbox:
            loop.call_soon(proto.flush)
        proto.outbox.append(packed)
        self.commands_sent += 1
        # One timer for the whole connection: it fires at the oldest pending deadline.
        self._deadlines.append((loop.time() + self._timeout, future))
        if self._timer is None:
            self._timer = loop.call_at(self._deadlines[0][0], self._check_deadlines)
        return future

    def _check_deadlines(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
        if not deadlines:
            return
        when = deadlines[0][0]
        if loop.time() >= when:
            if self._proto is not None:
                self._proto.fail(TimeoutError("redis: no reply in time"))
            deadlines.clear()
            return
        self._timer = loop.call_at(when, self._check_deadlines)

    def _idle(self) -> None:
        self._deadlines.clear()  # every command answered

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _connect(self) -> _Protocol:
        if self._connecting is not None:  # one connection attempt, however many wait
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            proto = await asyncio.wait_for(self._open(), self._connect_timeout)
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()
            self._connecting = None
            if isinstance(exc, asyncio.TimeoutError | TimeoutError):
                raise TimeoutError("redis: connect timed out") from exc
            raise
        self._connecting.set_result(proto)
        self._connecting = None
        self._proto = proto
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        proto: _Protocol
        if self._unix is not None:
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self, loop), self._unix)
        else:
            _, proto = await loop.create_connection(
                lambda: _Protocol(self, loop), self._host, self._port, ssl=self._ssl
            )
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            auth = ("AUTH", self._username, self._password) if self._username else None
            setup.append(auth or ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        try:
            for command in setup:
                try:
                    await self._write(proto, pack(*command))
                except ReplyError as exc:
                    # A password given to a server that has none: it serves anyway, and
                    # redis-py (chatgate's other client, readiness included) goes on too.
                    if command[0] != "AUTH" or not str(exc).startswith(_NO_PASSWORD_SET):
                        raise
        except ReplyError as exc:  # a wrong password or database: the store is unusable
            proto.fail(ConnectionError(f"redis: {exc}"))
            raise ConnectionError(f"redis: connection setup refused: {exc}") from exc
        return proto

    async def aclose(self) -> None:
        """Close the connection (pending commands fail)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._proto is not None:
            self._proto.fail(ConnectionError("redis: client closed"))
            self._proto = None
