"""Request bodies as the API reads them: their bytes, decoded from their ``Content-Encoding``.

The server hands the application bodies as they came (:data:`SERVER_OPTIONS`,
``auto_decompress=False``), and :func:`body_bytes` decodes them. aiohttp's own decoding runs in
its parser, before any handler: ``br`` and ``zstd`` (for which it has no decoder here) were a
plain-text 400 with "Please install `Brotli`" and a traceback in the log. Here an encoding that
is not supported is OpenAI's error shape, a 415 naming it, and a gzip or deflate body is inflated
no further than the body limit (a small body that inflates to gigabytes is a 413, not a process
out of memory).
"""

from __future__ import annotations

import zlib
from typing import Any

from aiohttp import web

from chatgate import errors
from chatgate.state import STATE

SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}
"""What the server running :func:`chatgate.app.create_app` must be given (``web.run_app``,
``TestServer``): the bodies' bytes as they came, for :func:`body_bytes` to decode."""

_GZIP = 16 + zlib.MAX_WBITS
_WBITS = {"gzip": (_GZIP,), "x-gzip": (_GZIP,), "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS)}
"""zlib's window bits for each encoding, tried in order: "deflate" is meant to be zlib's
format, but some clients send raw deflate, which aiohttp accepted too."""


async def body_bytes(request: web.Request) -> bytes:
    """The body, decoded: 413 beyond ``max_body_bytes`` (as sent or decoded), 415 for an
    encoding other than gzip, deflate or identity, 400 for bytes not in their encoding."""
    limit: int = request.app[STATE].settings.max_body_bytes
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _too_large(limit) from exc
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return raw
    # Encodings are listed in the order they were applied: undo the last one first.
    for name in reversed(encoding.lower().split(",")):
        name = name.strip()
        if name in ("", "identity"):
            continue
        choices = _WBITS.get(name)
        if choices is None:
            raise errors.InvalidRequest(
                f"The Content-Encoding {name[:40]!r} is not supported: send the body as it is, "
                "or gzip or deflate it.",
                code="unsupported_content_encoding",
            ).with_status(415)
        raw = _inflate(raw, name, choices, limit)
    return raw


def _inflate(data: bytes, name: str, choices: tuple[int, ...], limit: int) -> bytes:
    for wbits in choices:
        try:
            return _inflate_with(data, wbits, limit)
        except zlib.error:
            continue
    raise errors.InvalidRequest(
        f"The request body could not be read as Content-Encoding {name!r}.", code="invalid_body"
    )


def _inflate_with(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    while True:  # gzip allows several members one after the other
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise _too_large(limit)
        if not inflater.eof:  # cut short
            raise zlib.error("incomplete")
        data = inflater.unused_data
        if not data:
            return bytes(out)


def _too_large(limit: int) -> errors.BodyTooLarge:
    return errors.BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
