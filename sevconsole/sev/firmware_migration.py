"""The migration commands of the firmware model: SEND_* on the source, RECEIVE_* on the target.

Batch entry points (`send_pages`, `receive_pages`) follow the same rules as the one-packet
commands with one status for the whole run: the run is decrypted at rest in one call and sealed
with `seal_pages`; on receipt every MAC is checked (`open_pages`) before any page is decrypted or
written to guest memory.
"""

from __future__ import annotations

import operator

import numpy as np

from .firmware_checks import check_target, parse_pdh
from .firmware_core import (
    HDR_LEN,
    IN_RUNNING,
    IN_RUPDATE,
    IN_SUPDATE,
    MAX_GUEST_LEN,
    PAGE,
    PDH_LEN,
    VMSA_LEN,
    FirmwareCore,
    as_memory,
    flags_refusal,
    length_ok,
    pages_of,
    vmsa_refusal,
)
from .firmware_results import (
    ReceiveStartResult,
    ReceiveUpdateResult,
    Result,
    SendPagesResult,
    SendStartResult,
    SendUpdateResult,
)
from .policy import GuestPolicy, PolicyFlag
from .status import (
    Command,
    GuestState,
    PlatformState,
    Status,
)
from .transport import (
    SESSION_LEN,
    IntegrityError,
    Session,
    build_session,
    ecdh_z,
    open_packet,
    open_pages,
    open_session,
    seal_packet,
    seal_pages,
)


class MigrationCommands(FirmwareCore):
    """SEND_START .. SEND_CANCEL and RECEIVE_START .. RECEIVE_FINISH."""

    # ------------------------------------------------------------------ send

    def send_start(
        self,
        handle: int,
        pdh: bytes,
        plat_chain: bytes,
        amd_chain: bytes,
        session_len: int = SESSION_LEN,
    ) -> SendStartResult:
        def body() -> SendStartResult:
            guest, status, why = self._guest(handle, IN_RUNNING)
            if guest is None:
                return SendStartResult(status, detail=f"SEND_START: {why}")
            if operator.index(session_len) != SESSION_LEN:
                return SendStartResult(
                    Status.INVALID_LENGTH,
                    session_len=SESSION_LEN,
                    detail=f"SEND_START: session_len must be {SESSION_LEN}",
                )
            if guest.policy.flags & PolicyFlag.NOSEND:
                return SendStartResult(
                    Status.POLICY_FAILURE,
                    detail="SEND_START: the guest policy sets NOSEND: this guest may never leave its platform",
                )
            if len(pdh) != PDH_LEN:
                return SendStartResult(
                    Status.INVALID_LENGTH,
                    detail=f"SEND_START: the target PDH is {len(pdh)} bytes, a PDH certificate is {PDH_LEN}",
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
                return SendStartResult(outcome.status, detail=f"SEND_START: {outcome.detail}")
            z = ecdh_z(self._keys.pdh_key, outcome.pdh.public_key())
            tek, tik = self._rng(16), self._rng(16)
            session = build_session(
                z, tek, tik, guest.policy.to_u32(), self._rng(16), self._rng(16)
            )
            guest.tek, guest.tik = tek, tik
            guest.state = GuestState.SUPDATE
            return SendStartResult(
                Status.SUCCESS, session.to_bytes(), guest.policy.to_u32(), SESSION_LEN
            )

        return self._run(Command.SEND_START, handle, SendStartResult, body)

    def send_update_data(
        self,
        handle: int,
        gpa: int,
        length: int,
        hdr_len: int = HDR_LEN,
        trans_len: int | None = None,
    ) -> SendUpdateResult:
        return self._send_one(Command.SEND_UPDATE_DATA, handle, gpa, length, hdr_len, trans_len)

    def send_update_vmsa(
        self,
        handle: int,
        gpa: int,
        length: int = VMSA_LEN,
        hdr_len: int = HDR_LEN,
        trans_len: int | None = None,
    ) -> SendUpdateResult:
        """An SEV-ES guest's VMSA page (one per vCPU), sealed like a data packet."""
        return self._send_one(Command.SEND_UPDATE_VMSA, handle, gpa, length, hdr_len, trans_len)

    def _send_one(
        self,
        command: Command,
        handle: int,
        gpa: int,
        length: int,
        hdr_len: int,
        trans_len: int | None,
    ) -> SendUpdateResult:
        name = command.name

        def body() -> SendUpdateResult:
            guest, status, why = self._guest(handle, IN_SUPDATE)
            if guest is None:
                return SendUpdateResult(status, detail=f"{name}: {why}")
            start, n = operator.index(gpa), operator.index(length)
            want = n if trans_len is None else operator.index(trans_len)
            if command is Command.SEND_UPDATE_VMSA:
                refusal = vmsa_refusal(guest, start, n)
                if refusal:
                    return SendUpdateResult(refusal[0], detail=f"{name}: {refusal[1]}")
            if operator.index(hdr_len) < HDR_LEN:
                return SendUpdateResult(
                    Status.INVALID_LENGTH,
                    hdr_len=HDR_LEN,
                    trans_len=want,
                    detail=f"{name}: hdr_len must be at least {HDR_LEN}",
                )
            if not length_ok(n):
                return SendUpdateResult(
                    Status.INVALID_LENGTH,
                    hdr_len=hdr_len,
                    trans_len=want,
                    detail=f"{name}: guest_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
                )
            if want < n:
                return SendUpdateResult(
                    Status.INVALID_LENGTH,
                    hdr_len=hdr_len,
                    trans_len=n,
                    detail=f"{name}: trans_len {want} is smaller than guest_len {n}",
                )
            why = self._span(guest, start, n)
            if why:
                return SendUpdateResult(Status.INVALID_ADDRESS, detail=f"{name}: {why}")
            plain = guest.cipher.decrypt(start, guest.memory[start : start + n].tobytes())
            header, trans = seal_packet(guest.tek, guest.tik, plain, self._rng(16))
            self._charge(1, pages_of(n))
            return SendUpdateResult(Status.SUCCESS, header, trans, HDR_LEN, n)

        return self._run(command, handle, SendUpdateResult, body)

    def send_pages(
        self, handle: int, gpa: int, npages: int, packet_size: int = PAGE
    ) -> SendPagesResult:
        """Batch SEND_UPDATE_DATA: `npages` packets of `packet_size` from gpa, one status for all."""

        def body() -> SendPagesResult:
            guest, status, why = self._guest(handle, IN_SUPDATE)
            if guest is None:
                return SendPagesResult(status, detail=f"SEND_UPDATE_DATA: {why}")
            start, count, size = (
                operator.index(gpa),
                operator.index(npages),
                operator.index(packet_size),
            )
            if count <= 0 or not length_ok(size):
                return SendPagesResult(
                    Status.INVALID_LENGTH,
                    detail=f"SEND_UPDATE_DATA: {count} packets of {size} bytes: need at least one packet "
                    f"of a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
                )
            why = self._span(guest, start, count * size)
            if why:
                return SendPagesResult(Status.INVALID_ADDRESS, detail=f"SEND_UPDATE_DATA: {why}")
            run = count * size
            # Decrypt the run at rest into reused scratch, seal it into one fresh buffer: large
            # fresh allocations cost page faults that outweigh the crypto.
            plain = guest.cipher.decrypt(
                start, guest.memory[start : start + run], out=self._scratch(run)
            )
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

        return self._run(Command.SEND_UPDATE_DATA, handle, SendPagesResult, body)

    def send_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, IN_SUPDATE)
            if guest is None:
                return Result(status, f"SEND_FINISH: {why}")
            guest.state = GuestState.SENT  # from now on only DECOMMISSION: no second runnable copy
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)

        return self._run(Command.SEND_FINISH, handle, Result, body)

    def send_cancel(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, IN_SUPDATE)
            if guest is None:
                return Result(status, f"SEND_CANCEL: {why}")
            guest.state = GuestState.RUNNING  # a cancelled migration can be retried
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)

        return self._run(Command.SEND_CANCEL, handle, Result, body)

    # ------------------------------------------------------------------ receive

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

        def body() -> ReceiveStartResult:
            if self._state is PlatformState.UNINIT:
                return ReceiveStartResult(
                    Status.INVALID_PLATFORM_STATE,
                    detail="RECEIVE_START needs the platform INIT or WORKING, it is UNINIT",
                )
            if operator.index(session_len) != SESSION_LEN or operator.index(pdh_len) != PDH_LEN:
                return ReceiveStartResult(
                    Status.INVALID_LENGTH,
                    session_len=SESSION_LEN,
                    pdh_len=PDH_LEN,
                    detail=f"RECEIVE_START: session_len must be {SESSION_LEN} and pdh_len {PDH_LEN}",
                )
            if len(session) != session_len or len(pdh) != pdh_len:
                return ReceiveStartResult(
                    Status.INVALID_LENGTH,
                    session_len=SESSION_LEN,
                    pdh_len=PDH_LEN,
                    detail=f"RECEIVE_START: the session is {len(session)} bytes and the PDH {len(pdh)}, "
                    f"expected {SESSION_LEN} and {PDH_LEN}",
                )
            view = as_memory(memory)
            if view is None:
                return ReceiveStartResult(
                    Status.INVALID_PARAM,
                    detail="RECEIVE_START: guest memory must be a writable contiguous byte buffer",
                )
            source_pdh, why = parse_pdh(bytes(pdh), "source PDH")
            if source_pdh is None:
                return ReceiveStartResult(
                    Status.INVALID_CERTIFICATE, detail=f"RECEIVE_START: {why}"
                )
            value = operator.index(policy)
            pol = GuestPolicy.from_u32(value)
            z = ecdh_z(self._keys.pdh_key, source_pdh.public_key())
            try:
                tek, tik = open_session(z, Session.from_bytes(bytes(session)), value)
            except IntegrityError as exc:
                return ReceiveStartResult(
                    Status.BAD_MEASUREMENT, detail=f"RECEIVE_START: {exc.sentence}"
                )
            why = self._policy_failure(pol)
            if why:
                return ReceiveStartResult(Status.POLICY_FAILURE, detail=f"RECEIVE_START: {why}")
            vek: bytes | None = self._rng(16)
            if operator.index(handle):
                vek, status, why = self._shared_vek(handle, pol)
                if vek is None:
                    return ReceiveStartResult(status, detail=f"RECEIVE_START: {why}")
            guest = self._attach(pol, view, vek, GuestState.RUPDATE)
            guest.tek, guest.tik = tek, tik
            return ReceiveStartResult(Status.SUCCESS, guest.handle, SESSION_LEN, PDH_LEN)

        return self._run(Command.RECEIVE_START, None, ReceiveStartResult, body)

    def receive_update_data(
        self, handle: int, gpa: int, header: bytes, trans: bytes, hdr_len: int = HDR_LEN
    ) -> ReceiveUpdateResult:
        """Check the packet's MAC, then decrypt it and store it encrypted at rest at gpa."""
        return self._receive_one(Command.RECEIVE_UPDATE_DATA, handle, gpa, header, trans, hdr_len)

    def receive_update_vmsa(
        self, handle: int, gpa: int, header: bytes, trans: bytes, hdr_len: int = HDR_LEN
    ) -> ReceiveUpdateResult:
        """An SEV-ES guest's VMSA page, checked and stored like a data packet."""
        return self._receive_one(Command.RECEIVE_UPDATE_VMSA, handle, gpa, header, trans, hdr_len)

    def _receive_one(
        self, command: Command, handle: int, gpa: int, header: bytes, trans: bytes, hdr_len: int
    ) -> ReceiveUpdateResult:
        name = command.name

        def body() -> ReceiveUpdateResult:
            guest, status, why = self._guest(handle, IN_RUPDATE)
            if guest is None:
                return ReceiveUpdateResult(status, detail=f"{name}: {why}")
            start, n = operator.index(gpa), len(trans)
            if command is Command.RECEIVE_UPDATE_VMSA:
                refusal = vmsa_refusal(guest, start, n)
                if refusal:
                    return ReceiveUpdateResult(refusal[0], HDR_LEN, f"{name}: {refusal[1]}")
            if operator.index(hdr_len) < HDR_LEN or len(header) < HDR_LEN:
                return ReceiveUpdateResult(
                    Status.INVALID_LENGTH, HDR_LEN, f"{name}: hdr_len must be at least {HDR_LEN}"
                )
            if not length_ok(n):
                return ReceiveUpdateResult(
                    Status.INVALID_LENGTH,
                    hdr_len,
                    f"{name}: trans_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}",
                )
            why = self._span(guest, start, n)
            if why:
                return ReceiveUpdateResult(Status.INVALID_ADDRESS, hdr_len, f"{name}: {why}")
            flags = int.from_bytes(bytes(header[:4]), "little")
            if flags:
                return ReceiveUpdateResult(*flags_refusal(flags, 0, hdr_len))
            try:
                plain = open_packet(guest.tek, guest.tik, bytes(header[:HDR_LEN]), bytes(trans))
            except IntegrityError as exc:
                return ReceiveUpdateResult(
                    Status.BAD_MEASUREMENT,
                    hdr_len,
                    f"{name} at {start:#x}: {exc.sentence}; guest memory is unchanged",
                )
            guest.cipher.encrypt(start, plain, out=guest.memory[start : start + n])
            self._charge(1, pages_of(n))
            return ReceiveUpdateResult(Status.SUCCESS, hdr_len)

        return self._run(command, handle, ReceiveUpdateResult, body)

    def receive_pages(
        self, handle: int, gpa: int, headers: bytes, trans: bytes, packet_size: int = PAGE
    ) -> ReceiveUpdateResult:
        """Batch RECEIVE_UPDATE_DATA: every MAC is checked before any page is decrypted or stored."""
        count = (
            len(headers) // HDR_LEN if isinstance(headers, bytes | bytearray | memoryview) else 0
        )

        def body() -> ReceiveUpdateResult:
            guest, status, why = self._guest(handle, IN_RUPDATE)
            if guest is None:
                return ReceiveUpdateResult(status, detail=f"RECEIVE_UPDATE_DATA: {why}")
            size = operator.index(packet_size)
            if (
                not length_ok(size)
                or count == 0
                or len(headers) != count * HDR_LEN
                or len(trans) != count * size
            ):
                return ReceiveUpdateResult(
                    Status.INVALID_LENGTH,
                    HDR_LEN,
                    f"RECEIVE_UPDATE_DATA: {len(headers)} header bytes and {len(trans)} data bytes are not "
                    f"a whole number of {HDR_LEN}-byte headers and {size}-byte packets",
                )
            start = operator.index(gpa)
            why = self._span(guest, start, len(trans))
            if why:
                return ReceiveUpdateResult(
                    Status.INVALID_ADDRESS, HDR_LEN, f"RECEIVE_UPDATE_DATA: {why}"
                )
            flags = np.frombuffer(bytes(headers), dtype="<u4").reshape(count, HDR_LEN // 4)[:, 0]
            if flags.any():
                bad = int(np.argmax(flags != 0))
                return ReceiveUpdateResult(*flags_refusal(int(flags[bad]), bad, HDR_LEN))
            try:
                if count == 1:
                    plain = open_packet(guest.tek, guest.tik, bytes(headers), bytes(trans))
                else:
                    plain = open_pages(
                        guest.tek,
                        guest.tik,
                        bytes(headers),
                        trans,
                        size,
                        out=self._scratch(len(trans)),
                    )
            except IntegrityError as exc:
                return ReceiveUpdateResult(
                    Status.BAD_MEASUREMENT,
                    HDR_LEN,
                    f"RECEIVE_UPDATE_DATA at {start:#x}: {exc.sentence}; guest memory is unchanged",
                )
            # Only now, every MAC good, does guest memory change: encrypted at rest in place.
            guest.cipher.encrypt(start, plain, out=guest.memory[start : start + len(trans)])
            self._charge(count, pages_of(size, count))
            return ReceiveUpdateResult(Status.SUCCESS, HDR_LEN)

        return self._run(Command.RECEIVE_UPDATE_DATA, handle, ReceiveUpdateResult, body)

    def receive_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, IN_RUPDATE)
            if guest is None:
                return Result(status, f"RECEIVE_FINISH: {why}")
            guest.state = GuestState.RUNNING
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)

        return self._run(Command.RECEIVE_FINISH, handle, Result, body)
