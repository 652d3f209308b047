"""chatgate/backends/http1.py against real servers on loopback that answer with scripted bytes.

Each server reads one request head (and its Content-Length body) at a time and writes what the
test scripted for it, so every framing an upstream may use, every way a connection can end
and every reuse decision is seen on a real socket.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatgate.backends.http1 import (
    Answer,
    AnswerTimeout,
    AnswerTooLarge,
    ConnectTimeout,
    Pool,
    StreamBody,
    UpstreamConnectionError,
)
from tests.backends.upstreams import CHUNKED, chunk, stream_server
from tests.helpers import free_port

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
# (head, body) -> answer; None: close; a float: close after that many seconds
Script = Callable[[bytes, bytes], bytes | float | None]
HANG = b""  # a script's answer for "never answer" (until the test ends)


@dataclass
class Server:
    """A loopback server; ``script`` answers each request; what it saw is kept."""

    script: Script
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.script(head, body)
                if answer is None:
                    break
                if isinstance(answer, float):  # work on it that long, then die without a word
                    await asyncio.sleep(answer)
                    break
                if answer is HANG:
                    await self.released.wait()
                    break
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script, ssl_context: ssl.SSLContext | None = None) -> Server:
        server = Server(script)
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ssl_context)
        server.port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
        return server

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()


async def post(
    pool: Pool, head: bytes, body: bytes, first_byte: float = 5.0, total: float = 10.0
) -> Answer:
    """``pool.post`` with deadlines in seconds from now."""
    now = asyncio.get_running_loop().time()
    return await pool.post(head, body, now + first_byte, now + total)


def always(answer: bytes | None) -> Script:
    return lambda head, body: answer


async def test_posts_the_body_and_reads_a_content_length_answer(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(server.url())
    head = pool.head("/chat/completions", {"Content-Type": "application/json"})
    answer = await post(pool, head, b'{"model":"m"}')
    assert (answer.status, answer.body) == (200, b'{"ok":true}')
    assert answer.headers["content-type"] == "application/json"
    sent_head, sent_body = server.requests[0]
    assert sent_head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in sent_head
    assert b"Content-Length: 13\r\n" in sent_head
    assert b"Accept-Encoding: identity\r\n" in sent_head
    assert sent_body == b'{"model":"m"}'
    pool.close()


async def test_an_interim_answer_is_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK))
    pool = Pool(server.url())
    answer = await post(pool, pool.head("/x", {}), b"{}")
    assert (answer.status, answer.body, "link" in answer.headers) == (200, b'{"ok":true}', False)


async def test_chunked_and_read_until_close_bodies(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    )
    server = await serve(always(chunked))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    assert (await post(pool, head, b"{}")).body == b'{"a":1}'
    assert (await post(pool, head, b"{}")).body == b'{"a":1}'
    assert server.connections == 1  # chunked keeps the connection
    pool.close()

    until_close = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"b":2}'
    server = await serve(always(until_close))
    pool = Pool(server.url())
    assert (await post(pool, pool.head("/x", {}), b"{}")).body == b'{"b":2}'
    pool.close()


async def test_keep_alive_reuses_one_connection_and_close_does_not(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    for _ in range(5):
        assert (await post(pool, head, b"{}")).status == 200
    assert server.connections == 1

    closing = OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    server = await serve(always(closing))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    for _ in range(3):
        assert (await post(pool, head, b"{}")).status == 200
    assert server.connections == 3


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    await post(pool, head, b"{}")
    for writer in server.writers:  # the upstream's keep-alive timeout
        writer.close()
    await asyncio.sleep(0.1)
    assert (await post(pool, head, b"{}")).status == 200
    assert server.connections == 2


async def test_a_kept_connection_closed_as_a_request_goes_out_is_sent_again_once(serve) -> None:  # type: ignore[no-untyped-def]
    """The upstream's keep-alive timeout (5 s in uvicorn) running out as a request is sent on
    the connection: closed with not a byte answered. Sent once more on a new connection; a
    second such close, or one on a new connection, is the caller's error."""
    replies = iter([OK, None, OK])  # None: read the request, close without a word
    server = await serve(lambda head, body: next(replies))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    await post(pool, head, b"{}")
    assert (await post(pool, head, b'{"n":2}')).body == b'{"ok":true}'
    assert server.connections == 2
    assert [body for _, body in server.requests] == [b"{}", b'{"n":2}', b'{"n":2}']

    replies = iter([OK, None, None])
    server = await serve(lambda head, body: next(replies))
    pool = Pool(server.url())
    await post(pool, head, b"{}")
    with pytest.raises(UpstreamConnectionError) as twice:
        await post(pool, head, b"{}")
    assert not twice.value.answered
    assert len(server.requests) == 3  # the request, and one more: not a loop

    cut = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{"
    replies = iter([OK, cut, OK])
    server = await serve(lambda head, body: next(replies))
    pool = Pool(server.url())
    await post(pool, head, b"{}")
    with pytest.raises(UpstreamConnectionError) as broken:
        await post(pool, head, b"{}")  # an answer began, then the connection ended
    assert broken.value.answered
    assert len(server.requests) == 2  # never sent again


async def test_a_kept_connection_lost_after_the_upstream_worked_on_it_is_not_sent_again(
    serve,  # type: ignore[no-untyped-def]
) -> None:
    """An upstream that crashed after working on a request for a while (a second and a
    half, here) got it a second time (retries = 0 or not), and the router saw no failure:
    only a loss as the request goes out is the keep-alive race worth a resend."""
    replies = iter([OK, 1.5, OK])
    server = await serve(lambda head, body: next(replies))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    await post(pool, head, b"{}")
    with pytest.raises(UpstreamConnectionError) as lost:
        await post(pool, head, b'{"n":2}')
    assert not lost.value.answered
    assert [body for _, body in server.requests] == [b"{}", b'{"n":2}']  # sent once
    pool.close()


async def test_idle_connections_expire(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(server.url(), idle_timeout=0.05)
    head = pool.head("/x", {})
    await post(pool, head, b"{}")
    await asyncio.sleep(0.1)
    await post(pool, head, b"{}")
    assert server.connections == 2


async def test_unreachable_broken_and_invalid_answers_are_errors(serve) -> None:  # type: ignore[no-untyped-def]
    pool = Pool(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UpstreamConnectionError) as refused:
        await post(pool, pool.head("/x", {}), b"{}")
    assert not refused.value.answered

    server = await serve(always(None))  # reads the request, closes without a word
    pool = Pool(server.url())
    with pytest.raises(UpstreamConnectionError) as silent:
        await post(pool, pool.head("/x", {}), b"{}")
    assert not silent.value.answered
    assert len(server.requests) == 1  # a new connection: not sent again

    cut = b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{"partial'
    server = await serve(always(cut))  # 9 bytes of 100, then the end of the connection
    pool = Pool(server.url())
    with pytest.raises(UpstreamConnectionError) as broken:
        await post(pool, pool.head("/x", {}), b"{}")
    assert broken.value.answered

    server = await serve(always(b"SMTP ready\r\n\r\n"))
    pool = Pool(server.url())
    with pytest.raises(UpstreamConnectionError):
        await post(pool, pool.head("/x", {}), b"{}")


async def test_a_cancelled_request_drops_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    replies = iter([HANG, OK])
    server = await serve(lambda head, body: next(replies))
    pool = Pool(server.url())
    head = pool.head("/x", {})
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await post(pool, head, b"{}")
    assert (await post(pool, head, b"{}")).body == b'{"ok":true}'
    assert server.connections == 2  # the first one's answer is unknown: not reused
    server.released.set()


async def test_the_cap_on_connections_and_its_connect_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(server.url(), slots=asyncio.Semaphore(2))
    head = pool.head("/x", {})
    statuses = await asyncio.gather(*(post(pool, head, b"{}") for _ in range(6)))
    assert [a.status for a in statuses] == [200] * 6
    assert server.connections == 2

    # Two requests hold both slots; a third waits for one no longer than the connect timeout.
    stalled = await serve(always(HANG))
    capped = Pool(stalled.url(), slots=asyncio.Semaphore(2), connect_timeout=0.3)
    head = capped.head("/x", {})
    stuck = [asyncio.ensure_future(post(capped, head, b"{}")) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectTimeout):
        await post(capped, head, b"{}")
    assert stalled.connections == 2
    stalled.released.set()
    await asyncio.gather(*stuck, return_exceptions=True)


async def test_a_gzipped_answer_is_decoded(serve) -> None:  # type: ignore[no-untyped-def]
    body = gzip.compress(b'{"zipped":true}')
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    server = await serve(always(answer))
    pool = Pool(server.url())
    assert (await post(pool, pool.head("/x", {}), b"{}")).body == b'{"zipped":true}'


def sized(body: bytes, coding: bytes = b"") -> bytes:
    extra = b"Content-Encoding: %s\r\n" % coding if coding else b""
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


async def test_an_answer_larger_than_the_pool_takes_is_refused_and_its_connection_dropped(
    serve,
) -> None:  # type: ignore[no-untyped-def]
    big = b"x" * 200_000
    answers = iter(
        [
            sized(big),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(big) + b"0\r\n\r\n",
            sized(big[:1000]),
        ]
    )
    server = await serve(lambda head, body: next(answers))
    pool = Pool(server.url(), max_answer=100_000)
    head = pool.head("/x", {})
    for _ in range(2):  # with a length, and chunked
        with pytest.raises(AnswerTooLarge) as refused:
            await post(pool, head, b"{}")
        assert refused.value.answered and refused.value.limit == 100_000
    assert (await post(pool, head, b"{}")).body == big[:1000]  # below the bound: as before
    assert server.connections == 3  # each refused answer's connection was dropped
    pool.close()


async def test_a_compressed_answer_is_bounded_once_decoded(serve) -> None:  # type: ignore[no-untyped-def]
    bomb = gzip.compress(b"\0" * 50_000_000)  # ~50 KB on the wire
    cut = gzip.compress(b'{"zipped":true}' * 100)[:-12]
    answers = iter([sized(bomb, b"gzip"), sized(cut, b"gzip")])
    server = await serve(lambda head, body: next(answers))
    pool = Pool(server.url(), max_answer=1_000_000)
    head = pool.head("/x", {})
    with pytest.raises(AnswerTooLarge):
        await post(pool, head, b"{}")
    with pytest.raises(UpstreamConnectionError, match="undecodable"):  # cut short
        await post(pool, head, b"{}")
    pool.close()


async def test_credentials_in_the_url_are_basic_auth(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(OK))
    pool = Pool(f"http://us%40er:p%3Ass@127.0.0.1:{server.port}/v1")
    await post(pool, pool.head("/x", {}), b"{}")
    sent_head = server.requests[0][0]
    assert b"Authorization: Basic dXNAZXI6cDpzcw==\r\n" in sent_head  # us@er:p:ss
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in sent_head
    with pytest.raises(ValueError):
        pool.head("/x", {"Authorization": "Bearer k"})


def test_a_header_with_a_line_break_is_refused() -> None:
    pool = Pool("http://127.0.0.1:9/v1")
    with pytest.raises(ValueError):
        pool.head("/x", {"Authorization": "Bearer x\r\nX-Injected: 1"})
    with pytest.raises(ValueError):
        Pool("ftp://example.com/")


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatgate test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_https_verifies_the_certificate(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server_ctx, client_ctx = _self_signed(tmp_path)
    server = await serve(always(OK), ssl_context=server_ctx)
    trusting = Pool(server.url("https"), ssl_context=client_ctx)
    assert (await post(trusting, trusting.head("/x", {}), b"{}")).status == 200
    trusting.close()
    default = Pool(server.url("https"))  # the system's certificates: not this one
    with pytest.raises(UpstreamConnectionError):
        await post(default, default.head("/x", {}), b"{}")


async def test_the_first_byte_and_total_deadlines(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve(always(HANG))
    pool = Pool(server.url())
    with pytest.raises(AnswerTimeout) as silent:
        await post(pool, pool.head("/x", {}), b"{}", first_byte=0.2, total=5.0)
    assert (silent.value.phase, silent.value.answered) == ("first_byte", False)
    server.released.set()

    # The status line in time, the body never: the total deadline, not the first-byte one.
    started = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"
    slow = await serve(lambda head, body: started)
    pool = Pool(slow.url())
    began = asyncio.get_running_loop().time()
    with pytest.raises(AnswerTimeout) as cut:
        await post(pool, pool.head("/x", {}), b"{}", first_byte=0.1, total=0.4)
    assert (cut.value.phase, cut.value.answered) == ("total", True)
    assert asyncio.get_running_loop().time() - began >= 0.4  # not cut at the first deadline

    # Waiting for a slot counts in the first-byte deadline when that comes before connect's.
    stalled = await serve(always(HANG))
    capped = Pool(stalled.url(), slots=asyncio.Semaphore(1), connect_timeout=5.0)
    head = capped.head("/x", {})
    holder = asyncio.ensure_future(post(capped, head, b"{}"))
    await asyncio.sleep(0.05)
    with pytest.raises(AnswerTimeout) as waited:
        await post(capped, head, b"{}", first_byte=0.2)
    assert waited.value.phase == "first_byte"
    stalled.released.set()
    await asyncio.gather(holder, return_exceptions=True)


# -- streamed answers (Pool.open): a 2xx's body read as it arrives --------------------------


async def open_stream(pool: Pool) -> Answer | StreamBody:
    now = asyncio.get_running_loop().time()
    return await pool.open(pool.head("/chat/completions", {}), b"{}", now + 5, now + 10)


async def test_a_stream_is_read_as_it_arrives_and_its_connection_kept() -> None:
    gate = asyncio.Event()
    first = [CHUNKED + chunk(b"data: 1\n\n"), gate, chunk(b"data: 2\n\n") + b"0\r\n\r\n"]
    url, connections = await stream_server(
        [first, [CHUNKED + chunk(b"data: x\n\n") + b"0\r\n\r\n"]]
    )
    slots = asyncio.Semaphore(1)
    pool = Pool(url, slots=slots)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody) and body.status == 200
    assert body.headers["content-type"] == "text/event-stream"
    assert await body.readany() == b"data: 1\n\n"  # before the rest was even written
    assert slots.locked()  # the stream holds its slot
    gate.set()
    assert await body.readany() == b"data: 2\n\n"
    assert await body.readany() == b""
    body.release()
    body.release()  # twice: the slot is given back once
    assert not slots.locked()
    again = await open_stream(pool)
    assert isinstance(again, StreamBody)
    assert await again.readany() == b"data: x\n\n" and await again.readany() == b""
    again.release()
    assert connections == [1]  # the second stream reused the first one's connection
    pool.close()


async def test_closing_a_stream_read_to_its_end_keeps_its_connection() -> None:
    """The relay closes every stream it ends; one already released (read to its end) must
    not take its connection, which is back in the pool, down with it."""
    whole = CHUNKED + chunk(b"data: 1\n\n") + b"0\r\n\r\n"
    url, connections = await stream_server([[whole], [whole], [whole]])
    pool = Pool(url, slots=asyncio.Semaphore(1))
    for _ in range(3):
        body = await open_stream(pool)
        assert isinstance(body, StreamBody)
        assert await body.readany() == b"data: 1\n\n" and await body.readany() == b""
        body.release()
        body.close()
    assert connections == [1]
    pool.close()


async def test_a_stream_that_breaks_off_or_is_closed_raises_and_frees_its_slot() -> None:
    hold = asyncio.Event()
    url, _ = await stream_server(
        [
            [CHUNKED + chunk(b"data: 1\n\n"), None],  # the upstream goes away mid-stream
            [CHUNKED + chunk(b"data: 1\n\n"), hold],  # and this one the reader drops
            [b'HTTP/1.1 429 Too Many\r\nContent-Length: 7\r\n\r\n{"e":1}'],
        ]
    )
    slots = asyncio.Semaphore(1)
    pool = Pool(url, slots=slots)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    assert await body.readany() == b"data: 1\n\n"
    with pytest.raises(UpstreamConnectionError) as broken:
        await body.readany()
    assert broken.value.answered
    body.release()
    assert not slots.locked()

    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    assert await body.readany() == b"data: 1\n\n"
    pending = asyncio.ensure_future(body.readany())
    await asyncio.sleep(0.05)
    body.close()  # what the stream's watchdog does when a limit passes
    with pytest.raises(UpstreamConnectionError):
        await pending
    body.release()
    assert not slots.locked()
    hold.set()

    error = await open_stream(pool)  # an error status comes whole, not as a stream
    assert isinstance(error, Answer) and (error.status, error.body) == (429, b'{"e":1}')
    assert not slots.locked()
    pool.close()


async def test_a_slow_reader_stops_the_connection_reading_and_loses_nothing() -> None:
    piece = b"data: " + b"x" * 16_378 + b"\n\n"  # 16 KiB
    url, _ = await stream_server(
        [[CHUNKED + b"".join(chunk(piece) for _ in range(64)) + b"0\r\n\r\n"]]
    )
    pool = Pool(url)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    for _ in range(100):  # 1 MiB on its way, nobody reading
        await asyncio.sleep(0.005)
        if body._paused:
            break
    assert body._paused  # past the high-water mark the transport stopped reading
    received = b""
    while data := await body.readany():
        received += data
    assert received == piece * 64
    body.release()
    pool.close()


async def test_a_gzipped_stream_is_decoded_as_it_arrives() -> None:
    packed = gzip.compress(b"data: 1\n\n" * 50)
    head = CHUNKED.replace(b"Transfer-Encoding", b"Content-Encoding: gzip\r\nTransfer-Encoding")
    half = len(packed) // 2
    gate = asyncio.Event()
    steps = [head + chunk(packed[:half]), gate, chunk(packed[half:]) + b"0\r\n\r\n"]
    url, _ = await stream_server([steps])
    pool = Pool(url)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    received = await body.readany()
    assert received and b"data: 1\n\n".startswith(received[:9])  # decoded before the end
    gate.set()
    while data := await body.readany():
        received += data
    assert received == b"data: 1\n\n" * 50
    body.release()
    pool.close()


async def test_a_compressed_stream_that_inflates_past_the_bound_is_an_error() -> None:
    bomb = gzip.compress(b"\0" * 200_000_000)  # ~200 KB: one or two reads
    head = CHUNKED.replace(b"Transfer-Encoding", b"Content-Encoding: gzip\r\nTransfer-Encoding")
    url, _ = await stream_server([[head + chunk(bomb) + b"0\r\n\r\n"]])
    pool = Pool(url)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    with pytest.raises(AnswerTooLarge):
        while await body.readany():
            pass
    body.close()
    pool.close()


async def test_a_stream_without_length_ends_with_its_connection() -> None:
    """An SSE answer with neither a length nor chunks (HTTP/1.0 style) runs to the close."""
    plain = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    url, _ = await stream_server([[plain + b"data: 1\n\n", b"data: 2\n\n", None]])
    pool = Pool(url)
    body = await open_stream(pool)
    assert isinstance(body, StreamBody)
    received = b""
    while data := await body.readany():
        received += data
    assert received == b"data: 1\n\ndata: 2\n\n"
    body.release()  # not kept: the connection is gone
    pool.close()
