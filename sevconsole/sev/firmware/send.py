"""The SEND commands, on the source: SEND_START, SEND_UPDATE_DATA/VMSA, the batch, FINISH, CANCEL.

SEND_START checks, in order: the guest RUNNING, session_len, NOSEND, the PDH's length, then
the target (checks.py). `send_pages` is SEND_UPDATE_DATA for a run of packets with one status:
the run is decrypted at rest in one call and sealed with `seal_pages`.
"""

from __future__ import annotations

import operator

from ..policy import PolicyFlag
from ..status import Command, GuestState, Status
from ..transport import SESSION_LEN, build_session, ecdh_z, seal_packet, seal_pages
from .checks import check_target, pdh_public_key
from .command import guest_command
from .guest import (
    HDR_LEN,
    IN_RUNNING,
    IN_SUPDATE,
    MAX_GUEST_LEN,
    PAGE,
    PDH_LEN,
    VMSA_LEN,
    GuestContext,
    check_span,
    check_vmsa,
    packet_len_ok,
    pages_of,
)
from .results import Refusal, Result, SendPagesResult, SendStartResult, SendUpdateResult
from .state import FirmwareState


class SendCommands(FirmwareState):
    @guest_command(Command.SEND_START, SendStartResult, IN_RUNNING)
    def send_start(
        self,
        guest: GuestContext,
        pdh: bytes,
        plat_chain: bytes,
        amd_chain: bytes,
        session_len: int = SESSION_LEN,
    ) -> SendStartResult:
        if operator.index(session_len) != SESSION_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"session_len must be {SESSION_LEN}",
                session_len=SESSION_LEN,
            )
        if guest.policy.flags & PolicyFlag.NOSEND:
            raise Refusal(
                Status.POLICY_FAILURE,
                "the guest policy sets NOSEND: this guest may never leave its platform",
            )
        if len(pdh) != PDH_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"the target PDH is {len(pdh)} bytes, a PDH certificate is {PDH_LEN}",
            )
        outcome = check_target(
            guest.policy,
            bytes(pdh),
            bytes(plat_chain),
            bytes(amd_chain),
            own_oca=self._keys.oca,
            own_ark=self.ark,
        )
        if outcome.pdh is None:
            raise Refusal(outcome.status, outcome.detail)
        z = ecdh_z(self._keys.pdh_key, pdh_public_key(outcome.pdh))
        tek, tik = self._rng(16), self._rng(16)
        policy = guest.policy.to_u32()
        session = build_session(z, tek, tik, policy, self._rng(16), self._rng(16))
        guest.tek, guest.tik = tek, tik
        guest.state = GuestState.SUPDATE
        return SendStartResult(Status.SUCCESS, session.to_bytes(), policy, SESSION_LEN)

    @guest_command(Command.SEND_UPDATE_DATA, SendUpdateResult, IN_SUPDATE)
    def send_update_data(
        self,
        guest: GuestContext,
        gpa: int,
        length: int,
        hdr_len: int = HDR_LEN,
        trans_len: int | None = None,
    ) -> SendUpdateResult:
        return self._send_packet(guest, gpa, length, hdr_len, trans_len, vmsa=False)

    @guest_command(Command.SEND_UPDATE_VMSA, SendUpdateResult, IN_SUPDATE)
    def send_update_vmsa(
        self,
        guest: GuestContext,
        gpa: int,
        length: int = VMSA_LEN,
        hdr_len: int = HDR_LEN,
        trans_len: int | None = None,
    ) -> SendUpdateResult:
        """An SEV-ES guest's VMSA page (one per vCPU), sealed like a data packet."""
        return self._send_packet(guest, gpa, length, hdr_len, trans_len, vmsa=True)

    def _send_packet(
        self,
        guest: GuestContext,
        gpa: int,
        length: int,
        hdr_len: int,
        trans_len: int | None,
        *,
        vmsa: bool,
    ) -> SendUpdateResult:
        """SEND_UPDATE_DATA/VMSA after the guest checks: lengths (written back), address, seal."""
        start, n = operator.index(gpa), operator.index(length)
        want = n if trans_len is None else operator.index(trans_len)
        if vmsa:
            check_vmsa(guest, start, n)
        if operator.index(hdr_len) < HDR_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"hdr_len must be at least {HDR_LEN}",
                hdr_len=HDR_LEN,
                trans_len=want,
            )
        if not packet_len_ok(n):
            raise Refusal(
                Status.INVALID_LENGTH,
                f"guest_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
                hdr_len=hdr_len,
                trans_len=want,
            )
        if want < n:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"trans_len {want} is smaller than guest_len {n}",
                hdr_len=hdr_len,
                trans_len=n,
            )
        region = check_span(guest, start, n)
        plain = guest.cipher.decrypt(start, region.tobytes())
        header, trans = seal_packet(guest.tek, guest.tik, plain, self._rng(16))
        self._charge(1, pages_of(n))
        return SendUpdateResult(Status.SUCCESS, header, trans, HDR_LEN, n)

    @guest_command(Command.SEND_UPDATE_DATA, SendPagesResult, IN_SUPDATE)
    def send_pages(
        self, guest: GuestContext, gpa: int, npages: int, packet_size: int = PAGE
    ) -> SendPagesResult:
        """Batch SEND_UPDATE_DATA: `npages` packets of `packet_size` from gpa, one status for all."""
        start, count, size = (
            operator.index(gpa),
            operator.index(npages),
            operator.index(packet_size),
        )
        if count <= 0 or not packet_len_ok(size):
            raise Refusal(
                Status.INVALID_LENGTH,
                f"{count} packets of {size} bytes: need at least one packet "
                f"of a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
            )
        run = count * size
        region = check_span(guest, start, run)
        # Decrypt the run at rest into reused scratch, seal it into one fresh buffer: large
        # fresh allocations cost page faults that outweigh the crypto.
        plain = guest.cipher.decrypt(start, region, out=self._scratch(run))
        if count == 1:  # one packet: the plain call is cheaper than setting up a batch
            header, sealed = seal_packet(guest.tek, guest.tik, bytes(plain), self._rng(16))
            self._charge(1, pages_of(size))
            return SendPagesResult(Status.SUCCESS, header, sealed)
        trans = bytearray(run)
        headers, _ = seal_pages(
            guest.tek, guest.tik, plain, size, ivs=self._rng(16 * count), out=trans
        )
        self._charge(count, pages_of(size, count))
        return SendPagesResult(Status.SUCCESS, b"".join(headers), trans)

    @guest_command(Command.SEND_FINISH, Result, IN_SUPDATE)
    def send_finish(self, guest: GuestContext) -> Result:
        guest.end_session(GuestState.SENT)  # from now on only DECOMMISSION: no second runnable copy
        return Result(Status.SUCCESS)

    @guest_command(Command.SEND_CANCEL, Result, IN_SUPDATE)
    def send_cancel(self, guest: GuestContext) -> Result:
        guest.end_session(GuestState.RUNNING)  # a cancelled migration can be retried
        return Result(Status.SUCCESS)
