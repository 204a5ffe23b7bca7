"""SEND_START's checks of the target platform, and PEK_CERT_IMPORT's checks of an owner's certs.

Status mapping (one rule each, so the console's preflight can predict the answer):
- bytes that do not parse, or a PDH that is not a usable ECDH P-384 key: INVALID_CERTIFICATE;
- a rule the guest policy asks for and the target does not meet (DOMAIN: the chain
  PDH<-PEK<-OCA does not verify or the OCA is not this platform's; SEV: the chain
  PDH<-PEK<-CEK<-ASK<-ARK does not verify or does not end at this platform's ARK, or the
  target PEK's API version is below the policy's): POLICY_FAILURE.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from ..certs import ECDH_ALGOS, AmdCert, SevCert, Usage, split_amd_chain, split_platform_chain
from ..chain import check_link
from ..errors import SevFormatError
from ..policy import GuestPolicy, PolicyFlag
from ..status import Status
from .keys import same_key


@dataclass(frozen=True)
class CheckOutcome:
    status: Status
    detail: str = ""
    pdh: SevCert | None = None  # the parsed target PDH when the checks pass


def _fail(status: Status, detail: str) -> CheckOutcome:
    return CheckOutcome(status, detail)


def parse_pdh(data: bytes, name: str) -> tuple[SevCert | None, str]:
    """A PDH fit for ECDH (version 1, usage PDH, algo ECDH, a point on P-384), or why not."""
    try:
        pdh = SevCert.from_bytes(data, name)
        if pdh.usage != Usage.PDH:
            return None, f"{name}: key usage is {pdh.usage.name}, a PDH has usage PDH (0x1003)"
        if pdh.algo not in ECDH_ALGOS:
            return None, f"{name}: key algorithm is {pdh.algo.name}, a PDH is an ECDH key"
        pdh_public_key(pdh)
    except SevFormatError as exc:
        return None, str(exc)
    return pdh, ""


def pdh_public_key(pdh: SevCert) -> ec.EllipticCurvePublicKey:
    """The ECDH key of a PDH (parse_pdh has checked it is one)."""
    key = pdh.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SevFormatError(pdh.name, 0x0C, "a PDH holds an EC key")
    return key


def _link_failure(
    rule: str, signer: SevCert | AmdCert, subject: SevCert | AmdCert, what: str
) -> str | None:
    link = check_link(signer, subject)
    if link.ok:
        return None
    return f"{rule}: the target's {what} does not verify ({link.detail or link.reason})"


Link = tuple[SevCert | AmdCert, SevCert | AmdCert, str]  # signer, subject, what it is


def _first_failure(rule: str, links: tuple[Link, ...]) -> str | None:
    for signer, subject, what in links:
        failure = _link_failure(rule, signer, subject, what)
        if failure:
            return failure
    return None


def check_target(
    policy: GuestPolicy,
    pdh_bytes: bytes,
    plat_chain: bytes,
    amd_chain: bytes,
    *,
    own_oca: SevCert,
    own_ark: AmdCert | None,
) -> CheckOutcome:
    """Everything SEND_START checks about the target before it wraps keys for it.

    `own_ark` is needed only for the SEV rule: a caller predicting the DOMAIN rule alone (the
    console's preflight, which has no firmware of its own) passes None with a DOMAIN-only policy."""
    pdh, why = parse_pdh(pdh_bytes, "target PDH")
    if pdh is None:
        return _fail(Status.INVALID_CERTIFICATE, why)
    need_domain = bool(policy.flags & PolicyFlag.DOMAIN)
    need_sev = bool(policy.flags & PolicyFlag.SEV)
    if not (need_domain or need_sev):
        return CheckOutcome(Status.SUCCESS, pdh=pdh)  # neither rule: any valid PDH is accepted
    try:
        pek, oca, cek = split_platform_chain(plat_chain, "target platform chain")
    except SevFormatError as exc:
        return _fail(Status.INVALID_CERTIFICATE, str(exc))
    failure = _link_failure("policy", pek, pdh, "PEK -> PDH signature")
    if failure:
        return _fail(Status.POLICY_FAILURE, failure)
    if need_domain:
        failure = _first_failure(
            "DOMAIN", ((oca, oca, "OCA self-signature"), (oca, pek, "OCA -> PEK signature"))
        )
        if failure:
            return _fail(Status.POLICY_FAILURE, failure)
        if not same_key(oca, own_oca):
            return _fail(
                Status.POLICY_FAILURE,
                "DOMAIN: the target's OCA is not this platform's owner (OCA keys differ); a DOMAIN "
                "guest may only move between platforms of the same owner",
            )
    if need_sev:
        if own_ark is None:
            raise ValueError("the SEV rule needs this platform's ARK (own_ark)")
        try:
            ask, ark = split_amd_chain(amd_chain, "target AMD chain")
        except SevFormatError as exc:
            return _fail(Status.INVALID_CERTIFICATE, str(exc))
        if not same_key(ark, own_ark):
            return _fail(
                Status.POLICY_FAILURE,
                f"SEV: the target's chain ends at ARK {ark.key_id.hex()}, not at this platform's "
                f"root ARK {own_ark.key_id.hex()}",
            )
        failure = _first_failure(
            "SEV",
            (
                (ark, ark, "ARK self-signature"),
                (ark, ask, "ARK -> ASK signature"),
                (ask, cek, "ASK -> CEK signature"),
                (cek, pek, "CEK -> PEK signature"),
            ),
        )
        if failure:
            return _fail(Status.POLICY_FAILURE, failure)
        if (pek.api_major, pek.api_minor) < (policy.api_major, policy.api_minor):
            return _fail(
                Status.POLICY_FAILURE,
                f"SEV: the target firmware API {pek.api_major}.{pek.api_minor} is below the "
                f"policy's minimum {policy.api_major}.{policy.api_minor}",
            )
    return CheckOutcome(Status.SUCCESS, pdh=pdh)
