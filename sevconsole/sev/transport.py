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
random IV, but a CTR keystream is only AES over counter blocks, so the counter blocks of up to
256 KiB of packets are laid out with numpy and encrypted by ONE AES-ECB call, then XORed in
with numpy. The MAC is per packet by format; one keyed HMAC is `copy()`-ed per packet, and all
AADs and headers are built in one go. Each thread keeps its scratch buffer, the AES-ECB
contexts of its last few TEKs and the keyed HMACs of its last few TIKs (a fresh 256 KiB buffer
costs page faults, a fresh AES context ~15 us: both more than a page's crypto). Runs of fewer
than 4 packets, and single packets, skip the vectorised set-up: their counter blocks come from
the IV's two 64-bit halves as plain ints, one packet at a time.

Pass `out=` to write into a caller's buffer (guest memory, a reused send buffer): a fresh large
result costs page faults that can outweigh the crypto itself. `benchmarks/crypto.py` measures
the batch paths against the raw primitives.

Errors: `TransportFormatError` (a ValueError; `.field`) for bytes or parameters of the wrong
shape, `IntegrityError` (`.what`, `.page`, `.sentence`) for a MAC that does not verify.
"""

from __future__ import annotations

import hmac
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

SESSION_LEN = 128
HEADER_LEN = 52
AAD_LEN = 29
KEY_LEN = 16
IV_LEN = 16
MAC_LEN = 32
MAX_PACKET_LEN = 0x5000  # SEND/RECEIVE_UPDATE_DATA's largest guest_len
FLAG_COMPRESSED = 0x1
DEFAULT_PAGE_SIZE = 4096

# Bytes of packets per AES-ECB call in the batch paths: 256 KiB of counters, keystream and data
# stay in L2 between the AES call, the XOR and the MACs, and the per-chunk numpy calls are
# shared by 64 pages (measured: 64 KiB chunks cost ~15% more per page, 1 MiB no less).
_CHUNK_BYTES = 256 * 1024

_AAD = struct.Struct("<BI16sII")
_HEADER = struct.Struct("<I16s32s")
_LE32 = struct.Struct("<I")
_IV_HALVES = struct.Struct(">QQ")


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


def _bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str | int) or value is None:  # bytes(int) would make zeros
        raise TransportFormatError(name, f"must be bytes, not {type(value).__name__}")
    try:
        return bytes(cast("ReadableBuffer", value))  # bytes() itself refuses what is not a buffer
    except (TypeError, ValueError) as exc:
        raise TransportFormatError(name, f"must be bytes, not {type(value).__name__}") from exc


def _key(name: str, value: bytes, length: int = KEY_LEN) -> bytes:
    value = _bytes(name, value)
    if len(value) != length:
        raise TransportFormatError(name, f"is {len(value)} bytes, expected {length}")
    return value


def kdf(key: bytes, label: bytes | str, context: bytes = b"", length: int = KEY_LEN) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC-SHA256, as the SEV firmware uses it."""
    if isinstance(label, str):
        try:
            label = label.encode("ascii")
        except UnicodeEncodeError:
            raise TransportFormatError("kdf label", f"{label!r} is not ASCII") from None
    if not isinstance(length, int) or not 0 < length <= 32 * 0xFFFF:
        raise TransportFormatError("kdf", f"output length {length!r} must be a positive integer")
    key = _bytes("kdf key", key)
    tail = _bytes("kdf label", label) + b"\x00" + _bytes("kdf context", context) + _LE32.pack(length * 8)
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
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TransportFormatError("own PDH key", "is not an EC private key")
    if not isinstance(peer_public_key, ec.EllipticCurvePublicKey):
        raise TransportFormatError("peer PDH key", "is not an EC public key")
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
    if isinstance(policy, int):
        value = policy
    elif callable(getattr(policy, "to_u32", None)):
        value = policy.to_u32()
    else:
        raise TransportFormatError("policy", f"must be an int or a GuestPolicy, not {type(policy).__name__}")
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
        data = _bytes("session", data)
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

    def __post_init__(self) -> None:
        if not isinstance(self.flags, int) or not 0 <= self.flags <= 0xFFFFFFFF:
            raise TransportFormatError("packet header", f"flags {self.flags!r} are not a u32")
        _key("packet IV", self.iv, IV_LEN)
        _key("packet MAC", self.mac, MAC_LEN)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.flags, self.iv, self.mac)

    @classmethod
    def from_bytes(cls, data: bytes) -> PacketHeader:
        # hdr_len may exceed 52 (the firmware accepts >= 52); only the first 52 bytes count.
        data = _bytes("packet header", data)
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


def seal_packet(
    tek: bytes, tik: bytes, plaintext: bytes, iv: bytes | None = None
) -> tuple[bytes, bytes]:
    """Encrypt then MAC one packet; returns (52-byte header, ciphertext of the same length)."""
    src = _byte_array(plaintext, "plaintext")
    _check_len(src.size)
    if iv is not None:
        iv = _key("iv", iv, IV_LEN)
    headers, ciphertext = seal_pages(tek, tik, src, src.size, ivs=iv)
    return headers[0], ciphertext  # type: ignore[return-value]


def open_packet(tek: bytes, tik: bytes, header: bytes, ciphertext: bytes) -> bytes:
    """Check the MAC, then decrypt; `IntegrityError("packet_mac")` leaves nothing decrypted."""
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    src = _byte_array(ciphertext, "ciphertext")
    _check_len(src.size)
    hdr = PacketHeader.from_bytes(header)
    _check_flags(hdr.flags)
    return _open_small(tek, tik, hdr.to_bytes(), src, None, src.size, single=True).tobytes()


# ---------------------------------------------------------------- batches


def _byte_array(data: object, name: str) -> np.ndarray:
    """A flat uint8 view (no copy) of any contiguous buffer."""
    try:
        if isinstance(data, bytes | bytearray):
            return np.frombuffer(data, dtype=np.uint8)
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


class _Scratch(threading.local):
    """Per-thread reusable state of the batch paths.

    A fresh 256 KiB buffer per call costs page faults that outweigh the crypto of a short run,
    and creating an AES context costs ~15 us, so each thread keeps one scratch buffer and the
    ECB contexts of its last few TEKs (ECB carries no state between whole-block calls).
    """

    def __init__(self) -> None:
        self.buffer = bytearray(_CHUNK_BYTES + 16)  # counters, then keystream (ECB in place)
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        self.view = memoryview(self.buffer)
        self.ecb: OrderedDict[bytes, CipherContext] = OrderedDict()
        self.macs: OrderedDict[bytes, crypto_hmac.HMAC] = OrderedDict()
        self._counters: dict[tuple[int, int], np.ndarray] = {}

    def counters(self, pages: int, blocks: int) -> np.ndarray:
        """The buffer seen as (pages, blocks, 2) big-endian u64 counter halves."""
        key = (pages, blocks)
        view = self._counters.get(key)
        if view is None:
            if len(self._counters) > 64:
                self._counters.clear()
            view = self.bytes[: pages * blocks * 16].view(">u8").reshape(pages, blocks, 2)
            self._counters[key] = view
        return view

    def ecb_for(self, tek: bytes) -> CipherContext:
        ecb = self.ecb.pop(tek, None)
        if ecb is None:
            ecb = Cipher(algorithms.AES(tek), modes.ECB()).encryptor()
            while len(self.ecb) >= _ECB_CACHE:
                self.ecb.popitem(last=False)
        self.ecb[tek] = ecb
        return ecb

    def mac_for(self, tik: bytes) -> crypto_hmac.HMAC:
        """A keyed HMAC-SHA256 that is only ever copied, never updated."""
        mac = self.macs.pop(tik, None)
        if mac is None:
            mac = crypto_hmac.HMAC(tik, hashes.SHA256())
            while len(self.macs) >= _ECB_CACHE:
                self.macs.popitem(last=False)
        self.macs[tik] = mac
        return mac


_ECB_CACHE = 8
_SMALL_RUN = 4  # pages; below this, scalar counter halves beat the vectorised set-up
_scratch = _Scratch()


_STEPS = {blocks: np.arange(blocks, dtype=np.uint64) for blocks in range(1, MAX_PACKET_LEN // 16 + 1)}


class _Keystream:
    """AES-CTR keystreams of a run of packets, each with its own IV, a chunk at a time.

    The counter blocks IV_p + j of up to `chunk` pages are laid out with numpy and encrypted by
    ONE AES-ECB call (that is all CTR is), then XORed in with numpy: no cipher object per page.
    The layout adds j to the low 64 bits of the IV only; a page whose low half would wrap needs
    a carry into the high half (odds ~2^-56 for a random IV): it gets a CTR cipher of its own.
    """

    def __init__(self, tek: bytes, ivs: np.ndarray, page_size: int, chunk: int) -> None:
        self.tek, self.ivs, self.page = tek, ivs, page_size
        blocks = page_size // 16
        scratch = _scratch
        self._ecb = scratch.ecb_for(tek)
        self._buffer, self._bytes, self._view = scratch.buffer, scratch.bytes, scratch.view
        self._steps = _STEPS[blocks]
        self._words = ivs.view(">u8").astype(np.uint64)  # (pages, 2): high, low half of each IV
        lows, limit = self._words[:, 1], np.uint64(2**64 - blocks)
        self._wrapping = (
            set(np.flatnonzero(lows > limit).tolist()) if lows.max() > limit else set()
        )
        self._counters = scratch.counters(chunk, blocks)

    def xor(self, first: int, count: int, src: np.ndarray, dst: np.ndarray) -> None:
        """dst = src XOR keystream for `count` whole pages from page `first`."""
        n = count * self.page
        # Wrapping pages are done first, from src, as dst may be src itself (in place).
        wrapped = (
            {p: self._slow(p, src, self.page) for p in self._wrapping if first <= p < first + count}
            if self._wrapping
            else {}
        )
        words, counters = self._words[first : first + count], self._counters[:count]
        counters[:, :, 0] = words[:, 0, None]
        np.add(words[:, 1, None], self._steps, out=counters[:, :, 1], casting="unsafe")
        self._ecb.update_into(self._view[:n], self._buffer)  # in place: counters -> keystream
        lo = first * self.page
        np.bitwise_xor(src[lo : lo + n], self._bytes[:n], out=dst[lo : lo + n])
        for p, data in wrapped.items():
            dst[p * self.page : (p + 1) * self.page] = data

    def one(self, page: int, src: np.ndarray, dst: np.ndarray, length: int) -> None:
        """The shorter last packet of a run (`length` bytes)."""
        a = page * self.page
        _xor_one(self.tek, self._ecb, self.ivs[page].tobytes(), src[a : a + length], dst[a : a + length])

    def _slow(self, page: int, src: np.ndarray, length: int) -> np.ndarray:
        """One packet through a CTR cipher of its own (which carries across all 128 bits)."""
        a = page * self.page
        out = _ctr(self.tek, self.ivs[page].tobytes(), src[a : a + length].tobytes())
        return np.frombuffer(out, np.uint8)


def _xor_one(tek: bytes, ecb: CipherContext, iv: bytes, src: np.ndarray, dst: np.ndarray) -> None:
    """dst = src XOR the CTR keystream of one packet (the short-run path: scalar IV halves)."""
    n = src.size
    blocks = n // 16
    hi, lo = _IV_HALVES.unpack(iv)
    if lo + blocks > 1 << 64:  # the low half wraps: let a CTR cipher carry (odds ~2^-56)
        dst[:] = np.frombuffer(_ctr(tek, iv, src.tobytes()), np.uint8)
        return
    scratch = _scratch
    counters = scratch.counters(1, blocks)[0]
    counters[:, 0] = hi
    np.add(np.uint64(lo), _STEPS[blocks], out=counters[:, 1], casting="unsafe")
    ecb.update_into(scratch.view[:n], scratch.buffer)
    np.bitwise_xor(src, scratch.bytes[:n], out=dst)


def _seal_small(
    tek: bytes, tik: bytes, src: np.ndarray, dst: np.ndarray, page_size: int, ivs: bytes
) -> list[bytes]:
    """A few packets, one at a time: below _SMALL_RUN the vectorised set-up costs more."""
    ecb, new, body = _scratch.ecb_for(tek), _scratch.mac_for(tik).copy, dst.data
    headers = []
    for p, a in enumerate(range(0, src.size, page_size)):
        b = min(a + page_size, src.size)
        iv = ivs[16 * p : 16 * p + 16]
        _xor_one(tek, ecb, iv, src[a:b], dst[a:b])
        h = new()
        h.update(_AAD.pack(2, 0, iv, b - a, b - a))
        h.update(body[a:b])
        headers.append(_HEADER.pack(0, iv, h.finalize()))
    return headers


def _open_small(
    tek: bytes, tik: bytes, blob: bytes, src: np.ndarray, dst: np.ndarray | None,
    page_size: int, single: bool = False,
) -> np.ndarray:
    """Check the few packets' MACs (flags already checked), then decrypt them into dst."""
    new, view = _scratch.mac_for(tik).copy, src.data
    spans = [(a, min(a + page_size, src.size)) for a in range(0, src.size, page_size)]
    ivs = []
    for p, (a, b) in enumerate(spans):
        _, iv, tag = _HEADER.unpack_from(blob, p * HEADER_LEN)
        h = new()
        h.update(_AAD.pack(2, 0, iv, b - a, b - a))
        h.update(view[a:b])
        if not hmac.compare_digest(h.finalize(), tag):
            raise IntegrityError("packet_mac", page=None if single else p)
        ivs.append(iv)
    if dst is None:
        dst = np.empty(src.size, np.uint8)
    ecb = _scratch.ecb_for(tek)
    for (a, b), iv in zip(spans, ivs, strict=True):
        _xor_one(tek, ecb, iv, src[a:b], dst[a:b])
    return dst


def _iv_array(ivs: bytes | None, count: int) -> np.ndarray:
    if ivs is None:
        ivs = os.urandom(IV_LEN * count)
    elif len(ivs) != IV_LEN * count:
        raise TransportFormatError(
            "ivs", f"is {len(ivs)} bytes, {count} packets need {IV_LEN * count} (16 each)"
        )
    return np.frombuffer(bytes(ivs), dtype=np.uint8).reshape(count, IV_LEN)


def _aads(ivs: np.ndarray, full: int, page_size: int, rest: int) -> memoryview:
    """Every packet's 29-byte AAD as one flat byte view (numpy pays off from a few dozen)."""
    if len(ivs) < 32:
        blob = ivs.tobytes()
        lengths = [_LE32.pack(page_size) * 2] * full + ([_LE32.pack(rest) * 2] if rest else [])
        return memoryview(b"".join(
            b"\x02\x00\x00\x00\x00" + blob[16 * p : 16 * p + 16] + tail
            for p, tail in enumerate(lengths)
        ))
    head = np.zeros((len(ivs), AAD_LEN), np.uint8)
    head[:, 0] = 2  # flags stay zero: this firmware never compresses
    head[:, 5:21] = ivs
    head[:full, 21:29] = np.frombuffer(_LE32.pack(page_size) * 2, np.uint8)
    if rest:
        head[full, 21:29] = np.frombuffer(_LE32.pack(rest) * 2, np.uint8)
    return head.reshape(-1).data


def _mac_run(
    tik: bytes, aads: memoryview, body: memoryview, page_size: int, first: int, stop: int,
    total: int, macs: list[bytes],
) -> None:
    """Append HMAC(TIK, AAD_p || body_p) for pages first..stop-1 (hot loop: locals only)."""
    new = _scratch.mac_for(tik).copy  # keyed once, copied per packet
    append = macs.append
    end = min(stop * page_size, total)
    if stop * page_size > total:  # a shorter last packet: MAC it on its own below
        stop -= 1
    for a, o in zip(
        range(first * AAD_LEN, stop * AAD_LEN, AAD_LEN),
        range(first * page_size, stop * page_size, page_size),
        strict=True,
    ):
        h = new()
        h.update(aads[a : a + AAD_LEN])
        h.update(body[o : o + page_size])
        append(h.finalize())
    if stop * page_size < end:
        h = new()
        h.update(aads[stop * AAD_LEN : (stop + 1) * AAD_LEN])
        h.update(body[stop * page_size : end])
        append(h.finalize())


def _header_blob(headers: Sequence[bytes] | bytes, count: int) -> bytes:
    """The packets' headers as one 52*count-byte blob (extra bytes past 52 are ignored)."""
    if isinstance(headers, bytes | bytearray | memoryview):
        blob = bytes(headers)
        if len(blob) != HEADER_LEN * count:
            raise TransportFormatError(
                "headers", f"is {len(blob)} bytes, {count} packets need {HEADER_LEN * count}"
            )
        return blob
    try:
        headers = [h if isinstance(h, bytes) else _bytes("packet header", h) for h in headers]
    except TypeError:
        raise TransportFormatError("headers", "must be a list of headers or their bytes") from None
    if len(headers) != count:
        raise TransportFormatError(
            "headers", f"holds {len(headers)} headers for {count} packets of ciphertext"
        )
    lengths = [len(h) for h in headers]
    if min(lengths) < HEADER_LEN:
        p = next(i for i, n in enumerate(lengths) if n < HEADER_LEN)
        raise TransportFormatError(
            f"packet {p} header", f"is {lengths[p]} bytes, a SEV packet header is {HEADER_LEN}"
        )
    if max(lengths) == HEADER_LEN:
        return b"".join(headers)
    return b"".join(h[:HEADER_LEN] for h in headers)


def packet_count(total: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """How many packets a run of `total` bytes makes in packets of `page_size`."""
    full, rest = _plan(total, page_size)
    return full + (1 if rest else 0)


def _chunk(page_size: int, full: int) -> int:
    return max(1, min(_CHUNK_BYTES // page_size, full))


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

    Returns (one 52-byte header per packet, ciphertext of the run): the same bytes as
    `seal_packet` on each page with the same IVs. `ivs` (16 bytes a packet) replaces the random
    IVs, for tests; `out` receives the ciphertext and is returned in its place.
    """
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    src = _byte_array(plaintext, "plaintext")
    full, rest = _plan(src.size, page_size)
    count = full + (1 if rest else 0)
    iv_arr = _iv_array(ivs, count)
    dst = np.empty(src.size, np.uint8) if out is None else _writable(out, src.size, "out")
    if count < _SMALL_RUN:
        headers = _seal_small(tek, tik, src, dst, page_size, iv_arr.tobytes())
        return headers, (dst.tobytes() if out is None else out)
    body, aads, total = dst.data, _aads(iv_arr, full, page_size, rest), src.size
    macs: list[bytes] = []
    chunk = _chunk(page_size, full)
    keystream = _Keystream(tek, iv_arr, page_size, chunk)
    for first in range(0, full, chunk):
        stop = min(first + chunk, full)
        keystream.xor(first, stop - first, src, dst)
        # MAC the chunk while its ciphertext is still in cache.
        _mac_run(tik, aads, body, page_size, first, stop, total, macs)
    if rest:
        keystream.one(full, src, dst, rest)
        _mac_run(tik, aads, body, page_size, full, count, total, macs)
    blob, zero = iv_arr.tobytes(), b"\x00\x00\x00\x00"
    headers = [zero + blob[16 * p : 16 * p + 16] + mac for p, mac in enumerate(macs)]
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
    """Check every packet's MAC, then decrypt the run; on any bad MAC nothing is produced.

    `headers` is one header per packet (or their 52-byte concatenation). `out` receives the
    plaintext (it is left untouched when a MAC fails) and is returned in its place.
    """
    tek, tik = _key("TEK", tek), _key("TIK", tik)
    src = _byte_array(ciphertext, "ciphertext")
    full, rest = _plan(src.size, page_size)
    count = full + (1 if rest else 0)
    blob = _header_blob(headers, count)
    if any(blob[k::HEADER_LEN].count(0) != count for k in range(4)):  # some flags are set
        p = next(i for i in range(count) if blob[i * HEADER_LEN : i * HEADER_LEN + 4] != bytes(4))
        _check_flags(_LE32.unpack_from(blob, p * HEADER_LEN)[0], p)
    dst = None if out is None else _writable(out, src.size, "out")
    if count < _SMALL_RUN:
        plain = _open_small(tek, tik, blob, src, dst, page_size)
        return plain.tobytes() if out is None else out
    table = np.frombuffer(blob, np.uint8).reshape(count, HEADER_LEN)
    iv_arr = np.ascontiguousarray(table[:, 4:20])
    computed: list[bytes] = []
    _mac_run(tik, _aads(iv_arr, full, page_size, rest), src.data, page_size, 0, count,
             src.size, computed)
    # One constant-time comparison for the run; find the culprit only on failure.
    if not hmac.compare_digest(b"".join(computed), table[:, 20:].tobytes()):
        bad = next(
            p for p in range(count) if not hmac.compare_digest(computed[p], table[p, 20:].tobytes())
        )
        raise IntegrityError("packet_mac", page=bad)
    if dst is None:
        dst = np.empty(src.size, np.uint8)
    chunk = _chunk(page_size, full)
    keystream = _Keystream(tek, iv_arr, page_size, chunk)
    for first in range(0, full, chunk):
        keystream.xor(first, min(chunk, full - first), src, dst)
    if rest:
        keystream.one(full, src, dst, rest)
    return dst.tobytes() if out is None else out
