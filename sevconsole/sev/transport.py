"""SEV transport cryptography: key derivation, the 128-byte session, and the 52-byte packets.

Everything follows section 4 of the SEV reference:

- `kdf` is NIST SP 800-108 counter mode with HMAC-SHA256, block i (from 1) being
  `HMAC(K, LE32(i) || label || 0x00 || context || LE32(L_bits))`.
- `master = kdf(Z, "sev-master-secret", nonce)`, `KEK = kdf(master, "sev-kek")`,
  `KIK = kdf(master, "sev-kik")`; Z is the ECDH P-384 shared x-coordinate (`ecdh_z`).
- The session wraps TEK || TIK with AES-128-CTR(KEK, wrap_iv), MACs the wrap with the KIK and
  binds the guest policy with `HMAC(TIK, LE32(policy))`.
- A packet is AES-128-CTR(TEK, fresh IV) then HMAC-SHA256(TIK, AAD || ciphertext)
  (encrypt-then-MAC); the 29-byte AAD is `0x02 || LE32(flags) || IV || LE32(len) || LE32(len)`.
  Opening checks the MAC before anything is decrypted.

Batch paths (`seal_pages`, `open_pages`) avoid per-page cipher objects: each page has its own
random IV, but a CTR keystream is only AES over counter blocks, so the counter blocks of many
pages are laid out with numpy and encrypted in ONE AES-ECB call per chunk (cache-sized), then
XORed with numpy. The MAC is per page by format; it reuses one keyed HMAC state (`copy()`),
so the key schedule is not redone per page. Pass `out=` to write into a caller's buffer (guest
memory, a reused send buffer): fresh large allocations cost page faults that can outweigh the
crypto itself.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SESSION_LEN = 128
HEADER_LEN = 52
AAD_LEN = 29
KEY_LEN = 16
IV_LEN = 16
MAC_LEN = 32
Z_LEN = 48  # P-384 x-coordinate
MAX_PACKET_LEN = 0x5000  # SEND/RECEIVE_UPDATE_DATA's largest guest_len
FLAG_COMPRESSED = 0x1
DEFAULT_PAGE_SIZE = 4096

# Pages per AES-ECB call in the batch paths: ~64 KiB of keystream stays in L2 between the AES
# call and the XOR, and the per-chunk Python cost is shared by 16 pages.
_CHUNK_BYTES = 64 * 1024

_AAD = struct.Struct("<BI16sII")
_HEADER = struct.Struct("<I16s32s")
_LE32 = struct.Struct("<I")


class HasU32(Protocol):
    def to_u32(self) -> int: ...


class TransportFormatError(ValueError):
    """Transport bytes or parameters of the wrong shape (length, flags, curve); `.field` names the part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_INTEGRITY_SENTENCES = {
    "wrap_mac": (
        "the session's wrap_mac does not verify: the TEK/TIK were wrapped for another PDH key pair "
        "(check that the target's PDH and the source's PDH certificate are the ones this "
        "migration exchanged) or the session was altered in transit"
    ),
    "policy_mac": (
        "the session's policy_mac does not verify: the guest policy sent with the session is not "
        "the one the source firmware bound to it (policy altered or mixed up between guests)"
    ),
    "packet_mac": (
        "the packet's MAC does not verify: the ciphertext, its header or its length was altered, "
        "or it was sealed with another session's TIK; nothing was decrypted"
    ),
}


class IntegrityError(Exception):
    """A MAC did not verify (the firmware answers BAD_MEASUREMENT).

    `what` is "wrap_mac", "policy_mac" or "packet_mac"; `page` is the packet index in a batch.
    """

    def __init__(self, what: str, detail: str | None = None, *, page: int | None = None) -> None:
        sentence = detail or _INTEGRITY_SENTENCES.get(what, f"{what} does not verify")
        if page is not None:
            sentence = f"packet {page}: {sentence}"
        super().__init__(sentence)
        self.what = what
        self.page = page
        self.sentence = sentence


# ---------------------------------------------------------------- keys


def _key(name: str, value: bytes, length: int = KEY_LEN) -> bytes:
    value = bytes(value)
    if len(value) != length:
        raise TransportFormatError(name, f"is {len(value)} bytes, expected {length}")
    return value


def kdf(key: bytes, label: bytes | str, context: bytes = b"", length: int = KEY_LEN) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC-SHA256, as the SEV firmware uses it."""
    if isinstance(label, str):
        label = label.encode("ascii")
    if length <= 0:
        raise TransportFormatError("kdf", f"output length {length} must be positive")
    tail = label + b"\x00" + bytes(context) + _LE32.pack(length * 8)
    out = b"".join(
        hmac.digest(key, _LE32.pack(i) + tail, "sha256") for i in range(1, -(-length // 32) + 1)
    )
    return out[:length]


def master_secret(z: bytes, nonce: bytes) -> bytes:
    return kdf(z, b"sev-master-secret", _key("nonce", nonce, IV_LEN))


def kek_kik(master: bytes) -> tuple[bytes, bytes]:
    return kdf(master, b"sev-kek"), kdf(master, b"sev-kik")


def ecdh_z(
    private_key: ec.EllipticCurvePrivateKey, peer_public_key: ec.EllipticCurvePublicKey
) -> bytes:
    """The 48-byte shared x-coordinate (big-endian) of an ECDH on P-384."""
    for name, key in (("own PDH key", private_key), ("peer PDH key", peer_public_key)):
        if not isinstance(key.curve, ec.SECP384R1):
            raise TransportFormatError(
                name, f"is on curve {key.curve.name}, SEV key agreement needs P-384 (secp384r1)"
            )
    return private_key.exchange(ec.ECDH(), peer_public_key)


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def _policy_u32(policy: int | HasU32) -> int:
    value = policy if isinstance(policy, int) else policy.to_u32()
    if not 0 <= value <= 0xFFFFFFFF:
        raise TransportFormatError("policy", f"0x{value:x} does not fit in 32 bits")
    return value


# ---------------------------------------------------------------- session


@dataclass(frozen=True)
class Session:
    """The 128-byte SEND_START session: nonce, wrapped TEK||TIK, wrap IV and two MACs."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def to_bytes(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        data = bytes(data)
        if len(data) != SESSION_LEN:
            raise TransportFormatError(
                "session", f"is {len(data)} bytes, a SEV session is exactly {SESSION_LEN}"
            )
        return cls(data[0:16], data[16:48], data[48:64], data[64:96], data[96:128])


def build_session(
    z: bytes,
    tek: bytes,
    tik: bytes,
    policy: int | HasU32,
    nonce: bytes | None = None,
    wrap_iv: bytes | None = None,
) -> Session:
    """Wrap TEK and TIK for the peer whose ECDH gave `z`; nonce and wrap IV are random if omitted."""
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    nonce = os.urandom(IV_LEN) if nonce is None else _key("nonce", nonce, IV_LEN)
    wrap_iv = os.urandom(IV_LEN) if wrap_iv is None else _key("wrap_iv", wrap_iv, IV_LEN)
    kek, kik = kek_kik(master_secret(z, nonce))
    wrap_tk = _ctr(kek, wrap_iv, tek + tik)
    return Session(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=hmac.digest(kik, wrap_tk, "sha256"),
        policy_mac=hmac.digest(tik, _LE32.pack(_policy_u32(policy)), "sha256"),
    )


def open_session(z: bytes, session: Session | bytes, policy: int | HasU32) -> tuple[bytes, bytes]:
    """Unwrap (TEK, TIK); wrap_mac is checked before unwrapping, then policy_mac."""
    if not isinstance(session, Session):
        session = Session.from_bytes(session)
    kek, kik = kek_kik(master_secret(z, session.nonce))
    if not hmac.compare_digest(hmac.digest(kik, session.wrap_tk, "sha256"), session.wrap_mac):
        raise IntegrityError("wrap_mac")
    keys = _ctr(kek, session.wrap_iv, session.wrap_tk)
    tek, tik = keys[:KEY_LEN], keys[KEY_LEN:]
    value = _policy_u32(policy)
    if not hmac.compare_digest(hmac.digest(tik, _LE32.pack(value), "sha256"), session.policy_mac):
        raise IntegrityError(
            "policy_mac",
            f"the session's policy_mac does not verify for policy 0x{value:08x}: the policy sent "
            "with the session is not the one the source firmware bound to it",
        )
    return tek, tik


# ---------------------------------------------------------------- packets


@dataclass(frozen=True)
class PacketHeader:
    """The 52-byte SEND_UPDATE_DATA header: flags (bit 0 COMPRESSED), IV, MAC."""

    flags: int
    iv: bytes
    mac: bytes

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.flags, self.iv, self.mac)

    @classmethod
    def from_bytes(cls, data: bytes) -> PacketHeader:
        # hdr_len may exceed 52 (the firmware accepts >= 52); only the first 52 bytes count.
        if len(data) < HEADER_LEN:
            raise TransportFormatError(
                "packet header", f"is {len(data)} bytes, a SEV packet header is {HEADER_LEN}"
            )
        flags, iv, mac = _HEADER.unpack_from(data)
        return cls(flags, iv, mac)


def aad(flags: int, iv: bytes, length: int) -> bytes:
    """The 29 bytes MACed ahead of the ciphertext."""
    return _AAD.pack(2, flags, iv, length, length)


def _check_len(length: int, what: str = "packet") -> None:
    if length <= 0 or length % 16 or length > MAX_PACKET_LEN:
        raise TransportFormatError(
            what,
            f"length {length} is not allowed: it must be a non-zero multiple of 16 "
            f"up to 0x{MAX_PACKET_LEN:x}",
        )


def _check_flags(flags: int, page: int | None = None) -> None:
    where = "packet header" if page is None else f"packet {page} header"
    if flags & FLAG_COMPRESSED:
        raise TransportFormatError(where, "the COMPRESSED flag is set; compression is not supported")
    if flags:
        raise TransportFormatError(where, f"unknown flag bits 0x{flags:08x} are set")


class _Mac:
    """HMAC-SHA256 keyed once; each message starts from a copy of the keyed state."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        self._base = crypto_hmac.HMAC(key, hashes.SHA256())

    def __call__(self, head: bytes | memoryview, body: bytes | memoryview) -> bytes:
        h = self._base.copy()
        h.update(head)
        h.update(body)
        return h.finalize()


def seal_packet(
    tek: bytes, tik: bytes, plaintext: bytes, iv: bytes | None = None
) -> tuple[bytes, bytes]:
    """Encrypt then MAC one packet; returns (52-byte header, ciphertext of the same length)."""
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    _check_len(len(plaintext))
    iv = os.urandom(IV_LEN) if iv is None else _key("iv", iv, IV_LEN)
    ciphertext = _ctr(tek, iv, plaintext)
    mac = hmac.digest(tik, aad(0, iv, len(ciphertext)) + ciphertext, "sha256")
    return _HEADER.pack(0, iv, mac), ciphertext


def open_packet(tek: bytes, tik: bytes, header: bytes, ciphertext: bytes) -> bytes:
    """Check the MAC, then decrypt; `IntegrityError("packet_mac")` leaves nothing decrypted."""
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    _check_len(len(ciphertext))
    hdr = PacketHeader.from_bytes(header)
    _check_flags(hdr.flags)
    mac = hmac.digest(tik, aad(hdr.flags, hdr.iv, len(ciphertext)) + bytes(ciphertext), "sha256")
    if not hmac.compare_digest(mac, hdr.mac):
        raise IntegrityError("packet_mac")
    return _ctr(tek, hdr.iv, ciphertext)


# ---------------------------------------------------------------- batches


def _byte_array(data: object, name: str) -> np.ndarray:
    """A flat uint8 view (no copy) of any contiguous buffer."""
    try:
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).view(np.uint8)
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TransportFormatError(name, f"is not a contiguous byte buffer: {exc}") from exc


def _writable(out: object, length: int, name: str) -> np.ndarray:
    view = _byte_array(out, name)
    if view.size != length:
        raise TransportFormatError(name, f"is {view.size} bytes, the batch needs exactly {length}")
    if not view.flags.writeable:
        raise TransportFormatError(name, "is read-only; pass a bytearray, memoryview or numpy array")
    return view


def _plan(total: int, page_size: int) -> tuple[int, int]:
    """(full pages, length of a last shorter page or 0), after checking the sizes."""
    _check_len(page_size, "page_size")
    if total <= 0 or total % 16:
        raise TransportFormatError(
            "batch", f"length {total} is not allowed: it must be a non-zero multiple of 16"
        )
    return total // page_size, total % page_size


def _ctr_pages(
    tek: bytes,
    ivs: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    page_size: int,
    first: int,
    count: int,
    keystream: _Keystream,
) -> None:
    """dst[pages] = src[pages] XOR AES-CTR(TEK, iv_i) for `count` whole pages from `first`."""
    keystream.run(ivs[first : first + count], count)
    lo, hi = first * page_size, (first + count) * page_size
    np.bitwise_xor(src[lo:hi], keystream.bytes[: hi - lo], out=dst[lo:hi])
    # A counter whose low 64 bits wrap inside the page would carry into the high word; the
    # vector layout does not carry, so such a page (odds ~2^-56 for random IVs) goes the slow way.
    wraps = keystream.wraps
    if wraps is not None:
        for i in np.flatnonzero(wraps):
            p = first + int(i)
            a, b = p * page_size, (p + 1) * page_size
            dst[a:b] = np.frombuffer(_ctr(tek, ivs[p].tobytes(), src[a:b].tobytes()), np.uint8)


class _Keystream:
    """Counter blocks of up to `chunk` pages, laid out with numpy, encrypted by one AES-ECB call."""

    def __init__(self, tek: bytes, page_size: int, chunk: int) -> None:
        self.blocks = page_size // 16
        self._ecb = Cipher(algorithms.AES(tek), modes.ECB()).encryptor()
        self._counters = np.empty((chunk, self.blocks, 2), dtype=">u8")
        self._steps = np.arange(self.blocks, dtype=np.uint64)
        self._out = bytearray(chunk * page_size + 16)  # update_into wants a block of slack
        self.bytes = np.frombuffer(self._out, dtype=np.uint8)
        self.wraps: np.ndarray | None = None

    def run(self, ivs: np.ndarray, count: int) -> None:
        words = ivs.view(">u8").astype(np.uint64)  # (count, 2): high, low halves of each IV
        counters = self._counters[:count]
        counters[:, :, 0] = words[:, 0, None]
        counters[:, :, 1] = words[:, 1, None] + self._steps
        wraps = words[:, 1] > np.uint64(2**64 - self.blocks)
        self.wraps = wraps if wraps.any() else None
        self._ecb.update_into(counters.reshape(-1).view(np.uint8), self._out)


def _ivs_array(ivs: bytes | None, count: int) -> np.ndarray:
    if ivs is None:
        ivs = os.urandom(IV_LEN * count)
    elif len(ivs) != IV_LEN * count:
        raise TransportFormatError(
            "ivs", f"is {len(ivs)} bytes, {count} packets need {IV_LEN * count} (16 each)"
        )
    return np.frombuffer(bytes(ivs), dtype=np.uint8).reshape(count, IV_LEN)


def _split_headers(headers: Sequence[bytes] | bytes, count: int) -> list[bytes]:
    if isinstance(headers, bytes | bytearray | memoryview):
        blob = bytes(headers)
        if len(blob) != HEADER_LEN * count:
            raise TransportFormatError(
                "headers", f"is {len(blob)} bytes, {count} packets need {HEADER_LEN * count}"
            )
        return [blob[i * HEADER_LEN : (i + 1) * HEADER_LEN] for i in range(count)]
    if len(headers) != count:
        raise TransportFormatError(
            "headers", f"holds {len(headers)} headers for {count} packets of ciphertext"
        )
    return [bytes(h) for h in headers]


def packet_count(total: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    full, rest = _plan(total, page_size)
    return full + (1 if rest else 0)


def seal_pages(
    tek: bytes,
    tik: bytes,
    plaintext: bytes | bytearray | memoryview | np.ndarray,
    page_size: int = DEFAULT_PAGE_SIZE,
    *,
    ivs: bytes | None = None,
    out: bytearray | memoryview | np.ndarray | None = None,
) -> tuple[list[bytes], bytes | bytearray | memoryview | np.ndarray]:
    """Seal a run of packets of `page_size` bytes (the last may be shorter, a multiple of 16).

    Returns (one 52-byte header per packet, ciphertext of the run). `ivs` (16 bytes a packet)
    replaces the random IVs, for tests; `out` receives the ciphertext and is returned.
    """
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    src = _byte_array(plaintext, "plaintext")
    full, rest = _plan(src.size, page_size)
    count = full + (1 if rest else 0)
    iv_arr = _ivs_array(ivs, count)
    dst = np.empty(src.size, np.uint8) if out is None else _writable(out, src.size, "out")
    dst_mv = memoryview(dst)
    mac = _Mac(tik)
    head = np.zeros((count, AAD_LEN), np.uint8)  # every packet's AAD, built in one go
    head[:, 0] = 2
    head[:, 5:21] = iv_arr
    head[:full, 21:29] = np.frombuffer(_LE32.pack(page_size) * 2, np.uint8)
    head_mv = memoryview(head.reshape(-1))
    macs: list[bytes] = []
    chunk = max(1, _CHUNK_BYTES // page_size)
    keystream = _Keystream(tek, page_size, min(chunk, max(full, 1)))
    for first in range(0, full, chunk):
        n = min(chunk, full - first)
        _ctr_pages(tek, iv_arr, src, dst, page_size, first, n, keystream)
        # MAC while the chunk's ciphertext is still in cache.
        for p in range(first, first + n):
            macs.append(
                mac(head_mv[p * AAD_LEN : (p + 1) * AAD_LEN], dst_mv[p * page_size : (p + 1) * page_size])
            )
    if rest:
        header, tail = seal_packet(tek, tik, src[full * page_size :].tobytes(), iv_arr[full].tobytes())
        dst[full * page_size :] = np.frombuffer(tail, np.uint8)
        macs.append(header[20:])
    zero = b"\x00\x00\x00\x00"
    headers = [zero + iv_arr[p].tobytes() + macs[p] for p in range(count)]
    return headers, (dst.tobytes() if out is None else out)


def open_pages(
    tek: bytes,
    tik: bytes,
    headers: Sequence[bytes] | bytes,
    ciphertext: bytes | bytearray | memoryview | np.ndarray,
    page_size: int = DEFAULT_PAGE_SIZE,
    *,
    out: bytearray | memoryview | np.ndarray | None = None,
) -> bytes | bytearray | memoryview | np.ndarray:
    """Check every packet's MAC, then decrypt the run; on a bad MAC nothing is produced.

    `headers` is one header per packet (or their 52-byte concatenation). `out` receives the
    plaintext (it is left untouched when a MAC fails) and is returned.
    """
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    src = _byte_array(ciphertext, "ciphertext")
    full, rest = _plan(src.size, page_size)
    count = full + (1 if rest else 0)
    hdrs = _split_headers(headers, count)
    if out is not None:
        dst = _writable(out, src.size, "out")
    src_mv = memoryview(src)
    mac = _Mac(tik)
    iv_arr = np.empty((count, IV_LEN), np.uint8)
    length_tail = _LE32.pack(page_size) * 2
    expected: list[bytes] = []
    computed: list[bytes] = []
    for p, raw in enumerate(hdrs):
        if len(raw) < HEADER_LEN:
            raise TransportFormatError(
                f"packet {p} header", f"is {len(raw)} bytes, a SEV packet header is {HEADER_LEN}"
            )
        flags, iv, tag = _HEADER.unpack_from(raw)
        if flags:
            _check_flags(flags, p)
        iv_arr[p] = np.frombuffer(iv, np.uint8)
        a = p * page_size
        b = min(a + page_size, src.size)
        tail = length_tail if b - a == page_size else _LE32.pack(b - a) * 2
        computed.append(mac(b"\x02\x00\x00\x00\x00" + iv + tail, src_mv[a:b]))
        expected.append(tag)
    # One constant-time comparison for the batch; find the culprit only on failure.
    if not hmac.compare_digest(b"".join(computed), b"".join(expected)):
        bad = next(p for p in range(count) if not hmac.compare_digest(computed[p], expected[p]))
        raise IntegrityError("packet_mac", page=bad)
    if out is None:
        dst = np.empty(src.size, np.uint8)
    chunk = max(1, _CHUNK_BYTES // page_size)
    keystream = _Keystream(tek, page_size, min(chunk, max(full, 1)))
    for first in range(0, full, chunk):
        _ctr_pages(tek, iv_arr, src, dst, page_size, first, min(chunk, full - first), keystream)
    if rest:
        a = full * page_size
        dst[a:] = np.frombuffer(_ctr(tek, iv_arr[full].tobytes(), src[a:].tobytes()), np.uint8)
    return dst.tobytes() if out is None else out
