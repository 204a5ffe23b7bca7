"""Chain verification: one result per link of the SEV trust graph, each ok or failed for one reason.

    ARK (self) -> ASK -> CEK -> PEK <- OCA (self);  PEK -> PDH

Each link checks, in this order, so the first thing wrong is the one reported:
signer usable (usage, key algorithm, curve, point) -> subject usage -> a signature by the signer
is present (slot found by signature usage) and its algorithm fits the signer's key -> certifying
id (AMD format) -> the signature verifies -> the subject's own key is sound (algorithm for its
usage, P-384, on the curve). Nothing here raises on bad certificates: every problem becomes a
`LinkResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevconsole.sev.certs import (
    CURVE_P384,
    EC_INT_LEN,
    ECDH_ALGOS,
    ECDSA_ALGOS,
    RSA_ALGOS,
    AmdCert,
    SevCert,
    Usage,
    curve_name,
    hash_for_algo,
    hash_for_rsa_bits,
)
from sevconsole.sev.errors import SevFormatError

if TYPE_CHECKING:
    from sevconsole.sev.trust import RootInfo, TrustStore

Cert = SevCert | AmdCert


class LinkFailure(Enum):
    BAD_SIGNATURE = "bad signature"
    USAGE_MISMATCH = "usage mismatch"
    ALGO_MISMATCH = "algorithm mismatch"
    WRONG_CURVE = "wrong curve"
    POINT_NOT_ON_CURVE = "point not on curve"
    CERTIFYING_ID_MISMATCH = "certifying id mismatch"
    MISSING_SIGNATURE = "missing signature"
    UNTRUSTED_ROOT = "untrusted root"


@dataclass(frozen=True)
class LinkResult:
    name: str  # "ARK self", "ARK->ASK", ...
    ok: bool
    reason: LinkFailure | None
    detail: str  # one sentence, with certificate names

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok,
                "reason": self.reason.name if self.reason else None, "detail": self.detail}


@dataclass(frozen=True)
class ChainReport:
    links: tuple[LinkResult, ...]
    root: RootInfo | None  # the trusted root the chain ends in, None when it ends in none

    @property
    def ok(self) -> bool:
        return self.root is not None and all(link.ok for link in self.links)

    @property
    def failures(self) -> tuple[LinkResult, ...]:
        return tuple(link for link in self.links if not link.ok)

    def link(self, name: str) -> LinkResult:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "root": self.root.to_dict() if self.root else None,
                "links": [link.to_dict() for link in self.links]}


# The edges of the trust graph: (signer usage, subject usage) -> link name.
EDGES: dict[tuple[Usage, Usage], str] = {
    (Usage.ARK, Usage.ARK): "ARK self",
    (Usage.ARK, Usage.ASK): "ARK->ASK",
    (Usage.ASK, Usage.CEK): "ASK->CEK",
    (Usage.CEK, Usage.PEK): "CEK->PEK",
    (Usage.OCA, Usage.OCA): "OCA self",
    (Usage.OCA, Usage.PEK): "OCA->PEK",
    (Usage.PEK, Usage.PDH): "PEK->PDH",
}
LINK_ORDER = tuple(EDGES.values())
AMD_USAGES = (Usage.ARK, Usage.ASK)
# What key each SEV usage must hold: signers sign with ECDSA, the PDH is an ECDH key.
KEY_ALGOS = {Usage.OCA: ECDSA_ALGOS, Usage.PEK: ECDSA_ALGOS, Usage.CEK: ECDSA_ALGOS,
             Usage.PDH: ECDH_ALGOS}


class _Fail(Exception):
    def __init__(self, reason: LinkFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _hash_label(h: object) -> str:
    return str(getattr(h, "name", "")).upper().replace("SHA", "SHA-")


def _usage(cert: Cert) -> Usage:
    return cert.key_usage if isinstance(cert, AmdCert) else cert.usage


def _role(cert: Cert, usage: Usage) -> str:
    return f"{cert.name} (the {usage.name})"


def _check_usage(cert: Cert, expected: Usage) -> None:
    actual = _usage(cert)
    if actual != expected:
        raise _Fail(LinkFailure.USAGE_MISMATCH,
                    f"{cert.name} has key usage {actual.name}, but this link needs the {expected.name}")
    if isinstance(cert, AmdCert) != (expected in AMD_USAGES):
        kind = "the AMD root format" if isinstance(cert, AmdCert) else "the SEV format"
        raise _Fail(LinkFailure.USAGE_MISMATCH,
                    f"{cert.name} is in {kind}, which the {expected.name} never uses")


def _ec_key(cert: SevCert, role: str) -> ec.EllipticCurvePublicKey:
    if cert.curve != CURVE_P384:
        raise _Fail(LinkFailure.WRONG_CURVE,
                    f"{role} has a key on {curve_name(cert.curve)}; SEV keys are on P-384 (curve 2)")
    try:
        key = cert.public_key()
    except SevFormatError:
        raise _Fail(LinkFailure.POINT_NOT_ON_CURVE,
                    f"{role} has a public key that is not a point on P-384") from None
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _signer_key(signer: Cert, usage: Usage) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    role = _role(signer, usage)
    if isinstance(signer, AmdCert):
        try:
            return signer.public_key()
        except SevFormatError:
            raise _Fail(LinkFailure.BAD_SIGNATURE,
                        f"{role} holds an RSA key that is not valid (damaged modulus or exponent)") from None
    if signer.algo not in ECDSA_ALGOS:
        raise _Fail(LinkFailure.ALGO_MISMATCH,
                    f"{role} holds a {signer.algo.name} key, which cannot sign; a {usage.name} holds an ECDSA key")
    return _ec_key(signer, role)


def _verify_sev_signature(signer: Cert, signer_usage: Usage, subject: SevCert,
                          key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    found = subject.signature_for(signer_usage)
    if found is None:
        raise _Fail(LinkFailure.MISSING_SIGNATURE,
                    f"{subject.name} carries no signature by a {signer_usage.name} in either slot")
    slot, sig = found
    where = f"{subject.name} signature slot {slot + 1} ({sig.algo.name})"
    tbs = subject.signed_bytes()
    h = hash_for_algo(sig.algo)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if sig.algo not in RSA_ALGOS:
                raise _Fail(LinkFailure.ALGO_MISMATCH,
                            f"{where} is not an RSA signature, but the {signer_usage.name} holds an RSA key")
            value = sig.rsa_int()
            if value >= key.public_numbers().n:
                raise InvalidSignature
            key.verify(value.to_bytes((key.key_size + 7) // 8, "big"), tbs,
                       padding.PSS(padding.MGF1(h), h.digest_size), h)
            how = f"RSA-PSS {_hash_label(h)}"
        else:
            if sig.algo not in ECDSA_ALGOS:
                raise _Fail(LinkFailure.ALGO_MISMATCH,
                            f"{where} is not an ECDSA signature, but the {signer_usage.name} holds an EC key")
            if any(sig.raw[2 * EC_INT_LEN :]):
                # Padding after r and s is not signed data: refuse it so no byte of a slot is inert.
                raise InvalidSignature
            r, s = sig.ecdsa_rs()
            key.verify(encode_dss_signature(r, s), tbs, ec.ECDSA(h))
            how = f"ECDSA P-384 {_hash_label(h)}"
    except (InvalidSignature, ValueError):
        raise _Fail(LinkFailure.BAD_SIGNATURE,
                    f"{where} does not verify with the key of {signer.name}: the {_usage(subject).name} "
                    f"was not certified by this {signer_usage.name}, or one of them is damaged") from None
    return f"{how} signature in slot {slot + 1} by {signer.name} verifies"


def _verify_amd_signature(signer: AmdCert, subject: AmdCert, key: rsa.RSAPublicKey) -> str:
    if subject.certifying_id != signer.key_id:
        raise _Fail(LinkFailure.CERTIFYING_ID_MISMATCH,
                    f"{subject.name} is certified by key id {subject.certifying_id.hex()}, "
                    f"but {signer.name} has key id {signer.key_id.hex()}")
    sig = subject.signature_big_endian()
    if sig is None:
        raise _Fail(LinkFailure.MISSING_SIGNATURE,
                    f"{subject.name} has no signature at all (the {len(subject.to_bytes())}-byte short encoding)")
    h = hash_for_rsa_bits(signer.modulus_bits)
    try:
        if int.from_bytes(sig, "big") >= key.public_numbers().n:
            raise InvalidSignature
        size = (key.key_size + 7) // 8
        key.verify(sig.rjust(size, b"\0")[-size:], subject.signed_bytes(),
                   padding.PSS(padding.MGF1(h), h.digest_size), h)
    except (InvalidSignature, ValueError):
        raise _Fail(LinkFailure.BAD_SIGNATURE,
                    f"the RSA-PSS {_hash_label(h)} signature of {subject.name} does not verify with the key "
                    f"of {signer.name}: it was not signed by this {signer.key_usage.name}, or one of them is damaged") from None
    return f"RSA-PSS {_hash_label(h)} signature by {signer.name} verifies"


def _check_subject_key(subject: Cert, usage: Usage) -> None:
    if not isinstance(subject, SevCert):
        return  # an AMD key's soundness is checked where it signs
    role = _role(subject, usage)
    allowed = KEY_ALGOS[usage]
    if subject.algo not in allowed:
        want = "ECDH" if allowed is ECDH_ALGOS else "ECDSA"
        raise _Fail(LinkFailure.ALGO_MISMATCH,
                    f"{role} holds a {subject.algo.name} key; a {usage.name} holds an {want} P-384 key")
    _ec_key(subject, role)


def _link(name: str, signer: Cert, subject: Cert, signer_usage: Usage, subject_usage: Usage) -> LinkResult:
    try:
        _check_usage(signer, signer_usage)
        key = _signer_key(signer, signer_usage)
        _check_usage(subject, subject_usage)
        if isinstance(subject, AmdCert):
            assert isinstance(signer, AmdCert) and isinstance(key, rsa.RSAPublicKey)
            detail = _verify_amd_signature(signer, subject, key)
        else:
            assert isinstance(subject, SevCert)
            detail = _verify_sev_signature(signer, signer_usage, subject, key)
        _check_subject_key(subject, subject_usage)
    except _Fail as fail:
        return LinkResult(name, False, fail.reason, fail.detail)
    return LinkResult(name, True, None, detail)


def check_link(signer: Cert, subject: Cert, name: str | None = None) -> LinkResult:
    """Does `signer` certify `subject`? The link is named by the two usages (e.g. "OCA->PEK").

    A pair that is not an edge of the SEV trust graph fails with USAGE_MISMATCH.
    """
    pair = (_usage(signer), _usage(subject))
    edge = EDGES.get(pair)
    if edge is None:
        return LinkResult(name or f"{pair[0].name}->{pair[1].name}", False, LinkFailure.USAGE_MISMATCH,
                          f"a {pair[0].name} never certifies a {pair[1].name} "
                          f"({signer.name} -> {subject.name})")
    return _link(name or edge, signer, subject, *pair)


def _missing(name: str, what: str) -> LinkResult:
    return LinkResult(name, False, LinkFailure.UNTRUSTED_ROOT,
                      f"no {what} was given, so nothing ties the chain to an AMD root")


def _ark_self(ark: AmdCert | None, trust: TrustStore) -> tuple[LinkResult, RootInfo | None]:
    name = "ARK self"
    if ark is None:
        return _missing(name, "ARK"), None
    own = _link(name, ark, ark, Usage.ARK, Usage.ARK)
    if not own.ok and own.reason is not LinkFailure.MISSING_SIGNATURE:
        return own, None
    root, why = trust.root_for(ark)
    if root is None:
        if not own.ok:
            return LinkResult(name, False, LinkFailure.MISSING_SIGNATURE, f"{own.detail}, and {why}"), None
        return LinkResult(name, False, LinkFailure.UNTRUSTED_ROOT, why), None
    if not own.ok:
        # The 576-byte Naples ARK: nothing to check, so trust rests on the pinned key alone.
        return LinkResult(name, True, None, f"{own.detail}; trust rests on the pinned key alone: {why}"), root
    return LinkResult(name, True, None, f"{own.detail}; {why}"), root


def verify_chain(*, pdh: SevCert, pek: SevCert, oca: SevCert, cek: SevCert,
                 ask: AmdCert | None, ark: AmdCert | None, trust: TrustStore) -> ChainReport:
    """Check all seven links, in LINK_ORDER. The chain is ok when every link is and the ARK is trusted."""
    ark_self, root = _ark_self(ark, trust)
    links = [
        ark_self,
        _missing("ARK->ASK", "ARK" if ark is None else "ASK") if ark is None or ask is None
        else _link("ARK->ASK", ark, ask, Usage.ARK, Usage.ASK),
        _missing("ASK->CEK", "ASK") if ask is None else _link("ASK->CEK", ask, cek, Usage.ASK, Usage.CEK),
        _link("CEK->PEK", cek, pek, Usage.CEK, Usage.PEK),
        _link("OCA self", oca, oca, Usage.OCA, Usage.OCA),
        _link("OCA->PEK", oca, pek, Usage.OCA, Usage.PEK),
        _link("PEK->PDH", pek, pdh, Usage.PEK, Usage.PDH),
    ]
    return ChainReport(tuple(links), root)
