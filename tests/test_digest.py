"""crdtmail.digest: the GIL-keeping SHA-256 gives hashlib's answer for every length."""

from __future__ import annotations

import hashlib
import os

import pytest

from crdtmail.digest import sha256_hex


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4094, 4095, 10_000, 262_144 + 3])
def test_sha256_hex_matches_hashlib(size: int) -> None:
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_hex(data) == sha256_hex(bytearray(data)) == sha256_hex(memoryview(data)) == expected
