"""The at-rest memory model: bound to the VEK and the address, one call per contiguous run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevconsole.sev.memory import GuestMemoryCipher, MemoryCipherError

VEK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def _reference(vek: bytes, gpa: int, data: bytes) -> bytes:
    """Keystream block at address a is AES(VEK, BE128(a // 16)); built without the module."""
    first, last = gpa // 16, (gpa + len(data) + 15) // 16
    counters = b"".join(i.to_bytes(16, "big") for i in range(first, last))
    stream = Cipher(algorithms.AES(vek), modes.ECB()).encryptor().update(counters)
    skip = gpa % 16
    return bytes(a ^ b for a, b in zip(data, stream[skip : skip + len(data)], strict=True))


def test_matches_the_documented_construction() -> None:
    plaintext = os.urandom(4096 + 48)
    cipher = GuestMemoryCipher(VEK)
    assert cipher.encrypt(0x7FFF_F000, plaintext) == _reference(VEK, 0x7FFF_F000, plaintext)
    assert cipher.encrypt(0x1003, plaintext[:100]) == _reference(VEK, 0x1003, plaintext[:100])


def test_same_plaintext_differs_by_address_and_by_key() -> None:
    page = bytes(4096)
    ours, theirs = GuestMemoryCipher(VEK), GuestMemoryCipher(os.urandom(16))
    here = ours.encrypt(0x10_0000, page)
    assert here != ours.encrypt(0x10_1000, page)
    assert here != theirs.encrypt(0x10_0000, page)
    # Moved ciphertext does not decrypt to the guest's data at the new place or under another key.
    assert ours.decrypt(0x10_1000, here) != page
    assert theirs.decrypt(0x10_0000, here) != page
    assert ours.decrypt(0x10_0000, here) == page


def test_a_run_of_pages_equals_its_pages_one_by_one() -> None:
    cipher = GuestMemoryCipher(VEK)
    run = os.urandom(4096 * 8)
    whole = cipher.encrypt(0x20_0000, run)
    pieces = b"".join(
        cipher.encrypt(0x20_0000 + i * 4096, run[i * 4096 : (i + 1) * 4096]) for i in range(8)
    )
    assert whole == pieces


@settings(max_examples=100, deadline=None)
@given(gpa=st.integers(0, (1 << 52)), start=st.integers(0, 300), length=st.integers(0, 300))
def test_any_sub_range_decrypts_alone(gpa: int, start: int, length: int) -> None:
    cipher = GuestMemoryCipher(VEK)
    plaintext = bytes(range(256)) * 3
    ciphertext = cipher.encrypt(gpa, plaintext)
    piece = ciphertext[start : start + length]
    assert cipher.decrypt(gpa + start, piece) == plaintext[start : start + length]


def test_top_of_the_address_space() -> None:
    gpa = (1 << 64) - 4096
    data = os.urandom(4096)
    assert GuestMemoryCipher(VEK).encrypt(gpa, data) == _reference(VEK, gpa, data)


def test_writes_into_a_buffer_even_in_place() -> None:
    cipher = GuestMemoryCipher(VEK)
    plaintext = os.urandom(4096 * 3 + 7)
    expected = cipher.encrypt(0x3000, plaintext)
    memory = bytearray(plaintext)
    assert cipher.encrypt(0x3000, memory, out=memory) is memory
    assert memory == expected
    guest = np.zeros(len(plaintext), np.uint8)
    cipher.decrypt(0x3000, memory, out=guest)
    assert guest.tobytes() == plaintext
    tiny = bytearray(5)
    cipher.encrypt(0x3001, plaintext[:5], out=tiny)
    assert tiny == cipher.encrypt(0x3001, plaintext[:5])


@pytest.mark.parametrize(
    "call",
    [
        lambda: GuestMemoryCipher(bytes(15)),
        lambda: GuestMemoryCipher(VEK).encrypt(-16, bytes(16)),
        lambda: GuestMemoryCipher(VEK).encrypt(1 << 64, bytes(16)),
        lambda: GuestMemoryCipher(VEK).encrypt((1 << 64) - 16, bytes(32)),
        lambda: GuestMemoryCipher(VEK).encrypt(1.5, bytes(16)),  # type: ignore[arg-type]
        lambda: GuestMemoryCipher(VEK).encrypt(0, "text"),  # type: ignore[arg-type]
        lambda: GuestMemoryCipher(VEK).encrypt(0, bytes(16), out=bytearray(15)),
        lambda: GuestMemoryCipher(VEK).encrypt(0, bytes(16), out=bytes(16)),
    ],
    ids=["short vek", "negative", "past 2^64", "run past 2^64", "float", "str", "short out", "ro out"],
)
def test_bad_input_is_the_typed_error(call) -> None:
    with pytest.raises(MemoryCipherError):
        call()


def test_numpy_integer_addresses_are_accepted() -> None:
    cipher = GuestMemoryCipher(VEK)
    assert cipher.encrypt(np.uint64(0x2000), bytes(32)) == cipher.encrypt(0x2000, bytes(32))
