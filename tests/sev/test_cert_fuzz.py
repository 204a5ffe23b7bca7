"""Property-based fuzzing of both certificate parsers: bad bytes raise SevFormatError and nothing else.

Accepted input always re-serialises to itself, and checking links of mutated certificates never
raises: every problem becomes a LinkResult.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.sev.certs import (
    SEV_CERT_LEN,
    AmdCert,
    SevCert,
    split_amd_chain,
    split_platform_chain,
)
from sevconsole.sev.chain import LinkFailure, check_link, verify_chain
from sevconsole.sev.errors import SevFormatError
from sevconsole.sev.trust import TrustStore

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PARSERS = (SevCert.from_bytes, AmdCert.from_bytes, split_platform_chain, split_amd_chain)


@pytest.fixture(scope="module")
def fixtures(sev_certs: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sev_certs)): p.read_bytes() for p in sorted(sev_certs.rglob("*.cert"))}


def parse_or_format_error(parse, data: bytes):
    """Run a parser; the only way to fail is SevFormatError with a sane offset and a message."""
    try:
        return parse(data)
    except SevFormatError as err:
        assert 0 <= err.offset <= len(data) and err.message and err.cert
        return None


@FUZZ
@given(data=st.binary(max_size=7000))
def test_random_bytes(data: bytes) -> None:
    for parse in PARSERS:
        parse_or_format_error(parse, data)


@FUZZ
@given(st.data())
def test_truncated_fixtures(fixtures: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fixtures)))
    raw = fixtures[name]
    cut = data.draw(st.integers(0, len(raw) - 1))
    parse = SevCert.from_bytes if len(raw) == SEV_CERT_LEN else AmdCert.from_bytes
    try:
        parsed = parse(raw[:cut], name)
    except SevFormatError as err:
        assert err.cert == name and err.offset == cut, (name, cut, err)
        return
    # The one truncation that parses: an AMD root cut exactly where its signature starts.
    assert isinstance(parsed, AmdCert) and parsed.signature is None
    assert cut == 0x40 + parsed.pubexp_bits // 8 + parsed.modulus_bits // 8


@FUZZ
@given(st.data())
def test_extended_fixtures(fixtures: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fixtures)))
    raw = fixtures[name]
    extra = data.draw(st.binary(min_size=1, max_size=600))
    parse = SevCert.from_bytes if len(raw) == SEV_CERT_LEN else AmdCert.from_bytes
    grown = raw + extra
    if "short" in name and len(extra) == 256:
        # The 576-byte short ARK plus exactly a signature's length is a (badly signed) full ARK.
        parsed = parse(grown, name)
        assert isinstance(parsed, AmdCert) and parsed.to_bytes() == grown
        return
    with pytest.raises(SevFormatError) as err:
        parse(grown, name)
    assert err.value.cert == name
    if "short" in name and len(extra) < 256:
        assert err.value.offset == len(grown)  # a signature that is cut short
    elif "short" in name:
        assert err.value.offset == 832
    else:
        assert err.value.offset == len(raw)


def _checked_positions(raw: bytes) -> set[int]:
    """Bytes a chain check depends on: the signed region and the used signature slots."""
    if len(raw) != SEV_CERT_LEN:
        if len(raw) == 576:  # the unsigned short ARK: its reserved header bytes are covered by nothing
            return set(range(len(raw))) - set(range(0x28, 0x38))
        return set(range(len(raw)))
    cert = SevCert.from_bytes(raw)
    positions = set(range(0x414))
    for slot, off in enumerate((0x414, 0x61C)):
        if cert.sigs[slot].used:
            positions |= set(range(off, off + 8 + 0x200))
    return positions


@FUZZ
@given(st.data())
def test_mutated_fixtures_parse_round_trip_and_verify_without_raising(
        fixtures: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fixtures)))
    original = fixtures[name]
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    mutated = bytes(raw)
    parse = SevCert.from_bytes if len(raw) == SEV_CERT_LEN else AmdCert.from_bytes
    cert = parse_or_format_error(lambda b: parse(b, name), mutated)
    if cert is None:
        return
    assert cert.to_bytes() == mutated
    link = check_link(cert, cert)
    assert link.ok or link.reason is not None
    with contextlib.suppress(SevFormatError):  # a damaged key may not load; nothing else may escape
        cert.fingerprint()
    # Put the mutated certificate into its real chain: nothing raises, and a change to a byte the
    # chain depends on makes it fail.
    gen = name.split("/")[1]
    if name.startswith("platforms/") or gen in ("naples", "rome"):
        chain = {p: SevCert.from_bytes(fixtures[f"platforms/{gen}/{p}.cert"], f"{p}.cert")
                 for p in ("pdh", "pek", "oca", "cek")}
        chain["ask"] = AmdCert.from_bytes(fixtures[f"amd/{gen}/ask.cert"], "ask.cert")
        chain["ark"] = AmdCert.from_bytes(fixtures[f"amd/{gen}/ark.cert"], "ark.cert")
        part = name.rsplit("/", 1)[1].removesuffix(".cert")
        if part == "ark-short-encoding":
            part = "ark"
        chain[part] = cert
        report = verify_chain(**chain, trust=TrustStore.amd())
        changed = {i for i in range(len(original)) if original[i] != mutated[i]}
        if changed & _checked_positions(original):
            assert not report.ok, (name, sorted(changed))


@FUZZ
@given(data=st.binary(min_size=SEV_CERT_LEN, max_size=SEV_CERT_LEN))
def test_random_full_size_sev_certs_never_escape(data: bytes) -> None:
    # Force the fields the parser reads into range, so the key and signature paths are exercised.
    raw = bytearray(data)
    raw[0:4] = (1).to_bytes(4, "little")
    raw[8:12] = (0x1003).to_bytes(4, "little")
    raw[12:16] = (0x003).to_bytes(4, "little")
    raw[0x414:0x41C] = (0x1002).to_bytes(4, "little") + (0x002).to_bytes(4, "little")
    raw[0x61C:0x624] = (0x1000).to_bytes(4, "little") + bytes(4)
    cert = SevCert.from_bytes(bytes(raw), "pdh.cert")
    assert cert.to_bytes() == bytes(raw)
    link = check_link(cert, cert)
    assert not link.ok and link.reason is not None


@pytest.fixture(scope="module")
def lab_root():
    from sevconsole.sev.certs import generate_lab_root

    return generate_lab_root()


@FUZZ
@given(modulus=st.integers(0, 2**2048 - 1), exponent=st.one_of(st.sampled_from([0, 1, 2, 3, 65537]),
                                                             st.integers(0, 2**2048 - 1)))
def test_any_rsa_key_numbers_fail_links_without_raising(lab_root, modulus: int, exponent: int) -> None:
    ark = replace(lab_root.ark, modulus=modulus.to_bytes(256, "little"), pubexp=exponent.to_bytes(256, "little"))
    for link in (check_link(ark, ark), check_link(ark, lab_root.ask)):
        assert not link.ok and link.reason is LinkFailure.BAD_SIGNATURE and link.detail
    with contextlib.suppress(SevFormatError):
        ark.fingerprint()
