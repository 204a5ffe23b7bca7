"""SEV certificates: the 2084-byte SEV format (PDH, PEK, OCA, CEK) and the AMD root format (ARK, ASK).

Both parsers keep every byte they read (reserved fields, key padding), so `to_bytes()` gives back
the input exactly and a flipped bit anywhere in a signed region reaches the signature check.
Parsers raise only `SevFormatError`; key material is turned into `cryptography` keys lazily, so a
certificate with a bad key still parses and the chain check can say what is wrong with it.

Builders (`SevCert.build`, `sign_sev_cert`, `AmdCert.build`, `generate_lab_root`) are what the
firmware model uses to mint its own chain. Layouts are in sev-reference.md section 5.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import NamedTuple, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sevconsole.sev.errors import SevFormatError


class Usage(IntEnum):
    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(IntEnum):
    NONE = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103


RSA_ALGOS = frozenset({Algo.RSA_SHA256, Algo.RSA_SHA384})
ECDSA_ALGOS = frozenset({Algo.ECDSA_SHA256, Algo.ECDSA_SHA384})
ECDH_ALGOS = frozenset({Algo.ECDH_SHA256, Algo.ECDH_SHA384})
EC_ALGOS = ECDSA_ALGOS | ECDH_ALGOS

CURVE_P384 = 2
CURVE_NAMES = {1: "P-256", 2: "P-384"}

SEV_CERT_LEN = 0x824  # 2084
PLATFORM_CHAIN_LEN = 3 * SEV_CERT_LEN  # PEK || OCA || CEK, 6252
SIGNED_LEN = 0x414  # the signature covers [0, 0x414)
PUBKEY_OFF, PUBKEY_LEN = 0x010, 0x404
SIG_OFFS = (0x414, 0x61C)  # two slots: u32 usage, u32 algo, 0x200 bytes
SIG_LEN = 0x200
EC_INT_LEN = 72  # r, s, qx, qy: little-endian, zero-padded
RSA_INT_LEN = 512
AMD_HEADER_LEN = 0x40
LAB_KEY_ID_PREFIX = b"LAB-ROOT"


def _le(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _to_le(value: int, length: int) -> bytes:
    return value.to_bytes(length, "little")


def hash_for_rsa_bits(bits: int) -> hashes.HashAlgorithm:
    """AMD root signatures: SHA-256 with 2048-bit keys, SHA-384 with 4096-bit keys."""
    return hashes.SHA256() if bits <= 2048 else hashes.SHA384()


def hash_for_algo(algo: Algo) -> hashes.HashAlgorithm:
    """SEV signature algorithms: 0x1xx is SHA-384, 0x0xx SHA-256."""
    return hashes.SHA384() if algo & 0x100 else hashes.SHA256()


def _fingerprint(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    # SHA-256 of the DER SubjectPublicKeyInfo: the same key gives the same print in any encoding.
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _as_bytes(data: object, name: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise SevFormatError(name, 0, f"expected bytes, got {type(data).__name__}")


E = TypeVar("E", bound=IntEnum)


def _enum(kind: type[E], value: int, name: str, offset: int, what: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise SevFormatError(name, offset, f"{what} {value:#x} is not a known {kind.__name__.lower()}") from None


# ---------------------------------------------------------------------------------------------
# SEV format


@dataclass(frozen=True)
class Signature:
    """One signature slot. An unused slot has usage INVALID and algo NONE."""

    usage: Usage
    algo: Algo
    raw: bytes  # 0x200 bytes as stored (EC: r[72] s[72] then zeros; RSA: s[512] little-endian)

    @property
    def used(self) -> bool:
        return self.usage != Usage.INVALID and self.algo != Algo.NONE

    def ecdsa_rs(self) -> tuple[int, int]:
        return _le(self.raw[:EC_INT_LEN]), _le(self.raw[EC_INT_LEN : 2 * EC_INT_LEN])

    def rsa_int(self) -> int:
        return _le(self.raw)


UNUSED_SIGNATURE = Signature(Usage.INVALID, Algo.NONE, bytes(SIG_LEN))


@dataclass(frozen=True)
class SevCert:
    """A 2084-byte SEV certificate, held as read (every byte kept, for byte-exact output)."""

    version: int
    api_major: int
    api_minor: int
    reserved: bytes  # 2 bytes at 0x006
    usage: Usage
    algo: Algo
    pubkey: bytes  # the 0x404-byte key field, padding included
    sigs: tuple[Signature, Signature]
    name: str = field(default="certificate", compare=False)  # for messages only

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "certificate") -> SevCert:
        data = _as_bytes(data, name)
        if len(data) != SEV_CERT_LEN:
            at = min(len(data), SEV_CERT_LEN)
            raise SevFormatError(name, at, f"an SEV certificate is {SEV_CERT_LEN} bytes, this is {len(data)}")
        version, api_major, api_minor = struct.unpack_from("<IBB", data, 0)
        if version != 1:
            raise SevFormatError(name, 0, f"version {version} is not supported (expected 1)")
        usage_v, algo_v = struct.unpack_from("<II", data, 0x08)
        usage = _enum(Usage, usage_v, name, 0x08, "key usage")
        algo = _enum(Algo, algo_v, name, 0x0C, "key algorithm")
        sigs = []
        for off in SIG_OFFS:
            s_usage, s_algo = struct.unpack_from("<II", data, off)
            sigs.append(Signature(
                _enum(Usage, s_usage, name, off, "signature usage"),
                _enum(Algo, s_algo, name, off + 4, "signature algorithm"),
                data[off + 8 : off + 8 + SIG_LEN],
            ))
        return cls(version, api_major, api_minor, data[6:8], usage, algo,
                   data[PUBKEY_OFF : PUBKEY_OFF + PUBKEY_LEN], (sigs[0], sigs[1]), name)

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack("<IBB", self.version, self.api_major, self.api_minor))
        out += self.reserved + struct.pack("<II", self.usage, self.algo) + self.pubkey
        for sig in self.sigs:
            out += struct.pack("<II", sig.usage, sig.algo) + sig.raw
        return bytes(out)

    def signed_bytes(self) -> bytes:
        return self.to_bytes()[:SIGNED_LEN]

    # -- key
    @property
    def is_ec(self) -> bool:
        return self.algo in EC_ALGOS

    @property
    def curve(self) -> int:
        """The curve id of an EC key (2 = P-384)."""
        curve: int = struct.unpack_from("<I", self.pubkey, 0)[0]
        return curve

    @property
    def qx(self) -> int:
        return _le(self.pubkey[4 : 4 + EC_INT_LEN])

    @property
    def qy(self) -> int:
        return _le(self.pubkey[4 + EC_INT_LEN : 4 + 2 * EC_INT_LEN])

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The key as a `cryptography` object; SevFormatError when it is not a usable key."""
        if self.is_ec:
            if self.curve != CURVE_P384:
                raise SevFormatError(self.name, PUBKEY_OFF,
                                     f"curve {self.curve} is not P-384 (2)")
            try:
                return ec.EllipticCurvePublicNumbers(self.qx, self.qy, ec.SECP384R1()).public_key()
            except (ValueError, UnsupportedAlgorithm):
                raise SevFormatError(self.name, PUBKEY_OFF + 4,
                                     "the public key is not a point on P-384") from None
        if self.algo in RSA_ALGOS:
            # RSA layout: u32 modulus bits, pubexp[512], modulus[512]
            try:
                return rsa.RSAPublicNumbers(_le(self.pubkey[4:516]), _le(self.pubkey[516:1028])).public_key()
            except ValueError:
                raise SevFormatError(self.name, PUBKEY_OFF + 4, "the RSA public key is not valid") from None
        raise SevFormatError(self.name, 0x0C, f"key algorithm {self.algo.name} carries no public key")

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo."""
        return _fingerprint(self.public_key())

    def signature_for(self, signer_usage: Usage) -> tuple[int, Signature] | None:
        """The slot (0 or 1) holding the signature by a signer of this usage, found by sig usage."""
        for slot, sig in enumerate(self.sigs):
            if sig.usage == signer_usage and sig.algo != Algo.NONE:
                return slot, sig
        return None

    @classmethod
    def build(cls, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, usage: Usage,
              algo: Algo, api_major: int, api_minor: int, name: str = "certificate") -> SevCert:
        """An unsigned certificate (both slots unused) for `public_key`."""
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP384R1):
                raise ValueError(f"SEV certificates hold P-384 keys, not {public_key.curve.name}")
            point = public_key.public_numbers()
            key = struct.pack("<I", CURVE_P384) + _to_le(point.x, EC_INT_LEN) + _to_le(point.y, EC_INT_LEN)
        elif isinstance(public_key, rsa.RSAPublicKey):
            nums = public_key.public_numbers()
            key = (struct.pack("<I", public_key.key_size) + _to_le(nums.e, RSA_INT_LEN)
                   + _to_le(nums.n, RSA_INT_LEN))
        else:
            raise TypeError(f"unsupported key type {type(public_key).__name__}")
        return cls(1, api_major, api_minor, bytes(2), Usage(usage), Algo(algo),
                   key.ljust(PUBKEY_LEN, b"\0"), (UNUSED_SIGNATURE, UNUSED_SIGNATURE), name)


def sign_sev_cert(cert: SevCert, signer_private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                  signer_usage: Usage, slot: int, algo: Algo | None = None) -> SevCert:
    """`cert` with a signature by `signer_private_key` in `slot` (0 or 1).

    EC signers: ECDSA P-384 over SHA-256 (algo ECDSA_SHA256) unless `algo` says SHA-384.
    RSA signers (an ASK signing a CEK): RSA-PSS, salt = digest length; SHA-384 (RSA_SHA384) for
    4096-bit keys and SHA-256 (RSA_SHA256) below, as real Rome and Naples CEKs are signed.
    """
    if slot not in (0, 1):
        raise ValueError("slot is 0 or 1")
    tbs = cert.signed_bytes()
    if isinstance(signer_private_key, ec.EllipticCurvePrivateKey):
        algo = Algo(algo or Algo.ECDSA_SHA256)
        if algo not in ECDSA_ALGOS:
            raise ValueError(f"{algo.name} is not an ECDSA algorithm")
        r, s = decode_dss_signature(signer_private_key.sign(tbs, ec.ECDSA(hash_for_algo(algo))))
        raw = _to_le(r, EC_INT_LEN) + _to_le(s, EC_INT_LEN)
    elif isinstance(signer_private_key, rsa.RSAPrivateKey):
        algo = Algo(algo or (Algo.RSA_SHA384 if signer_private_key.key_size >= 4096 else Algo.RSA_SHA256))
        if algo not in RSA_ALGOS:
            raise ValueError(f"{algo.name} is not an RSA algorithm")
        h = hash_for_algo(algo)
        big = signer_private_key.sign(tbs, padding.PSS(padding.MGF1(h), h.digest_size), h)
        raw = _to_le(int.from_bytes(big, "big"), RSA_INT_LEN)
    else:
        raise TypeError(f"unsupported signer key {type(signer_private_key).__name__}")
    sigs = list(cert.sigs)
    sigs[slot] = Signature(Usage(signer_usage), algo, raw.ljust(SIG_LEN, b"\0"))
    return replace(cert, sigs=(sigs[0], sigs[1]))


def split_platform_chain(blob: bytes, name: str = "platform chain") -> tuple[SevCert, SevCert, SevCert]:
    """PEK || OCA || CEK (QEMU's cert-chain) -> (pek, oca, cek). Offsets in errors are in the blob."""
    blob = _as_bytes(blob, name)
    if len(blob) != PLATFORM_CHAIN_LEN:
        raise SevFormatError(name, min(len(blob), PLATFORM_CHAIN_LEN),
                             f"a platform chain (PEK, OCA, CEK) is {PLATFORM_CHAIN_LEN} bytes, this is {len(blob)}")
    parts = []
    for i, part in enumerate(("pek", "oca", "cek")):
        base = i * SEV_CERT_LEN
        try:
            parts.append(SevCert.from_bytes(blob[base : base + SEV_CERT_LEN], f"{part}.cert"))
        except SevFormatError as exc:
            raise SevFormatError(f"{name} ({part.upper()})", base + exc.offset, exc.message) from None
    return parts[0], parts[1], parts[2]


def join_platform_chain(pek: SevCert | bytes, oca: SevCert | bytes, cek: SevCert | bytes) -> bytes:
    return b"".join(c.to_bytes() if isinstance(c, SevCert) else bytes(c) for c in (pek, oca, cek))


# ---------------------------------------------------------------------------------------------
# AMD root format


@dataclass(frozen=True)
class AmdCert:
    """An ARK or ASK in AMD's root format. `signature` is None for the 576-byte Naples ARK."""

    version: int
    key_id: bytes
    certifying_id: bytes
    key_usage: Usage
    reserved: bytes  # 16 bytes at 0x28
    pubexp_bits: int
    modulus_bits: int
    pubexp: bytes  # little-endian, pubexp_bits/8 bytes
    modulus: bytes  # little-endian, modulus_bits/8 bytes
    signature: bytes | None  # little-endian, modulus_bits/8 bytes, as stored
    name: str = field(default="certificate", compare=False)  # for messages only

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "certificate") -> AmdCert:
        data = _as_bytes(data, name)
        if len(data) < AMD_HEADER_LEN:
            raise SevFormatError(name, len(data),
                                 f"an AMD root certificate has a {AMD_HEADER_LEN}-byte header, this is {len(data)} bytes")
        (version,) = struct.unpack_from("<I", data, 0)
        if version != 1:
            raise SevFormatError(name, 0, f"version {version} is not supported (expected 1)")
        usage = _enum(Usage, struct.unpack_from("<I", data, 0x24)[0], name, 0x24, "key usage")
        pubexp_bits, modulus_bits = struct.unpack_from("<II", data, 0x38)
        if modulus_bits not in (2048, 4096):
            raise SevFormatError(name, 0x3C, f"modulus size {modulus_bits} bits is not 2048 or 4096")
        if pubexp_bits == 0 or pubexp_bits % 8 or pubexp_bits > modulus_bits:
            raise SevFormatError(name, 0x38, f"public exponent size {pubexp_bits} bits is not a whole "
                                 f"number of bytes up to the modulus size")
        pe, mb = pubexp_bits // 8, modulus_bits // 8
        key_end = AMD_HEADER_LEN + pe + mb
        if len(data) not in (key_end, key_end + mb):
            at = key_end + mb if len(data) > key_end + mb else len(data)
            raise SevFormatError(name, at, f"a {modulus_bits}-bit AMD root certificate is {key_end + mb} bytes "
                                 f"(or {key_end} with no signature), this is {len(data)}")
        signature = data[key_end:] if len(data) > key_end else None
        return cls(version, data[0x04:0x14], data[0x14:0x24], usage, data[0x28:0x38],
                   pubexp_bits, modulus_bits, data[AMD_HEADER_LEN : AMD_HEADER_LEN + pe],
                   data[AMD_HEADER_LEN + pe : key_end], signature, name)

    def signed_bytes(self) -> bytes:
        """Header, public exponent and modulus: what the RSA-PSS signature covers."""
        return (struct.pack("<I", self.version) + self.key_id + self.certifying_id
                + struct.pack("<I", self.key_usage) + self.reserved
                + struct.pack("<II", self.pubexp_bits, self.modulus_bits) + self.pubexp + self.modulus)

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + (self.signature or b"")

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The hash this key signs with (SHA-256 for 2048 bits, SHA-384 above)."""
        return hash_for_rsa_bits(self.modulus_bits)

    @property
    def is_lab(self) -> bool:
        return is_lab_key_id(self.key_id)

    def public_key(self) -> rsa.RSAPublicKey:
        try:
            return rsa.RSAPublicNumbers(_le(self.pubexp), _le(self.modulus)).public_key()
        except ValueError:
            raise SevFormatError(self.name, AMD_HEADER_LEN, "the RSA public key is not valid") from None

    def fingerprint(self) -> str:
        return _fingerprint(self.public_key())

    def signature_big_endian(self) -> bytes | None:
        return None if self.signature is None else self.signature[::-1]

    @classmethod
    def build(cls, public_key: rsa.RSAPublicKey, key_id: bytes, certifying_id: bytes, usage: Usage,
              signer_private_key: rsa.RSAPrivateKey | None, name: str = "certificate") -> AmdCert:
        """An ARK (usage ARK, certifying_id == key_id, signed by its own key) or an ASK.

        `signer_private_key=None` gives the unsigned short encoding. The exponent field is as wide
        as the modulus, as in AMD's own certificates.
        """
        if len(key_id) != 16 or len(certifying_id) != 16:
            raise ValueError("key ids are 16 bytes")
        bits = public_key.key_size
        if bits not in (2048, 4096):
            raise ValueError(f"AMD root keys are 2048 or 4096 bits, not {bits}")
        nums = public_key.public_numbers()
        unsigned = cls(1, bytes(key_id), bytes(certifying_id), Usage(usage), bytes(16), bits, bits,
                       _to_le(nums.e, bits // 8), _to_le(nums.n, bits // 8), None, name)
        if signer_private_key is None:
            return unsigned
        h = hash_for_rsa_bits(signer_private_key.key_size)
        big = signer_private_key.sign(unsigned.signed_bytes(), padding.PSS(padding.MGF1(h), h.digest_size), h)
        return replace(unsigned, signature=big.rjust(bits // 8, b"\0")[::-1])


def split_amd_chain(blob: bytes, name: str = "AMD chain") -> tuple[AmdCert, AmdCert]:
    """ASK || ARK -> (ask, ark). The ASK's header gives its length; the rest is the ARK."""
    blob = _as_bytes(blob, name)
    if len(blob) < AMD_HEADER_LEN:
        raise SevFormatError(name, len(blob), f"an AMD chain (ASK, ARK) is at least two certificates, this is {len(blob)} bytes")
    pubexp_bits, modulus_bits = struct.unpack_from("<II", blob, 0x38)
    if pubexp_bits % 8 or modulus_bits % 8 or not 0 < pubexp_bits <= modulus_bits <= 4096:
        raise SevFormatError(f"{name} (ASK)", 0x38, f"key sizes {pubexp_bits}/{modulus_bits} bits are not valid")
    ask_len = AMD_HEADER_LEN + pubexp_bits // 8 + 2 * (modulus_bits // 8)
    try:
        ask = AmdCert.from_bytes(blob[:ask_len], "ask.cert")
    except SevFormatError as exc:
        raise SevFormatError(f"{name} (ASK)", exc.offset, exc.message) from None
    try:
        ark = AmdCert.from_bytes(blob[ask_len:], "ark.cert")
    except SevFormatError as exc:
        raise SevFormatError(f"{name} (ARK)", ask_len + exc.offset, exc.message) from None
    return ask, ark


def join_amd_chain(ask: AmdCert | bytes, ark: AmdCert | bytes) -> bytes:
    return b"".join(c.to_bytes() if isinstance(c, AmdCert) else bytes(c) for c in (ask, ark))


# ---------------------------------------------------------------------------------------------
# The lab's own root


class LabRoot(NamedTuple):
    ark_key: rsa.RSAPrivateKey
    ark: AmdCert
    ask_key: rsa.RSAPrivateKey
    ask: AmdCert


def is_lab_key_id(key_id: bytes) -> bool:
    return bytes(key_id).startswith(LAB_KEY_ID_PREFIX)


def generate_lab_root(bits: int = 2048) -> LabRoot:
    """A fresh AMD-format root for the lab: ARK (key id b"LAB-ROOT"+8 random bytes) and its ASK.

    Trusted only where a caller says so (`TrustStore.with_lab_root`); never by `TrustStore.amd()`.
    """
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    ark_id = LAB_KEY_ID_PREFIX + os.urandom(8)
    ark = AmdCert.build(ark_key.public_key(), ark_id, ark_id, Usage.ARK, ark_key, "lab ark.cert")
    ask = AmdCert.build(ask_key.public_key(), b"LAB-ASK-" + os.urandom(8), ark_id, Usage.ASK, ark_key,
                        "lab ask.cert")
    return LabRoot(ark_key, ark, ask_key, ask)


def curve_name(curve: int) -> str:
    return CURVE_NAMES.get(curve, f"curve {curve}")


__all__ = [
    "AmdCert", "Algo", "LabRoot", "PLATFORM_CHAIN_LEN", "SEV_CERT_LEN", "SevCert", "Signature", "Usage",
    "generate_lab_root", "is_lab_key_id", "join_amd_chain", "join_platform_chain", "sign_sev_cert",
    "split_amd_chain", "split_platform_chain",
]
