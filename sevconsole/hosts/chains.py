"""Verifying a host's certificate chain for its `Capabilities`: which roots to trust and where
the ASK/ARK come from (the host itself, the lab root of `--lab`, or AMD roots the operator
imported under paths.amd_roots_dir())."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sevconsole.sev.certs import (
    AmdCert,
    SevCert,
    Usage,
    is_lab_key_id,
    join_amd_chain,
    split_amd_chain,
    split_platform_chain,
)
from sevconsole.sev.chain import ChainReport, verify_chain
from sevconsole.sev.errors import SevFormatError
from sevconsole.sev.trust import TrustStore


@dataclass(frozen=True)
class Roots:
    """AMD-format certificates that may complete a chain: ASKs and ARKs, by where they came from."""

    asks: tuple[AmdCert, ...] = ()
    arks: tuple[AmdCert, ...] = ()
    problems: tuple[str, ...] = ()  # files that could not be read, as sentences

    def __add__(self, other: Roots) -> Roots:
        return Roots(self.asks + other.asks, self.arks + other.arks, self.problems + other.problems)


def load_roots(folder: Path | None) -> Roots:
    """Every AMD root certificate (*.cert) under `folder` (or beside a file), sorted into ASKs and ARKs."""
    if folder is not None and folder.is_file():
        folder = folder.parent
    if folder is None or not folder.is_dir():
        return Roots()
    asks: list[AmdCert] = []
    arks: list[AmdCert] = []
    problems: list[str] = []
    for path in sorted(folder.rglob("*.cert")):
        try:
            cert = AmdCert.from_bytes(path.read_bytes(), path.name)
        except (SevFormatError, OSError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        (arks if cert.key_usage == Usage.ARK else asks).append(cert)
    return Roots(tuple(asks), tuple(arks), tuple(problems))


def roots_from_blob(blob: bytes | None, name: str) -> Roots:
    if not blob:
        return Roots()
    try:
        ask, ark = split_amd_chain(blob, name)
    except SevFormatError as exc:
        return Roots(problems=(str(exc),))
    return Roots((ask,), (ark,))


@dataclass(frozen=True)
class ChainCheck:
    report: ChainReport | None
    error: str | None  # why it could not be checked, or what is missing
    amd_chain: bytes | None  # ASK || ARK that completed the chain


def trust_store(lab_ark: AmdCert | None = None) -> TrustStore:
    """The one place a trust store is built: AMD's pinned roots, plus `lab_ark` when one is given.
    Raises ValueError when `lab_ark` is not a usable lab root (the sentence says why)."""
    trust = TrustStore.amd()
    return trust if lab_ark is None else trust.with_lab_root(lab_ark)


def verify_platform(pdh: SevCert, pek: SevCert, oca: SevCert, cek: SevCert, *, ask: AmdCert | None,
                    ark: AmdCert | None, trust: TrustStore) -> ChainReport:
    """The one entry point for verifying a platform's chain PDH <- PEK <- (OCA, CEK <- ASK <- ARK)."""
    return verify_chain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark, trust=trust)


def check_host_chain(host: str, pdh: bytes, cert_chain: bytes, roots: Roots, *,
                     lab_ark: AmdCert | None) -> ChainCheck:
    """Verify PDH <- PEK <- (OCA, CEK <- ASK <- ARK). `lab_ark` is trusted only when given."""
    try:
        pdh_cert = SevCert.from_bytes(pdh, "pdh.cert")
        pek, oca, cek = split_platform_chain(cert_chain)
    except SevFormatError as exc:
        return ChainCheck(None, f"{host}: the host's certificates are malformed: {exc}", None)
    try:
        trust = trust_store(lab_ark)
    except ValueError as exc:
        return ChainCheck(None, f"{host}: {exc}", None)
    ask = trust.ask_for(cek, roots.asks)
    ark = None if ask is None else next((a for a in roots.arks if a.key_id == ask.certifying_id), None)
    report = verify_platform(pdh_cert, pek, oca, cek, ask=ask, ark=ark, trust=trust)
    error = None
    if ask is None:
        error = (f"{host}: no known ASK signed its CEK; "
                 + ("its chain ends in a sevconsole lab root, not AMD's; trust that only for a lab host "
                    "(`lab = true` in the inventory, or --lab DIR)"
                    if any(is_lab_key_id(a.key_id) for a in roots.arks)
                    else "import the AMD roots with `sevconsole certs import-amd`"))
    elif ark is None:
        error = f"{host}: the ARK that certified its ASK ({ask.certifying_id.hex()}) is not at hand"
    elif not report.ok:
        bad = "; ".join(f"{link.name}: {link.detail}" for link in report.links if not link.ok)
        error = f"{host}: the certificate chain does not verify: {bad}"
    amd_chain = join_amd_chain(ask, ark) if ask is not None and ark is not None else None
    return ChainCheck(report, error, amd_chain)


def trust_with_lab_root(lab_root: Path | None) -> TrustStore:
    """AMD's pinned roots, plus the lab root found under `lab_root` (a lab's state folder or its
    lab-root folder) when one is given: what preflight checks a target's chain against."""
    roots = load_roots(lab_root)
    return trust_store(roots.arks[0] if roots.arks else None)
