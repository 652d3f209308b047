"""API keys: format and checksum, hashing, and the key service."""

from chatgate.keys.format import generate, hint, is_well_formed, key_hash
from chatgate.keys.store import IssuedKey, KeyLookup, KeyRecord, KeyStore

__all__ = [
    "IssuedKey",
    "KeyLookup",
    "KeyRecord",
    "KeyStore",
    "generate",
    "hint",
    "is_well_formed",
    "key_hash",
]
