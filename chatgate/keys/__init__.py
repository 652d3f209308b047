"""API keys: format and checksum, hashing (:mod:`.format`), and the key service
(:mod:`.store`, imported from there: :mod:`chatgate.errors` uses the format, and the store
uses the errors)."""

from chatgate.keys.format import generate, hint, is_well_formed, key_hash, unkeyed

__all__ = ["generate", "hint", "is_well_formed", "key_hash", "unkeyed"]
