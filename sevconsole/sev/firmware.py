"""A software model of the SEV firmware (the PSP): platform, guests, LAUNCH and SEND/RECEIVE.

`SevFirmware` answers every command with a frozen result whose first field is a `Status`,
following the rules of sev-reference.md: state machines, lengths (with the needed length
written back), policy (NOSEND, DOMAIN, SEV, API version, reserved bits), integrity (every MAC
checked before anything is decrypted; failures are BAD_MEASUREMENT and leave guest memory as
it was). It mints its own CEK/OCA/PEK/PDH in the real formats, signed by the ASK it is given.

Modules: this one (the class, platform, LAUNCH and guest commands), firmware_core.py (state,
lock, log, timing), firmware_migration.py (SEND/RECEIVE), firmware_results.py (results),
firmware_keys.py (the platform's certificates), firmware_checks.py (SEND_START's target checks).

Methods:
  platform: init, shutdown, platform_status, pek_gen, pdh_gen, pdh_cert_export, pek_csr,
            pek_cert_import; properties amd_chain, platform_state, api
  guests:   launch_start, launch_update_data, launch_update_vmsa, launch_measure,
            launch_finish, activate, deactivate, guest_status, decommission
  send:     send_start, send_update_data, send_update_vmsa, send_pages (batch), send_finish,
            send_cancel
  receive:  receive_start, receive_update_data, receive_update_vmsa, receive_pages (batch),
            receive_finish
  the guest CPU's view (not PSP commands): guest_write, guest_read (raise GuestAccessError)
  introspection: log, counts, last_status, guest_state(handle), handles

Memory: each guest is given the hypervisor's RAM buffer (bytearray, memoryview or uint8
array). Pages the firmware writes are encrypted at rest with the guest's VEK, tweaked by the
guest physical address (GuestMemoryCipher); the firmware reads and writes it by gpa.

Rules where the reference is silent, chosen and kept consistent:
- guest commands need the platform WORKING (it is, whenever a guest exists); LAUNCH_START
  and RECEIVE_START need INIT or WORKING;
- a SENT guest accepts only DECOMMISSION (plus the harmless GUEST_STATUS and DEACTIVATE);
- target checks at SEND_START: see firmware_checks.py (INVALID_CERTIFICATE / POLICY_FAILURE);
- PEK_GEN, PEK_CSR and PEK_CERT_IMPORT need the platform INIT; PDH_GEN and PDH_CERT_EXPORT
  INIT or WORKING; PEK_GEN makes the platform self-owned again (as on real parts).

Threads: one lock guards all state and keeps one command in flight; with a `PspTiming` the
lock is held for the command's modelled cost too. Introspection does not wait for it.
"""

from __future__ import annotations

import hmac
import operator
from dataclasses import replace

from .certs import (
    SEV_CERT_LEN,
    Algo,
    SevCert,
    Signature,
    Usage,
    sign_sev_cert,
)
from .chain import check_link
from .errors import SevFormatError
from .firmware_core import (
    ACTIVATABLE,
    CHAIN_LEN,
    GUEST_CPU_STATES,
    HDR_LEN,
    IN_LSECRET,
    IN_LUPDATE,
    MAX_GUEST_LEN,
    MNONCE_LEN,
    PDH_LEN,
    PSP_SLACK_S,
    VMSA_LEN,
    GuestAccessError,
    GuestContext,
    as_memory,
    vmsa_refusal,
)
from .firmware_keys import (
    regenerate_pdh,
    regenerate_pek,
    same_key,
)
from .firmware_migration import MigrationCommands
from .firmware_results import (
    CommandRecord,
    CsrResult,
    GuestStatusResult,
    HandleResult,
    MeasureResult,
    PdhExportResult,
    PlatformStatusResult,
    PspTiming,
    Result,
)
from .policy import GuestPolicy
from .status import (
    FLAG_ES_CONFIGURED,
    FLAG_OWNER_EXTERNAL,
    Command,
    GuestState,
    PlatformState,
    Status,
)
from .transport import (
    SESSION_LEN,
)

__all__ = [
    "SevFirmware",
    "PspTiming",
    "GuestAccessError",
    "CommandRecord",
    "HDR_LEN",
    "SESSION_LEN",
    "PDH_LEN",
    "CHAIN_LEN",
    "MAX_GUEST_LEN",
    "PSP_SLACK_S",
]


class SevFirmware(MigrationCommands):
    """One PSP. See the module docstring for the commands and the rules."""

    # ------------------------------------------------------------------ platform

    def init(self) -> Result:
        def body() -> Result:
            if self._state is not PlatformState.UNINIT:
                return Result(
                    Status.INVALID_PLATFORM_STATE,
                    f"INIT: the platform is already {self._state.name}",
                )
            self._state = PlatformState.INIT
            return Result(Status.SUCCESS)

        return self._run(Command.INIT, None, Result, body)

    def shutdown(self) -> Result:
        def body() -> Result:
            self._guests.clear()  # every guest context is lost; memory stays as the hypervisor has it
            self._state = PlatformState.UNINIT
            return Result(Status.SUCCESS)

        return self._run(Command.SHUTDOWN, None, Result, body)

    def platform_status(self) -> PlatformStatusResult:
        def body() -> PlatformStatusResult:
            flags = (FLAG_OWNER_EXTERNAL if self._external_owner else 0) | (
                FLAG_ES_CONFIGURED if self.es else 0
            )
            return PlatformStatusResult(
                Status.SUCCESS,
                self.api[0],
                self.api[1],
                self._state,
                flags,
                self.build,
                len(self._guests),
            )

        return self._run(Command.PLATFORM_STATUS, None, PlatformStatusResult, body)

    def pek_gen(self) -> Result:
        def body() -> Result:
            if self._state is not PlatformState.INIT:
                return Result(
                    Status.INVALID_PLATFORM_STATE,
                    f"PEK_GEN needs the platform INIT, it is {self._state.name}",
                )
            self._keys = regenerate_pek(self._keys, self.api)
            self._external_owner = False
            return Result(Status.SUCCESS)

        return self._run(Command.PEK_GEN, None, Result, body)

    def pdh_gen(self) -> Result:
        def body() -> Result:
            if self._state is PlatformState.UNINIT:
                return Result(
                    Status.INVALID_PLATFORM_STATE,
                    "PDH_GEN needs the platform INIT or WORKING, it is UNINIT",
                )
            self._keys = regenerate_pdh(self._keys, self.api)
            return Result(Status.SUCCESS)

        return self._run(Command.PDH_GEN, None, Result, body)

    def pdh_cert_export(
        self, pdh_len: int = PDH_LEN, chain_len: int = CHAIN_LEN
    ) -> PdhExportResult:
        def body() -> PdhExportResult:
            if self._state is PlatformState.UNINIT:
                return PdhExportResult(
                    Status.INVALID_PLATFORM_STATE,
                    detail="PDH_CERT_EXPORT needs the platform INIT or WORKING, it is UNINIT",
                )
            if operator.index(pdh_len) < PDH_LEN or operator.index(chain_len) < CHAIN_LEN:
                return PdhExportResult(
                    Status.INVALID_LENGTH,
                    pdh_len=PDH_LEN,
                    chain_len=CHAIN_LEN,
                    detail=f"PDH_CERT_EXPORT needs pdh_len >= {PDH_LEN} and chain_len >= {CHAIN_LEN}",
                )
            return PdhExportResult(
                Status.SUCCESS, self._keys.pdh.to_bytes(), self.cert_chain, PDH_LEN, CHAIN_LEN
            )

        return self._run(Command.PDH_CERT_EXPORT, None, PdhExportResult, body)

    def pek_csr(self, csr_len: int = SEV_CERT_LEN) -> CsrResult:
        def body() -> CsrResult:
            if self._state is not PlatformState.INIT:
                return CsrResult(
                    Status.INVALID_PLATFORM_STATE,
                    detail=f"PEK_CSR needs the platform INIT, it is {self._state.name}",
                )
            if operator.index(csr_len) < SEV_CERT_LEN:
                return CsrResult(
                    Status.INVALID_LENGTH,
                    csr_len=SEV_CERT_LEN,
                    detail=f"PEK_CSR needs csr_len >= {SEV_CERT_LEN}",
                )
            pek = self._keys.pek
            csr = SevCert.build(
                self._keys.pek_key.public_key(), Usage.PEK, pek.algo, pek.api_major, pek.api_minor
            )
            return CsrResult(Status.SUCCESS, csr.to_bytes(), SEV_CERT_LEN)

        return self._run(Command.PEK_CSR, None, CsrResult, body)

    def pek_cert_import(self, pek: bytes, oca: bytes) -> Result:
        """An owner's OCA and the PEK (our CSR) it signed; the firmware adds the CEK signature."""

        def body() -> Result:
            if self._state is not PlatformState.INIT:
                return Result(
                    Status.INVALID_PLATFORM_STATE,
                    f"PEK_CERT_IMPORT needs the platform INIT, it is {self._state.name}",
                )
            if self._external_owner:
                return Result(
                    Status.ALREADY_OWNED,
                    "PEK_CERT_IMPORT: the platform already has an external owner (PEK_GEN resets it)",
                )
            if len(pek) != SEV_CERT_LEN or len(oca) != SEV_CERT_LEN:
                return Result(
                    Status.INVALID_LENGTH,
                    f"PEK_CERT_IMPORT: PEK and OCA certificates are {SEV_CERT_LEN} bytes each",
                )
            try:
                pek_cert = SevCert.from_bytes(pek, "imported PEK")
                oca_cert = SevCert.from_bytes(oca, "imported OCA")
            except SevFormatError as exc:
                return Result(Status.INVALID_CERTIFICATE, str(exc))
            if oca_cert.usage != Usage.OCA or pek_cert.usage != Usage.PEK:
                return Result(
                    Status.INVALID_CERTIFICATE,
                    f"PEK_CERT_IMPORT: got usages {oca_cert.usage.name} and {pek_cert.usage.name}, need OCA and PEK",
                )
            for signer, subject, what in (
                (oca_cert, oca_cert, "OCA self-signature"),
                (oca_cert, pek_cert, "OCA -> PEK signature"),
            ):
                link = check_link(signer, subject)
                if not link.ok:
                    return Result(
                        Status.BAD_SIGNATURE,
                        f"PEK_CERT_IMPORT: the {what} does not verify ({link.detail})",
                    )
            if not same_key(pek_cert, self._keys.pek):
                return Result(
                    Status.INVALID_CERTIFICATE,
                    "PEK_CERT_IMPORT: the PEK is not this platform's (sign the CSR from PEK_CSR)",
                )
            found = pek_cert.signature_for(Usage.OCA)
            oca_slot = found[0] if found else 0
            unsigned = pek_cert.sigs[1 - oca_slot]
            if unsigned.used and unsigned.usage != Usage.CEK:
                return Result(
                    Status.INVALID_CERTIFICATE,
                    "PEK_CERT_IMPORT: the PEK's other signature slot must be free for the CEK",
                )
            cleared = list(pek_cert.sigs)
            cleared[1 - oca_slot] = Signature(Usage.INVALID, Algo.NONE, bytes(len(unsigned.raw)))
            pek_cert = replace(pek_cert, sigs=(cleared[0], cleared[1]))
            signed = sign_sev_cert(pek_cert, self._keys.cek_key, Usage.CEK, 1 - oca_slot)
            self._keys = replace(self._keys, oca_key=None, oca=oca_cert, pek=signed)
            self._external_owner = True
            return Result(Status.SUCCESS)

        return self._run(Command.PEK_CERT_IMPORT, None, Result, body)

    # ------------------------------------------------------------------ launch and guests

    def launch_start(self, policy: int, memory: object, handle: int = 0) -> HandleResult:
        def body() -> HandleResult:
            if self._state is PlatformState.UNINIT:
                return HandleResult(
                    Status.INVALID_PLATFORM_STATE,
                    detail="LAUNCH_START needs the platform INIT or WORKING, it is UNINIT",
                )
            pol = GuestPolicy.from_u32(operator.index(policy))
            why = self._policy_failure(pol)
            if why:
                return HandleResult(Status.POLICY_FAILURE, detail=f"LAUNCH_START: {why}")
            view = as_memory(memory)
            if view is None:
                return HandleResult(
                    Status.INVALID_PARAM,
                    detail="LAUNCH_START: guest memory must be a writable contiguous byte buffer",
                )
            vek: bytes | None = self._rng(16)
            if operator.index(handle):
                vek, status, why = self._shared_vek(handle, pol)
                if vek is None:
                    return HandleResult(status, detail=f"LAUNCH_START: {why}")
            guest = self._attach(pol, view, vek, GuestState.LUPDATE)
            guest.tek, guest.tik = self._rng(16), self._rng(16)  # the launch session's keys
            return HandleResult(Status.SUCCESS, guest.handle)

        return self._run(Command.LAUNCH_START, None, HandleResult, body)

    def launch_update_data(self, handle: int, gpa: int, length: int) -> Result:
        """Encrypt [gpa, gpa+length) in place with the VEK and add it to the launch digest."""

        def body() -> Result:
            guest, status, why = self._guest(handle, IN_LUPDATE)
            if guest is None:
                return Result(status, f"LAUNCH_UPDATE_DATA: {why}")
            start, n = operator.index(gpa), operator.index(length)
            if n <= 0 or n % 16:
                return Result(
                    Status.INVALID_LENGTH,
                    f"LAUNCH_UPDATE_DATA: length {n} must be a non-zero multiple of 16",
                )
            why = self._span(guest, start, n)
            if why:
                return Result(Status.INVALID_ADDRESS, f"LAUNCH_UPDATE_DATA: {why}")
            region = guest.memory[start : start + n]
            guest.launch_digest.update(region)
            guest.cipher.encrypt(start, region, out=region)  # in place, like the real command
            return Result(Status.SUCCESS)

        return self._run(Command.LAUNCH_UPDATE_DATA, handle, Result, body)

    def launch_update_vmsa(self, handle: int, gpa: int, length: int = VMSA_LEN) -> Result:
        """An SEV-ES guest's VMSA page: encrypted in place and measured, like launch data."""

        def body() -> Result:
            guest, status, why = self._guest(handle, IN_LUPDATE)
            if guest is None:
                return Result(status, f"LAUNCH_UPDATE_VMSA: {why}")
            start, n = operator.index(gpa), operator.index(length)
            refusal = vmsa_refusal(guest, start, n)
            if refusal:
                return Result(refusal[0], f"LAUNCH_UPDATE_VMSA: {refusal[1]}")
            why = self._span(guest, start, n)
            if why:
                return Result(Status.INVALID_ADDRESS, f"LAUNCH_UPDATE_VMSA: {why}")
            region = guest.memory[start : start + n]
            guest.launch_digest.update(region)
            guest.cipher.encrypt(start, region, out=region)
            return Result(Status.SUCCESS)

        return self._run(Command.LAUNCH_UPDATE_VMSA, handle, Result, body)

    def launch_measure(self, handle: int) -> MeasureResult:
        def body() -> MeasureResult:
            guest, status, why = self._guest(handle, IN_LUPDATE)
            if guest is None:
                return MeasureResult(status, detail=f"LAUNCH_MEASURE: {why}")
            mnonce = self._rng(MNONCE_LEN)
            msg = (
                bytes([0x04, self.api[0], self.api[1], self.build & 0xFF])
                + guest.policy.to_u32().to_bytes(4, "little")
                + guest.launch_digest.digest()
                + mnonce
            )
            guest.state = GuestState.LSECRET
            return MeasureResult(
                Status.SUCCESS, hmac.digest(guest.tik or b"", msg, "sha256") + mnonce
            )

        return self._run(Command.LAUNCH_MEASURE, handle, MeasureResult, body)

    def launch_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, IN_LSECRET)
            if guest is None:
                return Result(status, f"LAUNCH_FINISH: {why}")
            guest.state = GuestState.RUNNING
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)

        return self._run(Command.LAUNCH_FINISH, handle, Result, body)

    def activate(self, handle: int, asid: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, ACTIVATABLE)
            if guest is None:
                return Result(status, f"ACTIVATE: {why}")
            a = operator.index(asid)
            if not 1 <= a <= self.max_asid:
                return Result(
                    Status.INVALID_ASID, f"ACTIVATE: ASID {a} is outside 1..{self.max_asid}"
                )
            owner = next(
                (g.handle for g in self._guests.values() if g.asid == a and g is not guest), None
            )
            if owner is not None:
                return Result(Status.ASID_OWNED, f"ACTIVATE: ASID {a} is in use by guest {owner}")
            guest.asid = a
            return Result(Status.SUCCESS)

        return self._run(Command.ACTIVATE, handle, Result, body)

    def deactivate(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, None)
            if guest is None:
                return Result(status, f"DEACTIVATE: {why}")
            guest.asid = 0
            return Result(Status.SUCCESS)

        return self._run(Command.DEACTIVATE, handle, Result, body)

    def guest_status(self, handle: int) -> GuestStatusResult:
        def body() -> GuestStatusResult:
            guest, status, why = self._guest(handle, None)
            if guest is None:
                return GuestStatusResult(status, detail=f"GUEST_STATUS: {why}")
            return GuestStatusResult(Status.SUCCESS, guest.policy.to_u32(), guest.asid, guest.state)

        return self._run(Command.GUEST_STATUS, handle, GuestStatusResult, body)

    def decommission(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, None)
            if guest is None:
                return Result(status, f"DECOMMISSION: {why}")
            del self._guests[guest.handle]
            if not self._guests:
                self._state = PlatformState.INIT
            return Result(Status.SUCCESS)

        return self._run(Command.DECOMMISSION, handle, Result, body)

    # ------------------------------------------------------------------ the guest CPU's view

    def _cpu_guest(self, handle: int, gpa: int, length: int) -> GuestContext:
        try:
            guest = self._guests.get(operator.index(handle))
            gpa, length = operator.index(gpa), operator.index(length)
        except TypeError:
            raise GuestAccessError(
                f"guest {handle!r}: handle, address and length must be integers"
            ) from None
        if guest is None:
            raise GuestAccessError(f"guest {handle} does not exist on this platform")
        if guest.state not in GUEST_CPU_STATES:
            raise GuestAccessError(f"guest {handle} is {guest.state.name}: its CPU cannot run here")
        why = (
            self._span(guest, gpa, length)
            if length % 16 == 0
            else f"length {length} is not a multiple of 16"
        )
        if why:
            raise GuestAccessError(f"guest {handle}: {why}")
        return guest

    def guest_write(self, handle: int, gpa: int, plaintext: bytes) -> None:
        """The guest writes its private memory: stored encrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, len(plaintext))
        guest.memory[gpa : gpa + len(plaintext)] = guest.cipher.encrypt(gpa, bytes(plaintext))

    def guest_read(self, handle: int, gpa: int, length: int) -> bytes:
        """The guest reads its private memory: decrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, length)
        return guest.cipher.decrypt(gpa, guest.memory[gpa : gpa + length].tobytes())
