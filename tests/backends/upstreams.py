"""Upstreams for the backend tests: a raw HTTP server that answers step by step, and a stream
body that hands out the pieces given (what the SSE relay reads)."""

from __future__ import annotations

import asyncio

Step = bytes | asyncio.Event | None  # write, wait for the test, or close the connection

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stream_server(steps: list[list[Step]]) -> tuple[str, list[int]]:
    """A server that answers its n-th request with ``steps[n]``, step by step, on the same
    connection while it stays open; the URL and a one-item list counting connections."""
    connections = [0]
    queue = list(steps)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while queue:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                for step in queue.pop(0):
                    if step is None:
                        return
                    if isinstance(step, asyncio.Event):
                        await step.wait()
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", connections


class Reads:
    """An upstream's stream body, read in the pieces given (what SSEPassThrough reads)."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces = list(pieces)

    async def readany(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass
