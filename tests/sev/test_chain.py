"""Chain verification: the real Naples and Rome chains, every failure reason, and single bit flips."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevconsole.sev.certs import (
    Algo,
    AmdCert,
    SevCert,
    Usage,
    generate_lab_root,
    sign_sev_cert,
)
from sevconsole.sev.chain import (
    EDGES,
    LINK_ORDER,
    ChainReport,
    LinkFailure,
    check_link,
    verify_chain,
)
from sevconsole.sev.errors import SevFormatError
from sevconsole.sev.trust import TrustStore

PLATFORM = ("pdh", "pek", "oca", "cek")
# Which links each certificate takes part in, as subject (its signature is checked) and as signer.
AS_SUBJECT = {"ark": {"ARK self"}, "ask": {"ARK->ASK"}, "cek": {"ASK->CEK"},
              "pek": {"CEK->PEK", "OCA->PEK"}, "oca": {"OCA self"}, "pdh": {"PEK->PDH"}}
AS_SIGNER = {"ark": {"ARK self", "ARK->ASK"}, "ask": {"ASK->CEK"}, "cek": {"CEK->PEK"},
             "pek": {"PEK->PDH"}, "oca": {"OCA self", "OCA->PEK"}, "pdh": set()}


def load_chain(root: Path, gen: str, amd_gen: str | None = None, ark_file: str = "ark.cert") -> dict:
    certs: dict = {p: SevCert.from_bytes((root / "platforms" / gen / f"{p}.cert").read_bytes(), f"{p}.cert")
                   for p in PLATFORM}
    amd_dir = root / "amd" / (amd_gen or gen)
    certs["ask"] = AmdCert.from_bytes((amd_dir / "ask.cert").read_bytes(), "ask.cert")
    certs["ark"] = AmdCert.from_bytes((amd_dir / ark_file).read_bytes(), "ark.cert")
    return certs


def failing(report: ChainReport) -> dict[str, LinkFailure | None]:
    return {link.name: link.reason for link in report.links if not link.ok}


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_real_chain_verifies_under_its_own_root(sev_certs: Path, gen: str) -> None:
    report = verify_chain(**load_chain(sev_certs, gen), trust=TrustStore.amd())
    assert [link.name for link in report.links] == list(LINK_ORDER) == [
        "ARK self", "ARK->ASK", "ASK->CEK", "CEK->PEK", "OCA self", "OCA->PEK", "PEK->PDH"]
    assert report.ok, failing(report)
    assert report.root is not None and report.root.generation == gen and not report.root.is_lab
    assert all(link.reason is None and link.detail for link in report.links)
    expected_hash = "RSA-PSS SHA-384" if gen == "rome" else "RSA-PSS SHA-256"
    assert expected_hash in report.link("ASK->CEK").detail
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["root"]["generation"] == gen and len(data["links"]) == 7


@pytest.mark.parametrize(("gen", "roots"), [("naples", "rome"), ("rome", "naples"), ("rome", "milan"),
                                            ("rome", "turin")])
def test_chain_fails_under_another_generation(sev_certs: Path, gen: str, roots: str) -> None:
    report = verify_chain(**load_chain(sev_certs, gen, roots), trust=TrustStore.amd())
    assert not report.ok
    assert failing(report) == {"ASK->CEK": LinkFailure.BAD_SIGNATURE}
    assert "cek.cert" in report.link("ASK->CEK").detail and "ask.cert" in report.link("ASK->CEK").detail


def test_short_naples_ark_rests_on_the_pinned_key(sev_certs: Path) -> None:
    certs = load_chain(sev_certs, "naples", ark_file="ark-short-encoding.cert")
    alone = check_link(certs["ark"], certs["ark"])
    assert alone.reason is LinkFailure.MISSING_SIGNATURE and "no signature" in alone.detail
    report = verify_chain(**certs, trust=TrustStore.amd())
    assert report.ok and report.root is not None and report.root.generation == "naples"
    detail = report.link("ARK self").detail
    assert "no signature" in detail and "pinned key alone" in detail
    # The same short ARK with a changed key: nothing signed and nothing pinned.
    raw = bytearray(certs["ark"].to_bytes())
    raw[0x40 + 256 + 10] ^= 0x04
    certs["ark"] = AmdCert.from_bytes(bytes(raw), "ark.cert")
    report = verify_chain(**certs, trust=TrustStore.amd())
    assert report.root is None and report.link("ARK self").reason is LinkFailure.MISSING_SIGNATURE
    assert "different public key" in report.link("ARK self").detail


def test_missing_amd_roots_fail_as_untrusted(sev_certs: Path) -> None:
    certs = load_chain(sev_certs, "rome")
    certs.update(ask=None, ark=None)
    report = verify_chain(**certs, trust=TrustStore.amd())
    assert failing(report) == {name: LinkFailure.UNTRUSTED_ROOT for name in ("ARK self", "ARK->ASK", "ASK->CEK")}
    assert report.root is None and not report.ok


def test_check_link_names_pairs_and_refuses_non_edges(sev_certs: Path) -> None:
    c = load_chain(sev_certs, "rome")
    assert check_link(c["oca"], c["pek"]).name == "OCA->PEK" and check_link(c["oca"], c["pek"]).ok
    assert check_link(c["pek"], c["pdh"]).ok and check_link(c["oca"], c["oca"]).ok
    assert check_link(c["ask"], c["cek"]).ok and check_link(c["ark"], c["ask"]).ok
    wrong = check_link(c["pdh"], c["pek"])
    assert wrong.reason is LinkFailure.USAGE_MISMATCH and "PDH never certifies a PEK" in wrong.detail
    # A PEK where the CEK belongs: the link says which certificate has which usage.
    report = verify_chain(**{**c, "cek": c["pek"]}, trust=TrustStore.amd())
    assert report.link("ASK->CEK").reason is LinkFailure.USAGE_MISMATCH
    assert report.link("CEK->PEK").reason is LinkFailure.USAGE_MISMATCH
    assert "pek.cert has key usage PEK" in report.link("ASK->CEK").detail


# ---------------------------------------------------------------------------------------------
# A synthetic chain under a lab root, and every failure reason made on purpose


@dataclass
class Lab:
    root: object
    keys: dict
    certs: dict


@pytest.fixture(scope="module")
def lab() -> Lab:
    root = generate_lab_root()
    keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in ("cek", "oca", "pek", "pdh")}
    cek = sign_sev_cert(SevCert.build(keys["cek"].public_key(), Usage.CEK, Algo.ECDSA_SHA256, 1, 55, "cek.cert"),
                        root.ask_key, Usage.ASK, 0)
    oca = sign_sev_cert(SevCert.build(keys["oca"].public_key(), Usage.OCA, Algo.ECDSA_SHA256, 1, 55, "oca.cert"),
                        keys["oca"], Usage.OCA, 0)
    pek = SevCert.build(keys["pek"].public_key(), Usage.PEK, Algo.ECDSA_SHA256, 1, 55, "pek.cert")
    pek = sign_sev_cert(sign_sev_cert(pek, keys["oca"], Usage.OCA, 0), keys["cek"], Usage.CEK, 1)
    pdh = sign_sev_cert(SevCert.build(keys["pdh"].public_key(), Usage.PDH, Algo.ECDH_SHA256, 1, 55, "pdh.cert"),
                        keys["pek"], Usage.PEK, 0)
    return Lab(root, keys, {"pdh": pdh, "pek": pek, "oca": oca, "cek": cek, "ask": root.ask, "ark": root.ark})


def test_synthetic_chain_verifies_with_the_lab_root(lab: Lab) -> None:
    assert lab.certs["cek"].sigs[0].algo == Algo.RSA_SHA256
    report = verify_chain(**lab.certs, trust=TrustStore.amd().with_lab_root(lab.root.ark))
    assert report.ok, failing(report)
    assert report.root is not None and report.root.generation == "LAB" and report.root.is_lab
    assert "lab root" in report.root.name


def test_lab_chain_is_untrusted_under_the_amd_store(lab: Lab) -> None:
    report = verify_chain(**lab.certs, trust=TrustStore.amd())
    assert failing(report) == {"ARK self": LinkFailure.UNTRUSTED_ROOT}
    assert "lab root" in report.link("ARK self").detail and report.root is None and not report.ok


def test_slots_are_found_by_usage(lab: Lab) -> None:
    """The PEK's two signatures may sit in either slot."""
    swapped = lab.certs["pek"]
    swapped = SevCert.from_bytes(
        swapped.to_bytes()[:0x414] + swapped.to_bytes()[0x61C:] + swapped.to_bytes()[0x414:0x61C], "pek.cert")
    assert swapped.sigs[0].usage == Usage.CEK
    report = verify_chain(**{**lab.certs, "pek": swapped}, trust=TrustStore.amd().with_lab_root(lab.root.ark))
    assert report.ok, failing(report)


def _resign(cert: SevCert, key, usage: Usage, **changes) -> SevCert:
    return sign_sev_cert(replace(cert, **changes), key, usage, 0)


def test_each_failure_reason(lab: Lab) -> None:
    trust = TrustStore.amd().with_lab_root(lab.root.ark)
    c, k = lab.certs, lab.keys

    def run(**over) -> dict:
        return failing(verify_chain(**{**c, **over}, trust=trust))

    # MISSING_SIGNATURE: a PEK that the OCA never signed.
    unsigned_by_oca = sign_sev_cert(SevCert.build(k["pek"].public_key(), Usage.PEK, Algo.ECDSA_SHA256, 1, 55,
                                                  "pek.cert"), k["cek"], Usage.CEK, 1)
    assert run(pek=unsigned_by_oca) == {"OCA->PEK": LinkFailure.MISSING_SIGNATURE}

    # BAD_SIGNATURE: a PDH signed by some other key claiming to be the PEK.
    stranger = ec.generate_private_key(ec.SECP384R1())
    assert run(pdh=_resign(c["pdh"], stranger, Usage.PEK)) == {"PEK->PDH": LinkFailure.BAD_SIGNATURE}

    # ALGO_MISMATCH: a PDH holding an ECDSA key, properly signed; and an EC signer with an RSA signature.
    assert run(pdh=_resign(c["pdh"], k["pek"], Usage.PEK, algo=Algo.ECDSA_SHA256)) == {
        "PEK->PDH": LinkFailure.ALGO_MISMATCH}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert run(pdh=sign_sev_cert(c["pdh"], rsa_key, Usage.PEK, 0)) == {"PEK->PDH": LinkFailure.ALGO_MISMATCH}

    # WRONG_CURVE: a PDH whose key says curve 1 (P-256), signed by the real PEK.
    p256 = struct.pack("<I", 1) + c["pdh"].pubkey[4:]
    assert run(pdh=_resign(c["pdh"], k["pek"], Usage.PEK, pubkey=p256)) == {"PEK->PDH": LinkFailure.WRONG_CURVE}

    # POINT_NOT_ON_CURVE: a PDH whose point is off P-384, signed by the real PEK.
    off = bytearray(c["pdh"].pubkey)
    off[4] ^= 1
    bad_pdh = _resign(c["pdh"], k["pek"], Usage.PEK, pubkey=bytes(off))
    assert run(pdh=bad_pdh) == {"PEK->PDH": LinkFailure.POINT_NOT_ON_CURVE}

    # ... and the same damage in a signer shows on the links it signs.
    bad_oca = _resign(c["oca"], k["oca"], Usage.OCA, pubkey=bytes(off))
    assert run(oca=bad_oca) == {"OCA self": LinkFailure.POINT_NOT_ON_CURVE, "OCA->PEK": LinkFailure.POINT_NOT_ON_CURVE}

    # CERTIFYING_ID_MISMATCH: an ASK signed by the ARK that names another certifier.
    other_id = AmdCert.build(lab.root.ask_key.public_key(), lab.root.ask.key_id, b"X" * 16, Usage.ASK,
                             lab.root.ark_key, "ask.cert")
    assert run(ask=other_id) == {"ARK->ASK": LinkFailure.CERTIFYING_ID_MISMATCH}

    # USAGE_MISMATCH: the OCA where the PEK belongs.
    result = run(pek=c["oca"])
    assert result["CEK->PEK"] is LinkFailure.USAGE_MISMATCH and result["PEK->PDH"] is LinkFailure.USAGE_MISMATCH

    # UNTRUSTED_ROOT: another lab root than the one trusted.
    other = generate_lab_root()
    assert run(ark=other.ark, ask=other.ask) == {"ARK self": LinkFailure.UNTRUSTED_ROOT,
                                                 "ASK->CEK": LinkFailure.BAD_SIGNATURE}


# ---------------------------------------------------------------------------------------------
# One flipped bit anywhere in a signed region or a signature fails the right link


def _sev_regions(cert: SevCert) -> dict[str, tuple[int, int]]:
    regions = {"header": (0x000, 0x010), "key": (0x010, 0x414)}
    for slot, off in enumerate((0x414, 0x61C)):
        sig = cert.sigs[slot]
        if sig.used:  # the whole slot: usage, algorithm, r, s and the zero padding after them
            regions[f"sig:{sig.usage.name}"] = (off, off + 8 + 0x200)
    return regions


def _amd_regions(cert: AmdCert) -> dict[str, tuple[int, int]]:
    key_end = 0x40 + cert.pubexp_bits // 8 + cert.modulus_bits // 8
    return {"header": (0, 0x40), "key": (0x40, key_end), "sig:ARK": (key_end, len(cert.to_bytes()))}


def _positions(start: int, end: int, count: int = 12) -> list[int]:
    step = max(1, (end - start) // count)
    return sorted({*range(start, end, step), end - 1})


FLIP_CASES = [(gen, part) for gen in ("naples", "rome") for part in ("ark", "ask", "cek", "oca", "pek", "pdh")]


@pytest.mark.parametrize(("gen", "part"), FLIP_CASES)
def test_single_bit_flips_fail_the_right_link(sev_certs: Path, gen: str, part: str) -> None:
    certs = load_chain(sev_certs, gen)
    cert = certs[part]
    cls = type(cert)
    regions = _sev_regions(cert) if cls is SevCert else _amd_regions(cert)
    trust = TrustStore.amd()
    seen_format_errors = []
    checked = 0
    for region, (start, end) in regions.items():
        for i, pos in enumerate(_positions(start, end)):
            data = bytearray(cert.to_bytes())
            data[pos] ^= 1 << (i % 8)
            try:
                flipped = cls.from_bytes(bytes(data), cert.name)
            except SevFormatError as err:
                # Only a field the parser reads (version, usages, algorithms, key sizes) may do this,
                # and the error points at that field.
                assert err.offset <= pos < err.offset + 4, (region, pos, err)
                seen_format_errors.append(region)
                continue
            report = verify_chain(**{**certs, part: flipped}, trust=trust)
            bad = failing(report)
            assert not report.ok, (region, pos)
            if region.startswith("sig:"):
                signer = region.split(":")[1]
                name = EDGES[(Usage[signer], Usage[part.upper()])]
                assert set(bad) == {name}, (region, pos, bad)
                in_field = pos < start + 8 and cls is SevCert
                if not in_field:
                    assert bad[name] is LinkFailure.BAD_SIGNATURE, (region, pos, bad)
            else:
                assert AS_SUBJECT[part] <= set(bad) <= AS_SUBJECT[part] | AS_SIGNER[part], (region, pos, bad)
            checked += 1
    assert checked >= 20
    assert set(seen_format_errors) <= {"header", "sig:OCA", "sig:CEK", "sig:PEK", "sig:ASK"}
