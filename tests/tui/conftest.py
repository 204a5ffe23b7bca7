"""Console test data: HostReports carrying the real AMD certificates, and isolated user folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevconsole.hosts.report import Capabilities
from sevconsole.sev.certs import AmdCert, SevCert, join_amd_chain, join_platform_chain
from sevconsole.sev.chain import verify_chain
from sevconsole.sev.trust import TrustStore


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the real user's config (theme, key map) or data."""
    monkeypatch.setenv("SEVCONSOLE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SEVCONSOLE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def caps_from(certs: Path, generation: str) -> Capabilities:
    platform = certs / "platforms" / generation
    amd = certs / "amd" / generation
    pdh, pek, oca, cek = (SevCert.from_bytes((platform / f"{n}.cert").read_bytes(), f"{n}.cert")
                          for n in ("pdh", "pek", "oca", "cek"))
    ask, ark = (AmdCert.from_bytes((amd / f"{n}.cert").read_bytes(), f"{n}.cert") for n in ("ask", "ark"))
    report = verify_chain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark, trust=TrustStore.amd())
    return Capabilities(pdh=pdh.to_bytes(), cert_chain=join_platform_chain(pek, oca, cek), cbitpos=47,
                        reduced_phys_bits=1, amd_chain=join_amd_chain(ask, ark), chain_report=report)


@pytest.fixture(scope="session")
def rome_caps(sev_certs: Path) -> Capabilities:
    return caps_from(sev_certs, "rome")


@pytest.fixture(scope="session")
def naples_caps(sev_certs: Path) -> Capabilities:
    return caps_from(sev_certs, "naples")
