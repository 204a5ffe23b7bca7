"""The platform's own keys and certificates, in the real formats.

CEK (chip key, signed by the ASK with RSA-PSS), OCA (owner, self-signed), PEK (signed by the
CEK and the OCA), PDH (Diffie-Hellman key, signed by the PEK). Built with sev/certs.py, so the
chain verifier accepts them exactly as it accepts AMD's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..certs import Algo, AmdCert, SevCert, Usage, sign_sev_cert

# Slots of the PEK's two signatures, as AMD's exported PEKs have them.
PEK_OCA_SLOT = 0
PEK_CEK_SLOT = 1


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@dataclass(frozen=True)
class PlatformKeys:
    """One consistent set of platform keys and their certificates."""

    cek_key: ec.EllipticCurvePrivateKey
    cek: SevCert
    oca_key: ec.EllipticCurvePrivateKey | None  # None once an external owner's OCA is imported
    oca: SevCert
    pek_key: ec.EllipticCurvePrivateKey
    pek: SevCert
    pdh_key: ec.EllipticCurvePrivateKey
    pdh: SevCert


def make_cek(
    ask_key: rsa.RSAPrivateKey, api: tuple[int, int]
) -> tuple[ec.EllipticCurvePrivateKey, SevCert]:
    key = new_ec_key()
    cert = SevCert.build(key.public_key(), Usage.CEK, Algo.ECDSA_SHA256, api[0], api[1])
    return key, sign_sev_cert(cert, ask_key, Usage.ASK, 0)


def make_oca(key: ec.EllipticCurvePrivateKey, api: tuple[int, int]) -> SevCert:
    cert = SevCert.build(key.public_key(), Usage.OCA, Algo.ECDSA_SHA256, api[0], api[1])
    return sign_sev_cert(cert, key, Usage.OCA, 0)


def make_pek(
    cek_key: ec.EllipticCurvePrivateKey, oca_key: ec.EllipticCurvePrivateKey, api: tuple[int, int]
) -> tuple[ec.EllipticCurvePrivateKey, SevCert]:
    key = new_ec_key()
    cert = SevCert.build(key.public_key(), Usage.PEK, Algo.ECDSA_SHA256, api[0], api[1])
    cert = sign_sev_cert(cert, oca_key, Usage.OCA, PEK_OCA_SLOT)
    return key, sign_sev_cert(cert, cek_key, Usage.CEK, PEK_CEK_SLOT)


def make_pdh(
    pek_key: ec.EllipticCurvePrivateKey, api: tuple[int, int]
) -> tuple[ec.EllipticCurvePrivateKey, SevCert]:
    key = new_ec_key()
    cert = SevCert.build(key.public_key(), Usage.PDH, Algo.ECDH_SHA256, api[0], api[1])
    return key, sign_sev_cert(cert, pek_key, Usage.PEK, 0)


def generate_platform_keys(
    ask_key: rsa.RSAPrivateKey,
    api: tuple[int, int],
    oca_key: ec.EllipticCurvePrivateKey | None = None,
) -> PlatformKeys:
    cek_key, cek = make_cek(ask_key, api)
    oca_key = oca_key if oca_key is not None else new_ec_key()
    oca = make_oca(oca_key, api)
    pek_key, pek = make_pek(cek_key, oca_key, api)
    pdh_key, pdh = make_pdh(pek_key, api)
    return PlatformKeys(cek_key, cek, oca_key, oca, pek_key, pek, pdh_key, pdh)


def regenerate_pek(keys: PlatformKeys, api: tuple[int, int]) -> PlatformKeys:
    """PEK_GEN: a new self-signed OCA and PEK (the platform becomes self-owned), then a new PDH."""
    oca_key = new_ec_key()
    oca = make_oca(oca_key, api)
    pek_key, pek = make_pek(keys.cek_key, oca_key, api)
    pdh_key, pdh = make_pdh(pek_key, api)
    return replace(
        keys, oca_key=oca_key, oca=oca, pek_key=pek_key, pek=pek, pdh_key=pdh_key, pdh=pdh
    )


def regenerate_pdh(keys: PlatformKeys, api: tuple[int, int]) -> PlatformKeys:
    pdh_key, pdh = make_pdh(keys.pek_key, api)
    return replace(keys, pdh_key=pdh_key, pdh=pdh)


def same_key(a: SevCert | AmdCert, b: SevCert | AmdCert) -> bool:
    """Two certificates carry the same public key (the DOMAIN rule's 'OCA equality')."""
    return a.fingerprint() == b.fingerprint()
