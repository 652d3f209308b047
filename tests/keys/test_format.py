from __future__ import annotations

import random
import string

from hypothesis import given
from hypothesis import strategies as st

from chatgate.keys import format as keyfmt


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {keyfmt.generate() for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert key.startswith("sk-cg-") and len(key) == keyfmt.KEY_LEN
        assert keyfmt.is_well_formed(key)
        assert keyfmt.KEY_PATTERN.fullmatch(key)


def test_any_single_typo_is_caught() -> None:
    key = keyfmt.generate()
    alphabet = string.digits + string.ascii_letters
    for i in range(len("sk-cg-"), len(key)):
        for ch in random.sample(alphabet, 8):
            if ch != key[i]:
                assert not keyfmt.is_well_formed(key[:i] + ch + key[i + 1 :])


@given(st.text(max_size=60))
def test_random_text_is_rejected(text: str) -> None:
    assert not keyfmt.is_well_formed(text)


def test_hint_and_hash() -> None:
    key = keyfmt.generate()
    hint = keyfmt.hint(key)
    assert hint.startswith(key[:10]) and hint.endswith(key[-4:]) and len(hint) == 15
    h1 = keyfmt.key_hash("secret-a", key)
    assert h1 == keyfmt.key_hash("secret-a", key) and len(h1) == 64
    assert h1 != keyfmt.key_hash("secret-b", key)
    assert key not in h1


@given(st.text(min_size=1, max_size=80), st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_the_keyed_hasher_is_key_hash(secret: str, keys: list[str]) -> None:
    """The prepared hasher of the request path gives exactly the stored index, key after key
    (its keyed state is copied, never consumed)."""
    hasher = keyfmt.KeyHasher(secret)
    for key in keys:
        assert hasher(key) == keyfmt.key_hash(secret, key)
