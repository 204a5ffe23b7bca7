"""A host's chain checked the way discovery does, with the real AMD certificates: roots imported
by the operator (a folder per generation), the roots a host sends, and refusals in plain words."""

from __future__ import annotations

import shutil
from pathlib import Path

from sevconsole.hosts.chains import Roots, check_host_chain, load_roots, roots_from_blob
from sevconsole.sev.certs import join_amd_chain


def platform(sev_certs: Path, gen: str) -> tuple[bytes, bytes]:
    d = sev_certs / "platforms" / gen
    return (d / "pdh.cert").read_bytes(), b"".join((d / f"{p}.cert").read_bytes() for p in ("pek", "oca", "cek"))


def imported(sev_certs: Path, tmp_path: Path, *gens: str) -> Path:
    """An operator's AMD roots folder (a scratch copy, as `certs import-amd` would make)."""
    for gen in gens:
        shutil.copytree(sev_certs / "amd" / gen, tmp_path / "amd" / gen)
    return tmp_path / "amd"


def test_rome_host_verifies_to_the_pinned_rome_ark(sev_certs: Path, tmp_path: Path) -> None:
    roots = load_roots(imported(sev_certs, tmp_path, "naples", "rome", "milan", "genoa"))
    assert len(roots.arks) >= 4 and len(roots.asks) == 4 and roots.problems == ()
    for gen in ("rome", "naples"):
        check = check_host_chain("epyc", *platform(sev_certs, gen), roots, lab_ark=None)
        assert check.error is None and check.report.ok, check.error
        assert check.report.root.generation == gen and not check.report.root.is_lab
        ask = (sev_certs / "amd" / gen / "ask.cert").read_bytes()
        assert check.amd_chain is not None and check.amd_chain.startswith(ask)


def test_naples_host_with_only_rome_roots_says_what_to_import(sev_certs: Path, tmp_path: Path) -> None:
    roots = load_roots(imported(sev_certs, tmp_path, "rome"))
    check = check_host_chain("old-epyc", *platform(sev_certs, "naples"), roots, lab_ark=None)
    assert check.report is not None and not check.report.ok
    assert "old-epyc" in check.error and "sevconsole certs import-amd" in check.error


def test_roots_sent_by_the_host_are_used(sev_certs: Path) -> None:
    amd = sev_certs / "amd" / "rome"
    blob = join_amd_chain((amd / "ask.cert").read_bytes(), (amd / "ark.cert").read_bytes())
    check = check_host_chain("epyc", *platform(sev_certs, "rome"), roots_from_blob(blob, "epyc AMD chain"),
                             lab_ark=None)
    assert check.report.ok and check.report.root.generation == "rome"


def test_one_flipped_bit_fails_with_the_link_named(sev_certs: Path, tmp_path: Path) -> None:
    roots = load_roots(imported(sev_certs, tmp_path, "rome"))
    pdh, chain = platform(sev_certs, "rome")
    bad = bytearray(pdh)
    bad[0x20] ^= 0x01  # inside the PDH's public key: PEK's signature over it breaks
    check = check_host_chain("epyc", bytes(bad), chain, roots, lab_ark=None)
    assert not check.report.ok and "PEK->PDH" in check.error


def test_malformed_and_unreadable_input(sev_certs: Path, tmp_path: Path) -> None:
    check = check_host_chain("epyc", b"\x00" * 10, b"", Roots(), lab_ark=None)
    assert check.report is None and "malformed" in check.error and "epyc" in check.error
    (tmp_path / "junk.cert").write_bytes(b"junk")
    assert load_roots(tmp_path).problems and load_roots(tmp_path / "absent") == Roots()
    assert roots_from_blob(b"short", "x").problems


def test_a_host_serving_a_lab_root_is_told_apart_from_missing_amd_roots() -> None:
    """A host not marked as a lab host that serves a sevconsole lab chain: refused, and the
    sentence says it is a lab root (to trust only for lab hosts), not 'import AMD's roots'."""
    from sevconsole.sev.certs import generate_lab_root
    from sevconsole.sev.firmware import SevFirmware

    lab = generate_lab_root()
    fw = SevFirmware(ask_key=lab.ask_key, ask=lab.ask, ark=lab.ark)
    assert fw.init().status == 0
    export = fw.pdh_cert_export()
    check = check_host_chain("rogue", export.pdh, export.cert_chain,
                             roots_from_blob(fw.amd_chain, "rogue AMD chain"), lab_ark=None)
    assert check.report is not None and not check.report.ok
    assert "rogue" in check.error and "lab root" in check.error and "lab = true" in check.error
    assert "import-amd" not in check.error
