"""The platform commands: INIT, SHUTDOWN, PLATFORM_STATUS, PEK_GEN, PDH_GEN, PDH_CERT_EXPORT,
PEK_CSR and PEK_CERT_IMPORT.

PEK_GEN, PEK_CSR and PEK_CERT_IMPORT need the platform INIT; PDH_GEN and PDH_CERT_EXPORT INIT
or WORKING. PEK_GEN makes the platform self-owned again (as on real parts).
"""

from __future__ import annotations

import operator
from dataclasses import replace

from ..certs import SEV_CERT_LEN, Algo, SevCert, Signature, Usage, sign_sev_cert
from ..chain import check_link
from ..errors import SevFormatError
from ..status import FLAG_ES_CONFIGURED, FLAG_OWNER_EXTERNAL, Command, PlatformState, Status
from .command import platform_command
from .guest import CHAIN_LEN, PDH_LEN
from .keys import regenerate_pdh, regenerate_pek, same_key
from .results import CsrResult, PdhExportResult, PlatformStatusResult, Refusal, Result
from .state import FirmwareState

UNINIT = {PlatformState.UNINIT}
INIT = {PlatformState.INIT}
INIT_OR_WORKING = {PlatformState.INIT, PlatformState.WORKING}


class PlatformCommands(FirmwareState):
    @platform_command(Command.INIT, Result, UNINIT)
    def init(self) -> Result:
        self._state = PlatformState.INIT
        return Result(Status.SUCCESS)

    @platform_command(Command.SHUTDOWN, Result)
    def shutdown(self) -> Result:
        self._guests.clear()  # every guest context is lost; memory stays as the hypervisor has it
        self._state = PlatformState.UNINIT
        return Result(Status.SUCCESS)

    @platform_command(Command.PLATFORM_STATUS, PlatformStatusResult)
    def platform_status(self) -> PlatformStatusResult:
        flags = (FLAG_OWNER_EXTERNAL if self._external_owner else 0) | (
            FLAG_ES_CONFIGURED if self.es else 0
        )
        major, minor = self.api
        return PlatformStatusResult(
            Status.SUCCESS, major, minor, self._state, flags, self.build, len(self._guests)
        )

    @platform_command(Command.PEK_GEN, Result, INIT)
    def pek_gen(self) -> Result:
        self._keys = regenerate_pek(self._keys, self.api)
        self._external_owner = False
        return Result(Status.SUCCESS)

    @platform_command(Command.PDH_GEN, Result, INIT_OR_WORKING)
    def pdh_gen(self) -> Result:
        self._keys = regenerate_pdh(self._keys, self.api)
        return Result(Status.SUCCESS)

    @platform_command(Command.PDH_CERT_EXPORT, PdhExportResult, INIT_OR_WORKING)
    def pdh_cert_export(self, pdh_len: int = PDH_LEN, chain_len: int = CHAIN_LEN) -> PdhExportResult:
        if operator.index(pdh_len) < PDH_LEN or operator.index(chain_len) < CHAIN_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"needs pdh_len >= {PDH_LEN} and chain_len >= {CHAIN_LEN}",
                pdh_len=PDH_LEN,
                chain_len=CHAIN_LEN,
            )
        pdh = self._keys.pdh.to_bytes()
        return PdhExportResult(Status.SUCCESS, pdh, self.cert_chain, PDH_LEN, CHAIN_LEN)

    @platform_command(Command.PEK_CSR, CsrResult, INIT)
    def pek_csr(self, csr_len: int = SEV_CERT_LEN) -> CsrResult:
        if operator.index(csr_len) < SEV_CERT_LEN:
            raise Refusal(
                Status.INVALID_LENGTH, f"needs csr_len >= {SEV_CERT_LEN}", csr_len=SEV_CERT_LEN
            )
        pek = self._keys.pek
        csr = SevCert.build(
            self._keys.pek_key.public_key(), Usage.PEK, pek.algo, pek.api_major, pek.api_minor
        )
        return CsrResult(Status.SUCCESS, csr.to_bytes(), SEV_CERT_LEN)

    @platform_command(Command.PEK_CERT_IMPORT, Result, INIT)
    def pek_cert_import(self, pek: bytes, oca: bytes) -> Result:
        """An owner's OCA and the PEK (our CSR) it signed; the firmware adds the CEK signature."""
        if self._external_owner:
            raise Refusal(
                Status.ALREADY_OWNED,
                "the platform already has an external owner (PEK_GEN resets it)",
            )
        if len(pek) != SEV_CERT_LEN or len(oca) != SEV_CERT_LEN:
            raise Refusal(
                Status.INVALID_LENGTH, f"PEK and OCA certificates are {SEV_CERT_LEN} bytes each"
            )
        try:
            pek_cert = SevCert.from_bytes(pek, "imported PEK")
            oca_cert = SevCert.from_bytes(oca, "imported OCA")
        except SevFormatError as exc:
            raise Refusal(Status.INVALID_CERTIFICATE, str(exc)) from None
        if oca_cert.usage != Usage.OCA or pek_cert.usage != Usage.PEK:
            raise Refusal(
                Status.INVALID_CERTIFICATE,
                f"got usages {oca_cert.usage.name} and {pek_cert.usage.name}, need OCA and PEK",
            )
        for signer, subject, what in (
            (oca_cert, oca_cert, "OCA self-signature"),
            (oca_cert, pek_cert, "OCA -> PEK signature"),
        ):
            link = check_link(signer, subject)
            if not link.ok:
                raise Refusal(
                    Status.BAD_SIGNATURE, f"the {what} does not verify ({link.detail})"
                )
        if not same_key(pek_cert, self._keys.pek):
            raise Refusal(
                Status.INVALID_CERTIFICATE,
                "the PEK is not this platform's (sign the CSR from PEK_CSR)",
            )
        found = pek_cert.signature_for(Usage.OCA)
        cek_slot = 1 - (found[0] if found else 0)
        unsigned = pek_cert.sigs[cek_slot]
        if unsigned.used and unsigned.usage != Usage.CEK:
            raise Refusal(
                Status.INVALID_CERTIFICATE, "the PEK's other signature slot must be free for the CEK"
            )
        cleared = list(pek_cert.sigs)
        cleared[cek_slot] = Signature(Usage.INVALID, Algo.NONE, bytes(len(unsigned.raw)))
        pek_cert = replace(pek_cert, sigs=(cleared[0], cleared[1]))
        signed = sign_sev_cert(pek_cert, self._keys.cek_key, Usage.CEK, cek_slot)
        self._keys = replace(self._keys, oca_key=None, oca=oca_cert, pek=signed)
        self._external_owner = True
        return Result(Status.SUCCESS)
