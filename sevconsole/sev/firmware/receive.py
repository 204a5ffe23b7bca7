"""The RECEIVE commands, on the target: RECEIVE_START, RECEIVE_UPDATE_DATA/VMSA, the batch, FINISH.

RECEIVE_START checks, in order: the platform, lengths, the memory buffer, the source PDH
(INVALID_CERTIFICATE), wrap_mac then policy_mac (BAD_MEASUREMENT), then the policy rules and
key sharing. Every packet's flags and MAC are checked before anything is decrypted: a bad
one is BAD_MEASUREMENT and guest memory is left as it was. `receive_pages` checks every MAC
of the run (`open_pages`) before any page is written.
"""

from __future__ import annotations

import operator

import numpy as np

from ..memory import Buffer
from ..policy import GuestPolicy
from ..status import Command, GuestState, Status
from ..transport import (
    SESSION_LEN,
    IntegrityError,
    Session,
    ecdh_z,
    open_packet,
    open_pages,
    open_session,
)
from .checks import parse_pdh, pdh_public_key
from .command import guest_command, platform_command
from .guest import (
    HDR_LEN,
    IN_RUPDATE,
    MAX_GUEST_LEN,
    PAGE,
    PDH_LEN,
    GuestContext,
    as_memory,
    check_header_flags,
    check_span,
    check_vmsa,
    packet_len_ok,
    pages_of,
)
from .platform import INIT_OR_WORKING
from .results import ReceiveStartResult, ReceiveUpdateResult, Refusal, Result
from .state import FirmwareState


class ReceiveCommands(FirmwareState):
    @platform_command(Command.RECEIVE_START, ReceiveStartResult, INIT_OR_WORKING)
    def receive_start(
        self,
        policy: int,
        pdh: bytes,
        session: bytes,
        memory: object,
        handle: int = 0,
        session_len: int = SESSION_LEN,
        pdh_len: int = PDH_LEN,
    ) -> ReceiveStartResult:
        """`pdh` is the SOURCE's PDH certificate, as the migration stream carries it."""
        if operator.index(session_len) != SESSION_LEN or operator.index(pdh_len) != PDH_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"session_len must be {SESSION_LEN} and pdh_len {PDH_LEN}",
                session_len=SESSION_LEN,
                pdh_len=PDH_LEN,
            )
        if len(session) != SESSION_LEN or len(pdh) != PDH_LEN:
            raise Refusal(
                Status.INVALID_LENGTH,
                f"the session is {len(session)} bytes and the PDH {len(pdh)}, "
                f"expected {SESSION_LEN} and {PDH_LEN}",
                session_len=SESSION_LEN,
                pdh_len=PDH_LEN,
            )
        view = as_memory(memory)
        if view is None:
            raise Refusal(
                Status.INVALID_PARAM, "guest memory must be a writable contiguous byte buffer"
            )
        source_pdh, why = parse_pdh(bytes(pdh), "source PDH")
        if source_pdh is None:
            raise Refusal(Status.INVALID_CERTIFICATE, why)
        value = operator.index(policy)
        pol = GuestPolicy.from_u32(value)
        z = ecdh_z(self._keys.pdh_key, pdh_public_key(source_pdh))
        try:
            tek, tik = open_session(z, Session.from_bytes(bytes(session)), value)
        except IntegrityError as exc:
            raise Refusal(Status.BAD_MEASUREMENT, exc.sentence) from None
        self._check_policy(pol)
        vek = self._new_vek(operator.index(handle), pol)
        guest = self._attach(pol, view, vek, GuestState.RUPDATE)
        guest.tek, guest.tik = tek, tik
        return ReceiveStartResult(Status.SUCCESS, guest.handle, SESSION_LEN, PDH_LEN)

    @guest_command(Command.RECEIVE_UPDATE_DATA, ReceiveUpdateResult, IN_RUPDATE)
    def receive_update_data(
        self, guest: GuestContext, gpa: int, header: bytes, trans: bytes, hdr_len: int = HDR_LEN
    ) -> ReceiveUpdateResult:
        """Check the packet's MAC, then decrypt it and store it encrypted at rest at gpa."""
        return self._receive_packet(guest, gpa, header, trans, hdr_len, vmsa=False)

    @guest_command(Command.RECEIVE_UPDATE_VMSA, ReceiveUpdateResult, IN_RUPDATE)
    def receive_update_vmsa(
        self, guest: GuestContext, gpa: int, header: bytes, trans: bytes, hdr_len: int = HDR_LEN
    ) -> ReceiveUpdateResult:
        """An SEV-ES guest's VMSA page, checked and stored like a data packet."""
        return self._receive_packet(guest, gpa, header, trans, hdr_len, vmsa=True)

    def _receive_packet(
        self,
        guest: GuestContext,
        gpa: int,
        header: bytes,
        trans: bytes,
        hdr_len: int,
        *,
        vmsa: bool,
    ) -> ReceiveUpdateResult:
        """RECEIVE_UPDATE_DATA/VMSA after the guest checks: lengths, address, flags, MAC, store."""
        start, n = operator.index(gpa), len(trans)
        if vmsa:
            check_vmsa(guest, start, n)
        if operator.index(hdr_len) < HDR_LEN or len(header) < HDR_LEN:
            raise Refusal(
                Status.INVALID_LENGTH, f"hdr_len must be at least {HDR_LEN}", hdr_len=HDR_LEN
            )
        if not packet_len_ok(n):
            raise Refusal(
                Status.INVALID_LENGTH,
                f"trans_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
                hdr_len=hdr_len,
            )
        region = check_span(guest, start, n)
        check_header_flags(int.from_bytes(bytes(header[:4]), "little"), 0)
        try:
            plain = open_packet(guest.tek, guest.tik, bytes(header[:HDR_LEN]), bytes(trans))
        except IntegrityError as exc:
            raise Refusal(
                Status.BAD_MEASUREMENT,
                f"packet at {start:#x}: {exc.sentence}; guest memory is unchanged",
            ) from None
        guest.cipher.encrypt(start, plain, out=region)
        self._charge(1, pages_of(n))
        return ReceiveUpdateResult(Status.SUCCESS, hdr_len)

    @guest_command(Command.RECEIVE_UPDATE_DATA, ReceiveUpdateResult, IN_RUPDATE)
    def receive_pages(
        self, guest: GuestContext, gpa: int, headers: bytes, trans: bytes, packet_size: int = PAGE
    ) -> ReceiveUpdateResult:
        """Batch RECEIVE_UPDATE_DATA: every MAC is checked before any page is decrypted or stored."""
        size = operator.index(packet_size)
        count = len(headers) // HDR_LEN
        if (
            not packet_len_ok(size)
            or count == 0
            or len(headers) != count * HDR_LEN
            or len(trans) != count * size
        ):
            raise Refusal(
                Status.INVALID_LENGTH,
                f"{len(headers)} header bytes and {len(trans)} data bytes are not a whole "
                f"number of {HDR_LEN}-byte headers and {size}-byte packets",
                hdr_len=HDR_LEN,
            )
        start = operator.index(gpa)
        region = check_span(guest, start, len(trans))
        flags = np.frombuffer(bytes(headers), dtype="<u4").reshape(count, HDR_LEN // 4)[:, 0]
        if flags.any():
            bad = int(np.argmax(flags != 0))
            check_header_flags(int(flags[bad]), bad)
        plain: Buffer
        try:
            if count == 1:
                plain = open_packet(guest.tek, guest.tik, bytes(headers), bytes(trans))
            else:
                plain = open_pages(
                    guest.tek, guest.tik, bytes(headers), trans, size, out=self._scratch(len(trans))
                )
        except IntegrityError as exc:
            raise Refusal(
                Status.BAD_MEASUREMENT,
                f"run at {start:#x}: {exc.sentence}; guest memory is unchanged",
            ) from None
        # Only now, every MAC good, does guest memory change: encrypted at rest in place.
        guest.cipher.encrypt(start, plain, out=region)
        self._charge(count, pages_of(size, count))
        return ReceiveUpdateResult(Status.SUCCESS, HDR_LEN)

    @guest_command(Command.RECEIVE_FINISH, Result, IN_RUPDATE)
    def receive_finish(self, guest: GuestContext) -> Result:
        guest.end_session(GuestState.RUNNING)
        return Result(Status.SUCCESS)
