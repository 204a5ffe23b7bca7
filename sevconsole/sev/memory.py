"""The at-rest memory encryption model: guest memory as the hypervisor sees it.

Real SEV encrypts each guest's memory in the memory controller with the guest's VEK and an
address tweak (an XEX-like mode), so the hypervisor only sees ciphertext, and the same
plaintext at another physical address, or in another guest, reads differently: a page cannot
simply be copied from one place or one host to another. That is why migration must go through
SEND/RECEIVE_UPDATE_DATA, which re-encrypts pages under the transport keys.

The model: AES-128-CTR keyed by the VEK, the 128-bit big-endian counter of the 16-byte block
at guest physical address `gpa` being `gpa // 16`. Hence:

- the keystream byte at an address is a fixed function of (VEK, address): encrypting a run
  of contiguous pages in one call equals encrypting each page on its own, and a sub-range can
  be decrypted alone (any byte offset works; it need not be block-aligned);
- another address or another VEK gives other ciphertext for the same plaintext.

Limits (it is a model, not XEX/XTS): CTR is malleable and rewriting an address reuses its
keystream, so it does not give the confidentiality real SEV gives against a hypervisor that
watches a page change; it gives exactly the property migration depends on (ciphertext at rest
is bound to the key and the address) and costs one AES call per contiguous run.
"""

from __future__ import annotations

import operator
from typing import TypeVar, overload

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

VEK_LEN = 16
MAX_GPA = 1 << 64  # guest physical addresses are below 2^64


Buffer = bytes | bytearray | memoryview | np.ndarray
WritableBuffer = bytearray | memoryview | np.ndarray
W = TypeVar("W", bound=WritableBuffer)  # encrypt/decrypt return the `out` they are given


def _byte_view(data: Buffer, name: str) -> memoryview:
    """A flat byte view of any contiguous buffer (bytes, bytearray, memoryview, numpy array)."""
    try:
        if isinstance(data, np.ndarray):
            return data.reshape(-1).view(np.uint8).data.cast("B")
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise MemoryCipherError(f"{name} is not a contiguous byte buffer: {exc}") from exc


class MemoryCipherError(ValueError):
    """A bad key, address or buffer given to the memory model."""


class GuestMemoryCipher:
    """Encrypts and decrypts guest memory at rest with one guest's VEK and an address tweak."""

    __slots__ = ("_aes",)

    def __init__(self, vek: bytes) -> None:
        vek = bytes(vek)
        if len(vek) != VEK_LEN:
            raise MemoryCipherError(f"the VEK is {len(vek)} bytes; a SEV VEK is {VEK_LEN} (AES-128)")
        self._aes = algorithms.AES(vek)

    def _apply(self, gpa: int, data: Buffer, out: WritableBuffer | None) -> Buffer:
        view = _byte_view(data, "the data")
        length = view.nbytes
        try:
            gpa = operator.index(gpa)
        except TypeError:
            raise MemoryCipherError(f"guest physical address {gpa!r} is not an integer") from None
        if gpa < 0 or gpa + length > MAX_GPA:
            raise MemoryCipherError(
                f"guest physical address {gpa!r} (+{length} bytes) is outside 0..2^64"
            )
        block, skip = divmod(gpa, 16)
        enc = Cipher(self._aes, modes.CTR(block.to_bytes(16, "big"))).encryptor()
        if skip:
            enc.update(bytes(skip))  # advance to the byte offset inside the first block
        if out is None:
            return enc.update(view)
        target = _byte_view(out, "the output buffer")
        if target.readonly or target.nbytes != length:
            raise MemoryCipherError(
                f"the output buffer must be writable and {length} bytes long (it is "
                f"{target.nbytes} bytes{', read-only' if target.readonly else ''})"
            )
        # update_into wants 15 bytes of slack past its input: the last 15 go through update().
        head = max(length - 15, 0)
        if head:
            enc.update_into(view[:head], target)
        if head < length:
            target[head:] = enc.update(view[head:])
        return out

    @overload
    def encrypt(self, gpa: int, plaintext: Buffer, out: None = None) -> bytes: ...
    @overload
    def encrypt(self, gpa: int, plaintext: Buffer, out: W) -> W: ...

    def encrypt(self, gpa: int, plaintext: Buffer, out: WritableBuffer | None = None) -> Buffer:
        """Ciphertext of `plaintext` stored at `gpa` (a run of any length, one AES call).

        With `out`, the result is written there (it may be the input itself) and `out` is returned.
        """
        return self._apply(gpa, plaintext, out)

    @overload
    def decrypt(self, gpa: int, ciphertext: Buffer, out: None = None) -> bytes: ...
    @overload
    def decrypt(self, gpa: int, ciphertext: Buffer, out: W) -> W: ...

    def decrypt(self, gpa: int, ciphertext: Buffer, out: WritableBuffer | None = None) -> Buffer:
        """Plaintext of `ciphertext` read at `gpa` (CTR: the same operation as encrypt)."""
        return self._apply(gpa, ciphertext, out)
