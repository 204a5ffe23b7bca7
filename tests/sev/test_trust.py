"""The trust store: pinned AMD ARKs recomputed from the fixtures, generation lookup, lab roots."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sevconsole.sev.certs import AmdCert, SevCert, Usage, generate_lab_root
from sevconsole.sev.chain import LinkFailure, verify_chain
from sevconsole.sev.trust import AMD_ARKS, TrustStore

GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
# The ARK key ids as sev-reference.md lists them (an independent source for the pins).
REFERENCE_KEY_IDS = {
    "naples": "1bb987c359494606b174945601c9ea5b",
    "rome": "e6002122fb58419399d15fee7b131351",
    "milan": "94c38e4177d0479292a7ae671d083fb6",
    "genoa": "9f9d4a8fe761456599f6946c4c010f3a",
    "turin": "d05c3a8bde484904b49552422ceb3942",
}


def amd(root: Path, gen: str, part: str) -> AmdCert:
    return AmdCert.from_bytes((root / "amd" / gen / f"{part}.cert").read_bytes(), f"{part}.cert")


def sev(root: Path, gen: str, part: str) -> SevCert:
    return SevCert.from_bytes((root / "platforms" / gen / f"{part}.cert").read_bytes(), f"{part}.cert")


def test_pins_recomputed_from_the_fixtures(sev_certs: Path) -> None:
    pins = {pin.generation: pin for pin in AMD_ARKS}
    assert sorted(pins) == sorted(GENERATIONS)
    for gen in GENERATIONS:
        ark = amd(sev_certs, gen, "ark")
        assert pins[gen].key_id == ark.key_id
        assert pins[gen].key_id.hex() == REFERENCE_KEY_IDS[gen]
        assert pins[gen].key_sha256 == ark.fingerprint()
        assert not pins[gen].is_lab


@pytest.mark.parametrize("gen", GENERATIONS)
def test_each_amd_ark_is_trusted_as_its_generation(sev_certs: Path, gen: str) -> None:
    root, why = TrustStore.amd().root_for(amd(sev_certs, gen, "ark"))
    assert root is not None and root.generation == gen and not root.is_lab
    assert root.name == f"AMD {gen.capitalize()} ARK" and "pinned" in why


def test_short_naples_ark_matches_the_pin(sev_certs: Path) -> None:
    root, _ = TrustStore.amd().root_for(amd(sev_certs, "naples", "ark-short-encoding"))
    assert root is not None and root.generation == "naples"


def test_an_ask_is_not_a_root(sev_certs: Path) -> None:
    root, why = TrustStore.amd().root_for(amd(sev_certs, "rome", "ask"))
    assert root is None and "not one of the pinned ARKs" in why


def test_key_id_alone_is_not_trusted(sev_certs: Path) -> None:
    """An ARK that copies Rome's key id but holds another key, self-signed, is refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rome_id = amd(sev_certs, "rome", "ark").key_id
    fake = AmdCert.build(key.public_key(), rome_id, rome_id, Usage.ARK, key, "ark.cert")
    root, why = TrustStore.amd().root_for(fake)
    assert root is None and "different public key" in why
    certs = {p: sev(sev_certs, "rome", p) for p in ("pdh", "pek", "oca", "cek")}
    report = verify_chain(**certs, ask=amd(sev_certs, "rome", "ask"), ark=fake, trust=TrustStore.amd())
    assert report.link("ARK self").reason is LinkFailure.UNTRUSTED_ROOT and not report.ok


def test_generation_of_tries_each_ask(sev_certs: Path) -> None:
    store = TrustStore.amd()
    asks = [amd(sev_certs, gen, "ask") for gen in GENERATIONS]
    assert store.generation_of(sev(sev_certs, "naples", "cek"), asks) == "naples"
    assert store.generation_of(sev(sev_certs, "rome", "cek"), asks) == "rome"
    assert store.generation_of(sev(sev_certs, "rome", "cek"), reversed(asks)) == "rome"
    assert store.ask_for(sev(sev_certs, "rome", "cek"), asks) == asks[1]
    assert store.generation_of(sev(sev_certs, "rome", "cek"), [asks[0], *asks[2:]]) is None
    assert store.generation_of(sev(sev_certs, "rome", "cek"), []) is None
    # The PEK is not signed by any ASK.
    assert store.generation_of(sev(sev_certs, "rome", "pek"), asks) is None


def test_lab_root_trusted_only_when_asked() -> None:
    lab = generate_lab_root()
    root, why = TrustStore.amd().root_for(lab.ark)
    assert root is None and "lab root" in why
    store = TrustStore.amd().with_lab_root(lab.ark)
    root, _ = store.root_for(lab.ark)
    assert root is not None and root.generation == "LAB" and root.is_lab
    assert "lab root" in root.name and store.has_lab_root
    assert len(store.pins) == len(AMD_ARKS) + 1
    assert not TrustStore.amd().has_lab_root
    only_lab = TrustStore(()).with_lab_root(lab.ark)
    assert [p.generation for p in only_lab.pins] == ["LAB"]
    # Another lab's root is not this one.
    assert store.root_for(generate_lab_root().ark)[0] is None


def test_a_real_ark_cannot_be_added_as_a_lab_root(sev_certs: Path) -> None:
    with pytest.raises(ValueError, match="not a lab root ARK"):
        TrustStore.amd().with_lab_root(amd(sev_certs, "rome", "ark"))
    lab = generate_lab_root()
    with pytest.raises(ValueError, match="not a lab root ARK"):
        TrustStore.amd().with_lab_root(lab.ask)
