"""SEV and AMD root certificate formats, against AMD's real certificates and keys made here."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevconsole.sev.certs import (
    PLATFORM_CHAIN_LEN,
    SEV_CERT_LEN,
    Algo,
    AmdCert,
    SevCert,
    Usage,
    generate_lab_root,
    is_lab_key_id,
    join_amd_chain,
    join_platform_chain,
    sign_sev_cert,
    split_amd_chain,
    split_platform_chain,
)
from sevconsole.sev.errors import SevFormatError

GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
PLATFORM_FILES = ("pdh", "pek", "oca", "cek")


def all_fixture_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.cert"))


def sev(root: Path, gen: str, part: str) -> SevCert:
    return SevCert.from_bytes((root / "platforms" / gen / f"{part}.cert").read_bytes(), f"{part}.cert")


def amd(root: Path, gen: str, part: str) -> AmdCert:
    return AmdCert.from_bytes((root / "amd" / gen / f"{part}.cert").read_bytes(), f"{part}.cert")


def test_every_fixture_reserialises_byte_for_byte(sev_certs: Path) -> None:
    files = all_fixture_files(sev_certs)
    assert len(files) == 19  # 5 ARKs, 5 ASKs, the short Naples ARK, 2 x 4 platform certs
    for path in files:
        data = path.read_bytes()
        cert = (SevCert if len(data) == SEV_CERT_LEN else AmdCert).from_bytes(data, path.name)
        assert cert.to_bytes() == data, path
        assert type(cert).from_bytes(cert.to_bytes()) == cert


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_platform_fields(sev_certs: Path, gen: str) -> None:
    certs = {p: sev(sev_certs, gen, p) for p in PLATFORM_FILES}
    assert {p: c.usage for p, c in certs.items()} == {
        "pdh": Usage.PDH, "pek": Usage.PEK, "oca": Usage.OCA, "cek": Usage.CEK}
    assert certs["pdh"].algo == Algo.ECDH_SHA256
    assert all(certs[p].algo == Algo.ECDSA_SHA256 for p in ("pek", "oca", "cek"))
    assert all(c.curve == 2 for c in certs.values())
    # Observed API versions (fixture README): Naples 0.16, Rome 0.22.
    assert (certs["pdh"].api_major, certs["pdh"].api_minor) == ((0, 16) if gen == "naples" else (0, 22))
    # The PEK carries both the OCA and the CEK signature; the others one signature and an unused slot.
    assert {s.usage for s in certs["pek"].sigs} == {Usage.OCA, Usage.CEK}
    assert certs["pdh"].sigs[1].usage == Usage.INVALID and certs["pdh"].sigs[1].algo == Algo.NONE
    assert not certs["pdh"].sigs[1].used
    cek_sig = certs["cek"].signature_for(Usage.ASK)
    assert cek_sig is not None
    # Naples's 2048-bit ASK signs with SHA-256, Rome's 4096-bit one with SHA-384.
    assert cek_sig[1].algo == (Algo.RSA_SHA256 if gen == "naples" else Algo.RSA_SHA384)
    assert certs["pek"].signature_for(Usage.PDH) is None


@pytest.mark.parametrize("gen", GENERATIONS)
def test_amd_root_fields(sev_certs: Path, gen: str) -> None:
    ark, ask = amd(sev_certs, gen, "ark"), amd(sev_certs, gen, "ask")
    bits = 2048 if gen == "naples" else 4096
    assert (ark.modulus_bits, ask.modulus_bits) == (bits, bits)
    assert len(ark.to_bytes()) == (832 if bits == 2048 else 1600)
    assert ark.key_usage == Usage.ARK and ask.key_usage == Usage.ASK
    assert ark.certifying_id == ark.key_id and ask.certifying_id == ark.key_id
    assert ark.public_key().key_size == bits and ark.public_key().public_numbers().e == 65537
    assert not is_lab_key_id(ark.key_id)


def test_naples_short_ark_decodes_to_the_same_key(sev_certs: Path) -> None:
    short = amd(sev_certs, "naples", "ark-short-encoding")
    full = amd(sev_certs, "naples", "ark")
    assert len(short.to_bytes()) == 576 and short.signature is None
    assert short.key_id == full.key_id and short.certifying_id == full.certifying_id
    assert short.public_key().public_numbers() == full.public_key().public_numbers()
    assert short.fingerprint() == full.fingerprint()
    assert short.signed_bytes() == full.signed_bytes()


def test_fingerprint_is_sha256_of_the_der_key(sev_certs: Path) -> None:
    pdh = sev(sev_certs, "rome", "pdh")
    der = pdh.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    assert pdh.fingerprint() == digest.finalize().hex()
    prints = {sev(sev_certs, g, p).fingerprint() for g in ("naples", "rome") for p in PLATFORM_FILES}
    assert len(prints) == 8


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_platform_chain_split_and_join(sev_certs: Path, gen: str) -> None:
    pek, oca, cek = (sev(sev_certs, gen, p) for p in ("pek", "oca", "cek"))
    blob = join_platform_chain(pek, oca, cek)
    assert len(blob) == PLATFORM_CHAIN_LEN == 6252
    assert blob == join_platform_chain(pek.to_bytes(), oca.to_bytes(), cek.to_bytes())
    assert split_platform_chain(blob) == (pek, oca, cek)
    with pytest.raises(SevFormatError) as err:
        split_platform_chain(blob[:-1])
    assert err.value.offset == PLATFORM_CHAIN_LEN - 1
    # A bad field in the OCA is reported at its offset in the blob.
    bad = bytearray(blob)
    struct.pack_into("<I", bad, SEV_CERT_LEN + 0x08, 0x7777)
    with pytest.raises(SevFormatError) as err:
        split_platform_chain(bytes(bad))
    assert err.value.offset == SEV_CERT_LEN + 0x08 and "OCA" in err.value.cert


@pytest.mark.parametrize("gen", GENERATIONS)
def test_amd_chain_split_and_join(sev_certs: Path, gen: str) -> None:
    ask, ark = amd(sev_certs, gen, "ask"), amd(sev_certs, gen, "ark")
    blob = join_amd_chain(ask, ark)
    assert len(blob) == (1664 if gen == "naples" else 3200)
    assert split_amd_chain(blob) == (ask, ark)
    with pytest.raises(SevFormatError) as err:
        split_amd_chain(blob[:-10])
    assert "ARK" in err.value.cert and err.value.offset == len(blob) - 10


def test_amd_chain_with_the_short_naples_ark(sev_certs: Path) -> None:
    ask, short = amd(sev_certs, "naples", "ask"), amd(sev_certs, "naples", "ark-short-encoding")
    assert split_amd_chain(join_amd_chain(ask, short)) == (ask, short)


def test_format_error_names_certificate_and_offset(sev_certs: Path) -> None:
    data = bytearray((sev_certs / "platforms/rome/pdh.cert").read_bytes())
    struct.pack_into("<I", data, 0x414, 0x9999)
    with pytest.raises(SevFormatError) as err:
        SevCert.from_bytes(bytes(data), "pdh.cert")
    assert str(err.value) == "pdh.cert: byte 0x414: signature usage 0x9999 is not a known usage"
    assert (err.value.cert, err.value.offset) == ("pdh.cert", 0x414)
    with pytest.raises(SevFormatError) as err:
        SevCert.from_bytes(bytes(data[:100]), "pdh.cert")
    assert err.value.offset == 100 and "2084" in err.value.message
    with pytest.raises(SevFormatError) as err:
        SevCert.from_bytes("not bytes", "pdh.cert")  # type: ignore[arg-type]
    assert err.value.offset == 0


def test_amd_format_errors(sev_certs: Path) -> None:
    data = (sev_certs / "amd/rome/ask.cert").read_bytes()
    bad = bytearray(data)
    struct.pack_into("<I", bad, 0x3C, 3000)
    with pytest.raises(SevFormatError) as err:
        AmdCert.from_bytes(bytes(bad), "ask.cert")
    assert err.value.offset == 0x3C
    with pytest.raises(SevFormatError) as err:
        AmdCert.from_bytes(data + b"\0", "ask.cert")
    assert err.value.offset == 1600
    with pytest.raises(SevFormatError) as err:
        AmdCert.from_bytes(data[:1500], "ask.cert")
    assert err.value.offset == 1500
    with pytest.raises(SevFormatError) as err:
        AmdCert.from_bytes(data[:20], "ask.cert")
    assert err.value.offset == 20


def test_point_off_the_curve_is_a_format_error_on_use(sev_certs: Path) -> None:
    data = bytearray((sev_certs / "platforms/rome/pdh.cert").read_bytes())
    data[0x14] ^= 0x01  # qx changes: the point leaves P-384, yet the bytes still parse
    cert = SevCert.from_bytes(bytes(data), "pdh.cert")
    with pytest.raises(SevFormatError) as err:
        cert.public_key()
    assert "not a point on P-384" in str(err.value)


def _ec_signature_verifies(signer: ec.EllipticCurvePrivateKey, cert: SevCert, slot: int) -> bool:
    raw = cert.to_bytes()[0x414 + slot * 0x208 + 8:][:144]
    r, s = int.from_bytes(raw[:72], "little"), int.from_bytes(raw[72:], "little")
    try:
        signer.public_key().verify(encode_dss_signature(r, s), cert.to_bytes()[:0x414],
                                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def test_build_and_sign_sev_cert() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    oca_key = ec.generate_private_key(ec.SECP384R1())
    pek = SevCert.build(key.public_key(), Usage.PEK, Algo.ECDSA_SHA256, 1, 55)
    assert len(pek.to_bytes()) == SEV_CERT_LEN
    assert all(not s.used for s in pek.sigs)
    assert pek.public_key().public_numbers() == key.public_key().public_numbers()
    signed = sign_sev_cert(pek, oca_key, Usage.OCA, slot=1)
    assert signed.sigs[1].usage == Usage.OCA and signed.sigs[1].algo == Algo.ECDSA_SHA256
    assert signed.sigs[0] == pek.sigs[0]
    # Checked by hand from the bytes (little-endian r and s), not through the project's verifier.
    assert _ec_signature_verifies(oca_key, signed, slot=1)
    assert not _ec_signature_verifies(key, signed, slot=1)
    assert SevCert.from_bytes(signed.to_bytes()) == signed
    with pytest.raises(ValueError):
        SevCert.build(ec.generate_private_key(ec.SECP256R1()).public_key(), Usage.PEK,
                      Algo.ECDSA_SHA256, 1, 0)
    with pytest.raises(ValueError):
        sign_sev_cert(pek, oca_key, Usage.OCA, slot=2)


def test_rsa_signature_on_a_cek_is_pss_little_endian() -> None:
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cek = SevCert.build(ec.generate_private_key(ec.SECP384R1()).public_key(), Usage.CEK,
                        Algo.ECDSA_SHA256, 0, 14)
    signed = sign_sev_cert(cek, ask_key, Usage.ASK, slot=0)
    assert signed.sigs[0].algo == Algo.RSA_SHA256  # 2048-bit keys sign with SHA-256, as on Naples
    big = int.from_bytes(signed.sigs[0].raw, "little").to_bytes(256, "big")
    ask_key.public_key().verify(big, signed.signed_bytes(),
                                padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_amd_build_round_trip_and_short_form() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = bytes(range(16))
    ark = AmdCert.build(key.public_key(), kid, kid, Usage.ARK, key)
    assert len(ark.to_bytes()) == 832 and ark.signature is not None
    assert AmdCert.from_bytes(ark.to_bytes()) == ark
    big = ark.signature[::-1]
    key.public_key().verify(big, ark.to_bytes()[:576], padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                            hashes.SHA256())
    unsigned = AmdCert.build(key.public_key(), kid, kid, Usage.ARK, None)
    assert len(unsigned.to_bytes()) == 576 and unsigned.signature is None
    with pytest.raises(ValueError):
        AmdCert.build(key.public_key(), b"short", kid, Usage.ARK, key)


def test_generate_lab_root() -> None:
    lab = generate_lab_root()
    assert lab.ark.key_id.startswith(b"LAB-ROOT") and is_lab_key_id(lab.ark.key_id)
    assert lab.ark.is_lab and not lab.ask.is_lab
    assert lab.ark.certifying_id == lab.ark.key_id and lab.ask.certifying_id == lab.ark.key_id
    assert (lab.ark.key_usage, lab.ask.key_usage) == (Usage.ARK, Usage.ASK)
    assert len(lab.ark.to_bytes()) == len(lab.ask.to_bytes()) == 832
    assert lab.ark.public_key().public_numbers() == lab.ark_key.public_key().public_numbers()
    assert lab.ask.public_key().public_numbers() == lab.ask_key.public_key().public_numbers()
    assert generate_lab_root().ark.key_id != lab.ark.key_id


@pytest.mark.slow
def test_lab_root_4096_signs_with_sha384() -> None:
    lab = generate_lab_root(bits=4096)
    assert len(lab.ark.to_bytes()) == 1600
    lab.ark_key.public_key().verify(
        lab.ask.signature[::-1], lab.ask.signed_bytes(),  # type: ignore[index]
        padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
    cek = SevCert.build(ec.generate_private_key(ec.SECP384R1()).public_key(), Usage.CEK,
                        Algo.ECDSA_SHA256, 0, 22)
    assert sign_sev_cert(cek, lab.ask_key, Usage.ASK, 0).sigs[0].algo == Algo.RSA_SHA384
