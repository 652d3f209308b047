"""Key format: ``sk-cg-`` + 32 random base62 characters + 6 base62 characters of CRC32.

Like GitHub's tokens, the checksum lets a typo or a random string be rejected without any
lookup, and lets scanners recognise a leaked key with no false positives on random text.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

PREFIX = "sk-cg-"
RANDOM_LEN = 32
CHECK_LEN = 6
KEY_LEN = len(PREFIX) + RANDOM_LEN + CHECK_LEN
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62 = frozenset(ALPHABET)
# For scanners: a candidate anywhere in text; ``is_well_formed`` then checks the checksum.
KEY_PATTERN = re.compile(rf"sk-cg-[0-9A-Za-z]{{{RANDOM_LEN + CHECK_LEN}}}")


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def checksum(random_part: str) -> str:
    """The 6-character base62 CRC32 of the random part."""
    return _base62(zlib.crc32(random_part.encode()), CHECK_LEN)


def generate() -> str:
    """A new random key (190 bits of entropy)."""
    random_part = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LEN))
    return PREFIX + random_part + checksum(random_part)


def is_well_formed(key: str) -> bool:
    """True when ``key`` has the prefix, the length, the alphabet and a matching checksum."""
    if len(key) != KEY_LEN or not key.startswith(PREFIX):
        return False
    body = key[len(PREFIX) :]
    if not _B62.issuperset(body):
        return False
    random_part, check = body[:RANDOM_LEN], body[RANDOM_LEN:]
    return hmac.compare_digest(checksum(random_part), check)


def hint(key: str) -> str:
    """The display hint, e.g. ``sk-cg-Ab3d…9xYz``: enough to recognise, useless to attack."""
    return key[: len(PREFIX) + 4] + "…" + key[-4:]


_KEYLIKE = re.compile(rf"{PREFIX}[0-9A-Za-z]{{12,}}")


def unkeyed(text: str) -> str:
    """``text`` with key-shaped strings shown as their hint (``sk-cg-Ab3d…9xYz``)."""
    if PREFIX not in text:
        return text
    return _KEYLIKE.sub(lambda m: hint(m.group()), text)


def key_hash(secret: str, key: str) -> str:
    """HMAC-SHA256 of ``key`` under the server secret, hex: the only stored form of a key."""
    return hmac.digest(secret.encode(), key.encode(), "sha256").hex()  # one-shot: C only


class KeyHasher:
    """:func:`key_hash` under one secret, its HMAC keyed once and copied per key.

    On the request path (every authentication hashes the presented key): a copy of the keyed
    state costs about two thirds of a one-shot ``hmac.digest``, which sets the key up again.
    """

    __slots__ = ("_keyed",)

    def __init__(self, secret: str) -> None:
        self._keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def __call__(self, key: str) -> str:
        mac = self._keyed.copy()
        mac.update(key.encode())
        return mac.hexdigest()
