"""A software model of the SEV firmware (the PSP): platform, guests, LAUNCH and SEND/RECEIVE.

`SevFirmware` answers every command with a frozen result whose first field is a `Status`,
following the rules of sev-reference.md: state machines, lengths (with the needed length
written back), policy (NOSEND, DOMAIN, SEV, API version, reserved bits), integrity (every MAC
checked before anything is decrypted; failures are BAD_MEASUREMENT and leave guest memory as
it was). It mints its own CEK/OCA/PEK/PDH in the real formats, signed by the ASK it is given.

Methods (results in firmware_results.py):
  platform: init, shutdown, platform_status, pek_gen, pdh_gen, pdh_cert_export, pek_csr,
            pek_cert_import; properties amd_chain, platform_state, api
  guests:   launch_start, launch_update_data, launch_measure, launch_finish, activate,
            deactivate, guest_status, decommission
  send:     send_start, send_update_data, send_pages (batch), send_finish, send_cancel
  receive:  receive_start, receive_update_data, receive_pages (batch), receive_finish
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

import hashlib
import hmac
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .certs import (
    SEV_CERT_LEN,
    Algo,
    AmdCert,
    SevCert,
    Signature,
    Usage,
    join_amd_chain,
    join_platform_chain,
    sign_sev_cert,
)
from .chain import check_link
from .errors import SevFormatError
from .firmware_checks import check_target, parse_pdh
from .firmware_keys import (
    PlatformKeys,
    generate_platform_keys,
    regenerate_pdh,
    regenerate_pek,
    same_key,
)
from .firmware_results import (
    CommandRecord,
    CsrResult,
    GuestStatusResult,
    HandleResult,
    MeasureResult,
    PdhExportResult,
    PlatformStatusResult,
    PspTiming,
    ReceiveStartResult,
    ReceiveUpdateResult,
    Result,
    SendPagesResult,
    SendStartResult,
    SendUpdateResult,
)
from .memory import GuestMemoryCipher
from .policy import GuestPolicy, PolicyFlag
from .status import (
    FLAG_ES_CONFIGURED,
    FLAG_OWNER_EXTERNAL,
    Command,
    GuestState,
    PlatformState,
    Status,
)
from .transport import (
    HEADER_LEN,
    SESSION_LEN,
    IntegrityError,
    Session,
    TransportFormatError,
    build_session,
    ecdh_z,
    open_packet,
    open_pages,
    open_session,
    seal_packet,
    seal_pages,
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
]

HDR_LEN = HEADER_LEN  # 52
PDH_LEN = SEV_CERT_LEN  # 2084
CHAIN_LEN = 3 * SEV_CERT_LEN  # 6252
MAX_GUEST_LEN = 0x5000
PAGE = 4096
LOG_SIZE = 1024
MNONCE_LEN = 16
PSP_SLACK_S = 0.01  # timing model: how far behind its timeline a busy PSP may catch up

_LUPDATE = frozenset({GuestState.LUPDATE})
_LSECRET = frozenset({GuestState.LSECRET})
_RUNNING = frozenset({GuestState.RUNNING})
_SUPDATE = frozenset({GuestState.SUPDATE})
_RUPDATE = frozenset({GuestState.RUPDATE})
_ACTIVATABLE = frozenset(GuestState) - {GuestState.SENT, GuestState.UNINIT}
_GUEST_CPU_STATES = frozenset({GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING, GuestState.SUPDATE})


class GuestAccessError(RuntimeError):
    """The guest CPU cannot touch this memory now (unknown guest, SENT, incoming, out of range)."""


@dataclass(eq=False)
class _Guest:
    """One guest context: mutable, guarded by the firmware lock."""

    handle: int
    policy: GuestPolicy
    memory: memoryview
    vek: bytes
    cipher: GuestMemoryCipher
    state: GuestState
    asid: int = 0
    tek: bytes | None = None
    tik: bytes | None = None
    launch_digest: hashlib._Hash = field(default_factory=hashlib.sha256)  # type: ignore[name-defined]


def _as_memory(memory: object) -> memoryview | None:
    """A writable, contiguous byte view of the guest's RAM, or None."""
    try:
        view = memoryview(memory)  # type: ignore[arg-type]
    except TypeError:
        return None
    if view.readonly or not view.c_contiguous:
        return None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _length_ok(length: int) -> bool:
    return 0 < length <= MAX_GUEST_LEN and length % 16 == 0


class SevFirmware:
    """One PSP. See the module docstring for the commands and the rules."""

    def __init__(
        self,
        *,
        ask_key: rsa.RSAPrivateKey,
        ask: AmdCert,
        ark: AmdCert,
        api: tuple[int, int] = (0, 24),
        build: int = 1,
        es: bool = True,
        oca_key: ec.EllipticCurvePrivateKey | None = None,
        timing: PspTiming | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        max_asid: int = 509,
    ) -> None:
        if len(api) != 2 or not all(0 <= v <= 255 for v in api):
            raise ValueError(f"api must be (major, minor), each 0..255, not {api!r}")
        self.api = (int(api[0]), int(api[1]))
        self.build = int(build)
        self.es = bool(es)
        self.ask = ask
        self.ark = ark
        self.timing = timing
        self.max_asid = max_asid
        self._rng = rng
        self._keys: PlatformKeys = generate_platform_keys(ask_key, self.api, oca_key)
        self._external_owner = oca_key is not None  # a given OCA is an owner's, shared by its hosts
        self._state = PlatformState.UNINIT
        self._guests: dict[int, _Guest] = {}
        self._next_handle = 1
        self._lock = threading.RLock()
        self._info_lock = threading.Lock()
        self._log: deque[CommandRecord] = deque(maxlen=LOG_SIZE)
        self._counts: dict[Command, int] = {}
        self._last_status = Status.SUCCESS
        self._work = bytearray(0)
        self._psp_free_at = 0.0  # monotonic time the modelled PSP finishes its last command

    # ------------------------------------------------------------------ introspection

    @property
    def amd_chain(self) -> bytes:
        """ASK || ARK: the AMD chain this platform's CEK chains to."""
        return join_amd_chain(self.ask, self.ark)

    @property
    def platform_state(self) -> PlatformState:
        return self._state

    @property
    def pdh_cert(self) -> SevCert:
        return self._keys.pdh

    @property
    def cert_chain(self) -> bytes:
        """PEK || OCA || CEK (what PDH_CERT_EXPORT returns), without a command."""
        k = self._keys
        return join_platform_chain(k.pek, k.oca, k.cek)

    @property
    def log(self) -> list[CommandRecord]:
        with self._info_lock:
            return list(self._log)

    @property
    def counts(self) -> dict[Command, int]:
        with self._info_lock:
            return dict(self._counts)

    @property
    def last_status(self) -> Status:
        return self._last_status

    @property
    def handles(self) -> list[int]:
        return sorted(self._guests)

    def guest_state(self, handle: int) -> GuestState:
        """A guest's state without a command (UNINIT for a handle that is not, or no longer, there)."""
        guest = self._guests.get(handle)
        return guest.state if guest is not None else GuestState.UNINIT

    # ------------------------------------------------------------------ command plumbing

    def _record(self, command: Command, handle: int | None, status: Status, packets: int) -> None:
        now = time.time()
        record = CommandRecord(command, handle, status, now)
        with self._info_lock:
            self._log.extend([record] * min(packets, LOG_SIZE))
            self._counts[command] = self._counts.get(command, 0) + packets
            self._last_status = status

    def _run(self, command: Command, handle: int | None, result_type: type, body: Callable[[], object],
             pages: int = 0):
        """Run one command: under the lock, typed failure for bad input, logged, paced if timed.

        `pages` > 0 marks a page command: that many packets on success (cost per page).
        """
        with self._lock:
            began = time.monotonic()
            try:
                result = body()
            except (TypeError, ValueError, OverflowError, SevFormatError, TransportFormatError) as exc:
                result = result_type(Status.INVALID_PARAM, detail=f"{command.name}: invalid parameter: {exc}")
            status = result.status
            packets = pages if (pages and status is Status.SUCCESS) else 1
            logged = getattr(result, "handle", None) or handle
            self._record(command, logged, status, packets)
            if self.timing is not None:
                cost = self.timing.per_page_s * packets if pages and status is Status.SUCCESS else self.timing.per_command_s
                self._occupy(began, cost)
            return result

    def _occupy(self, began: float, cost: float) -> None:
        """Hold the PSP until the command's modelled end, on a timeline of back-to-back commands.

        A command queued right behind another starts where that one ended on the timeline, not
        when the thread woke up, so sleep overshoot (often ~1 ms on a loaded host) does not
        accumulate; after an idle gap longer than PSP_SLACK_S the timeline restarts at now.
        """
        start = max(self._psp_free_at, began - PSP_SLACK_S)
        self._psp_free_at = start + cost
        delay = self._psp_free_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _guest(self, handle: object, allowed: frozenset[GuestState] | None) -> tuple[_Guest | None, Status, str]:
        """The guest for a guest command, or the status that refuses it (platform, handle, state)."""
        if self._state is not PlatformState.WORKING:
            return None, Status.INVALID_PLATFORM_STATE, f"the platform is {self._state.name}, guest commands need WORKING"
        try:
            guest = self._guests.get(operator.index(handle))  # type: ignore[arg-type]
        except TypeError:
            guest = None
        if guest is None:
            return None, Status.INVALID_GUEST, f"no guest has handle {handle!r}"
        if allowed is not None and guest.state not in allowed:
            names = "/".join(s.name for s in sorted(allowed))
            return None, Status.INVALID_GUEST_STATE, f"guest {guest.handle} is {guest.state.name}, this command needs {names}"
        return guest, Status.SUCCESS, ""

    def _span(self, guest: _Guest, gpa: int, length: int) -> str:
        """Why [gpa, gpa+length) is not a valid address range of the guest, or ''."""
        if gpa < 0 or gpa % 16:
            return f"guest address {gpa:#x} is not 16-byte aligned"
        if gpa + length > len(guest.memory):
            return f"guest range {gpa:#x}+{length:#x} ends beyond guest memory ({len(guest.memory):#x} bytes)"
        return ""

    def _scratch(self, length: int) -> memoryview:
        """A reused work buffer of `length` bytes (only used under the command lock)."""
        if len(self._work) < length:
            self._work = bytearray(length)
        return memoryview(self._work)[:length]

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _policy_failure(self, policy: GuestPolicy) -> str:
        """Why this firmware cannot host a guest of this policy, or ''."""
        if policy.reserved:
            return f"reserved policy bits 6-15 must be zero, policy has {policy.reserved << 6:#06x}"
        if (policy.api_major, policy.api_minor) > self.api:
            return (f"the policy asks for firmware API {policy.api_major}.{policy.api_minor}, "
                    f"this firmware is {self.api[0]}.{self.api[1]}")
        if policy.flags & PolicyFlag.ES and not self.es:
            return "the policy sets ES, and SEV-ES is not configured on this platform"
        return ""

    def _shared_vek(self, handle: int, policy: GuestPolicy) -> tuple[bytes | None, Status, str]:
        """Key sharing (handle != 0): the other guest's VEK, unless NOKS forbids it."""
        other = self._guests.get(handle)
        if other is None:
            return None, Status.INVALID_GUEST, f"no guest has handle {handle} to share keys with"
        if policy.flags & PolicyFlag.NOKS or other.policy.flags & PolicyFlag.NOKS:
            return None, Status.POLICY_FAILURE, f"NOKS: key sharing with guest {handle} is forbidden by policy"
        return other.vek, Status.SUCCESS, ""

    def _attach(self, policy: GuestPolicy, memory: memoryview, vek: bytes, state: GuestState) -> _Guest:
        guest = _Guest(self._new_handle(), policy, memory, vek, GuestMemoryCipher(vek), state)
        self._guests[guest.handle] = guest
        self._state = PlatformState.WORKING
        return guest

    # ------------------------------------------------------------------ platform

    def init(self) -> Result:
        def body() -> Result:
            if self._state is not PlatformState.UNINIT:
                return Result(Status.INVALID_PLATFORM_STATE, f"INIT: the platform is already {self._state.name}")
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
            flags = (FLAG_OWNER_EXTERNAL if self._external_owner else 0) | (FLAG_ES_CONFIGURED if self.es else 0)
            return PlatformStatusResult(Status.SUCCESS, self.api[0], self.api[1], self._state, flags,
                                        self.build, len(self._guests))
        return self._run(Command.PLATFORM_STATUS, None, PlatformStatusResult, body)

    def pek_gen(self) -> Result:
        def body() -> Result:
            if self._state is not PlatformState.INIT:
                return Result(Status.INVALID_PLATFORM_STATE, f"PEK_GEN needs the platform INIT, it is {self._state.name}")
            self._keys = regenerate_pek(self._keys, self.api)
            self._external_owner = False
            return Result(Status.SUCCESS)
        return self._run(Command.PEK_GEN, None, Result, body)

    def pdh_gen(self) -> Result:
        def body() -> Result:
            if self._state is PlatformState.UNINIT:
                return Result(Status.INVALID_PLATFORM_STATE, "PDH_GEN needs the platform INIT or WORKING, it is UNINIT")
            self._keys = regenerate_pdh(self._keys, self.api)
            return Result(Status.SUCCESS)
        return self._run(Command.PDH_GEN, None, Result, body)

    def pdh_cert_export(self, pdh_len: int = PDH_LEN, chain_len: int = CHAIN_LEN) -> PdhExportResult:
        def body() -> PdhExportResult:
            if self._state is PlatformState.UNINIT:
                return PdhExportResult(Status.INVALID_PLATFORM_STATE,
                                       detail="PDH_CERT_EXPORT needs the platform INIT or WORKING, it is UNINIT")
            if operator.index(pdh_len) < PDH_LEN or operator.index(chain_len) < CHAIN_LEN:
                return PdhExportResult(Status.INVALID_LENGTH, pdh_len=PDH_LEN, chain_len=CHAIN_LEN,
                                       detail=f"PDH_CERT_EXPORT needs pdh_len >= {PDH_LEN} and chain_len >= {CHAIN_LEN}")
            return PdhExportResult(Status.SUCCESS, self._keys.pdh.to_bytes(), self.cert_chain, PDH_LEN, CHAIN_LEN)
        return self._run(Command.PDH_CERT_EXPORT, None, PdhExportResult, body)

    def pek_csr(self, csr_len: int = SEV_CERT_LEN) -> CsrResult:
        def body() -> CsrResult:
            if self._state is not PlatformState.INIT:
                return CsrResult(Status.INVALID_PLATFORM_STATE, detail=f"PEK_CSR needs the platform INIT, it is {self._state.name}")
            if operator.index(csr_len) < SEV_CERT_LEN:
                return CsrResult(Status.INVALID_LENGTH, csr_len=SEV_CERT_LEN,
                                 detail=f"PEK_CSR needs csr_len >= {SEV_CERT_LEN}")
            pek = self._keys.pek
            csr = SevCert.build(self._keys.pek_key.public_key(), Usage.PEK, pek.algo, pek.api_major, pek.api_minor)
            return CsrResult(Status.SUCCESS, csr.to_bytes(), SEV_CERT_LEN)
        return self._run(Command.PEK_CSR, None, CsrResult, body)

    def pek_cert_import(self, pek: bytes, oca: bytes) -> Result:
        """An owner's OCA and the PEK (our CSR) it signed; the firmware adds the CEK signature."""
        def body() -> Result:
            if self._state is not PlatformState.INIT:
                return Result(Status.INVALID_PLATFORM_STATE, f"PEK_CERT_IMPORT needs the platform INIT, it is {self._state.name}")
            if self._external_owner:
                return Result(Status.ALREADY_OWNED, "PEK_CERT_IMPORT: the platform already has an external owner (PEK_GEN resets it)")
            if len(pek) != SEV_CERT_LEN or len(oca) != SEV_CERT_LEN:
                return Result(Status.INVALID_LENGTH, f"PEK_CERT_IMPORT: PEK and OCA certificates are {SEV_CERT_LEN} bytes each")
            try:
                pek_cert = SevCert.from_bytes(pek, "imported PEK")
                oca_cert = SevCert.from_bytes(oca, "imported OCA")
            except SevFormatError as exc:
                return Result(Status.INVALID_CERTIFICATE, str(exc))
            if oca_cert.usage != Usage.OCA or pek_cert.usage != Usage.PEK:
                return Result(Status.INVALID_CERTIFICATE,
                              f"PEK_CERT_IMPORT: got usages {oca_cert.usage.name} and {pek_cert.usage.name}, need OCA and PEK")
            for signer, subject, what in ((oca_cert, oca_cert, "OCA self-signature"), (oca_cert, pek_cert, "OCA -> PEK signature")):
                link = check_link(signer, subject)
                if not link.ok:
                    return Result(Status.BAD_SIGNATURE, f"PEK_CERT_IMPORT: the {what} does not verify ({link.detail})")
            if not same_key(pek_cert, self._keys.pek):
                return Result(Status.INVALID_CERTIFICATE,
                              "PEK_CERT_IMPORT: the PEK is not this platform's (sign the CSR from PEK_CSR)")
            found = pek_cert.signature_for(Usage.OCA)
            oca_slot = found[0] if found else 0
            unsigned = pek_cert.sigs[1 - oca_slot]
            if unsigned.used and unsigned.usage != Usage.CEK:
                return Result(Status.INVALID_CERTIFICATE, "PEK_CERT_IMPORT: the PEK's other signature slot must be free for the CEK")
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
                return HandleResult(Status.INVALID_PLATFORM_STATE, detail="LAUNCH_START needs the platform INIT or WORKING, it is UNINIT")
            pol = GuestPolicy.from_u32(operator.index(policy))
            why = self._policy_failure(pol)
            if why:
                return HandleResult(Status.POLICY_FAILURE, detail=f"LAUNCH_START: {why}")
            view = _as_memory(memory)
            if view is None:
                return HandleResult(Status.INVALID_PARAM, detail="LAUNCH_START: guest memory must be a writable contiguous byte buffer")
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
            guest, status, why = self._guest(handle, _LUPDATE)
            if guest is None:
                return Result(status, f"LAUNCH_UPDATE_DATA: {why}")
            start, n = operator.index(gpa), operator.index(length)
            if n <= 0 or n % 16:
                return Result(Status.INVALID_LENGTH, f"LAUNCH_UPDATE_DATA: length {n} must be a non-zero multiple of 16")
            why = self._span(guest, start, n)
            if why:
                return Result(Status.INVALID_ADDRESS, f"LAUNCH_UPDATE_DATA: {why}")
            region = guest.memory[start:start + n]
            guest.launch_digest.update(region)
            guest.cipher.encrypt(start, region, out=region)  # in place, like the real command
            return Result(Status.SUCCESS)
        return self._run(Command.LAUNCH_UPDATE_DATA, handle, Result, body)

    def launch_measure(self, handle: int) -> MeasureResult:
        def body() -> MeasureResult:
            guest, status, why = self._guest(handle, _LUPDATE)
            if guest is None:
                return MeasureResult(status, detail=f"LAUNCH_MEASURE: {why}")
            mnonce = self._rng(MNONCE_LEN)
            msg = (bytes([0x04, self.api[0], self.api[1], self.build & 0xFF])
                   + guest.policy.to_u32().to_bytes(4, "little") + guest.launch_digest.digest() + mnonce)
            guest.state = GuestState.LSECRET
            return MeasureResult(Status.SUCCESS, hmac.digest(guest.tik or b"", msg, "sha256") + mnonce)
        return self._run(Command.LAUNCH_MEASURE, handle, MeasureResult, body)

    def launch_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, _LSECRET)
            if guest is None:
                return Result(status, f"LAUNCH_FINISH: {why}")
            guest.state = GuestState.RUNNING
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)
        return self._run(Command.LAUNCH_FINISH, handle, Result, body)

    def activate(self, handle: int, asid: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, _ACTIVATABLE)
            if guest is None:
                return Result(status, f"ACTIVATE: {why}")
            a = operator.index(asid)
            if not 1 <= a <= self.max_asid:
                return Result(Status.INVALID_ASID, f"ACTIVATE: ASID {a} is outside 1..{self.max_asid}")
            owner = next((g.handle for g in self._guests.values() if g.asid == a and g is not guest), None)
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

    # ------------------------------------------------------------------ send

    def send_start(self, handle: int, pdh: bytes, plat_chain: bytes, amd_chain: bytes,
                   session_len: int = SESSION_LEN) -> SendStartResult:
        def body() -> SendStartResult:
            guest, status, why = self._guest(handle, _RUNNING)
            if guest is None:
                return SendStartResult(status, detail=f"SEND_START: {why}")
            if operator.index(session_len) != SESSION_LEN:
                return SendStartResult(Status.INVALID_LENGTH, session_len=SESSION_LEN,
                                       detail=f"SEND_START: session_len must be {SESSION_LEN}")
            if guest.policy.flags & PolicyFlag.NOSEND:
                return SendStartResult(Status.POLICY_FAILURE,
                                       detail="SEND_START: the guest policy sets NOSEND: this guest may never leave its platform")
            if len(pdh) != PDH_LEN:
                return SendStartResult(Status.INVALID_LENGTH,
                                       detail=f"SEND_START: the target PDH is {len(pdh)} bytes, a PDH certificate is {PDH_LEN}")
            outcome = check_target(guest.policy, bytes(pdh), bytes(plat_chain), bytes(amd_chain),
                                   own_oca=self._keys.oca, own_ark=self.ark)
            if outcome.pdh is None:
                return SendStartResult(outcome.status, detail=f"SEND_START: {outcome.detail}")
            z = ecdh_z(self._keys.pdh_key, outcome.pdh.public_key())
            tek, tik = self._rng(16), self._rng(16)
            session = build_session(z, tek, tik, guest.policy.to_u32(), self._rng(16), self._rng(16))
            guest.tek, guest.tik = tek, tik
            guest.state = GuestState.SUPDATE
            return SendStartResult(Status.SUCCESS, session.to_bytes(), guest.policy.to_u32(), SESSION_LEN)
        return self._run(Command.SEND_START, handle, SendStartResult, body)

    def send_update_data(self, handle: int, gpa: int, length: int, hdr_len: int = HDR_LEN,
                         trans_len: int | None = None) -> SendUpdateResult:
        def body() -> SendUpdateResult:
            guest, status, why = self._guest(handle, _SUPDATE)
            if guest is None:
                return SendUpdateResult(status, detail=f"SEND_UPDATE_DATA: {why}")
            start, n = operator.index(gpa), operator.index(length)
            want = n if trans_len is None else operator.index(trans_len)
            if operator.index(hdr_len) < HDR_LEN:
                return SendUpdateResult(Status.INVALID_LENGTH, hdr_len=HDR_LEN, trans_len=want,
                                        detail=f"SEND_UPDATE_DATA: hdr_len must be at least {HDR_LEN}")
            if not _length_ok(n):
                return SendUpdateResult(Status.INVALID_LENGTH, hdr_len=hdr_len, trans_len=want,
                                        detail=f"SEND_UPDATE_DATA: guest_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}")
            if want < n:
                return SendUpdateResult(Status.INVALID_LENGTH, hdr_len=hdr_len, trans_len=n,
                                        detail=f"SEND_UPDATE_DATA: trans_len {want} is smaller than guest_len {n}")
            why = self._span(guest, start, n)
            if why:
                return SendUpdateResult(Status.INVALID_ADDRESS, detail=f"SEND_UPDATE_DATA: {why}")
            plain = guest.cipher.decrypt(start, guest.memory[start:start + n].tobytes())
            header, trans = seal_packet(guest.tek, guest.tik, plain, self._rng(16))
            return SendUpdateResult(Status.SUCCESS, header, trans, HDR_LEN, n)
        return self._run(Command.SEND_UPDATE_DATA, handle, SendUpdateResult, body, pages=_pages_of(length))

    def send_pages(self, handle: int, gpa: int, npages: int, packet_size: int = PAGE) -> SendPagesResult:
        """Batch SEND_UPDATE_DATA: `npages` packets of `packet_size` from gpa, one status for all."""
        def body() -> SendPagesResult:
            guest, status, why = self._guest(handle, _SUPDATE)
            if guest is None:
                return SendPagesResult(status, detail=f"SEND_UPDATE_DATA: {why}")
            start, count, size = operator.index(gpa), operator.index(npages), operator.index(packet_size)
            if count <= 0 or not _length_ok(size):
                return SendPagesResult(Status.INVALID_LENGTH,
                                       detail=f"SEND_UPDATE_DATA: {count} packets of {size} bytes: need at least one packet "
                                              f"of a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}")
            why = self._span(guest, start, count * size)
            if why:
                return SendPagesResult(Status.INVALID_ADDRESS, detail=f"SEND_UPDATE_DATA: {why}")
            run = count * size
            # Decrypt the run at rest into reused scratch, seal it into one fresh buffer: large
            # fresh allocations cost page faults that outweigh the crypto.
            plain = guest.cipher.decrypt(start, guest.memory[start:start + run], out=self._scratch(run))
            trans = bytearray(run)
            headers, _ = seal_pages(guest.tek, guest.tik, plain, size, ivs=self._rng(16 * count), out=trans)
            return SendPagesResult(Status.SUCCESS, b"".join(headers), trans)
        return self._run(Command.SEND_UPDATE_DATA, handle, SendPagesResult, body, pages=_pages_of(packet_size, npages))

    def send_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, _SUPDATE)
            if guest is None:
                return Result(status, f"SEND_FINISH: {why}")
            guest.state = GuestState.SENT  # from now on only DECOMMISSION: no second runnable copy
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)
        return self._run(Command.SEND_FINISH, handle, Result, body)

    def send_cancel(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, _SUPDATE)
            if guest is None:
                return Result(status, f"SEND_CANCEL: {why}")
            guest.state = GuestState.RUNNING  # a cancelled migration can be retried
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)
        return self._run(Command.SEND_CANCEL, handle, Result, body)

    # ------------------------------------------------------------------ receive

    def receive_start(self, policy: int, pdh: bytes, session: bytes, memory: object, handle: int = 0,
                      session_len: int = SESSION_LEN, pdh_len: int = PDH_LEN) -> ReceiveStartResult:
        """`pdh` is the SOURCE's PDH certificate, as the migration stream carries it."""
        def body() -> ReceiveStartResult:
            if self._state is PlatformState.UNINIT:
                return ReceiveStartResult(Status.INVALID_PLATFORM_STATE,
                                          detail="RECEIVE_START needs the platform INIT or WORKING, it is UNINIT")
            if operator.index(session_len) != SESSION_LEN or operator.index(pdh_len) != PDH_LEN:
                return ReceiveStartResult(Status.INVALID_LENGTH, session_len=SESSION_LEN, pdh_len=PDH_LEN,
                                          detail=f"RECEIVE_START: session_len must be {SESSION_LEN} and pdh_len {PDH_LEN}")
            if len(session) != session_len or len(pdh) != pdh_len:
                return ReceiveStartResult(Status.INVALID_LENGTH, session_len=SESSION_LEN, pdh_len=PDH_LEN,
                                          detail=f"RECEIVE_START: the session is {len(session)} bytes and the PDH {len(pdh)}, "
                                                 f"expected {SESSION_LEN} and {PDH_LEN}")
            view = _as_memory(memory)
            if view is None:
                return ReceiveStartResult(Status.INVALID_PARAM,
                                          detail="RECEIVE_START: guest memory must be a writable contiguous byte buffer")
            source_pdh, why = parse_pdh(bytes(pdh), "source PDH")
            if source_pdh is None:
                return ReceiveStartResult(Status.INVALID_CERTIFICATE, detail=f"RECEIVE_START: {why}")
            value = operator.index(policy)
            pol = GuestPolicy.from_u32(value)
            z = ecdh_z(self._keys.pdh_key, source_pdh.public_key())
            try:
                tek, tik = open_session(z, Session.from_bytes(bytes(session)), value)
            except IntegrityError as exc:
                return ReceiveStartResult(Status.BAD_MEASUREMENT, detail=f"RECEIVE_START: {exc.sentence}")
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

    def receive_update_data(self, handle: int, gpa: int, header: bytes, trans: bytes,
                            hdr_len: int = HDR_LEN) -> ReceiveUpdateResult:
        """Check the packet's MAC, then decrypt it and store it encrypted at rest at gpa."""
        def body() -> ReceiveUpdateResult:
            guest, status, why = self._guest(handle, _RUPDATE)
            if guest is None:
                return ReceiveUpdateResult(status, detail=f"RECEIVE_UPDATE_DATA: {why}")
            if operator.index(hdr_len) < HDR_LEN or len(header) < HDR_LEN:
                return ReceiveUpdateResult(Status.INVALID_LENGTH, HDR_LEN,
                                           f"RECEIVE_UPDATE_DATA: hdr_len must be at least {HDR_LEN}")
            n = len(trans)
            if not _length_ok(n):
                return ReceiveUpdateResult(Status.INVALID_LENGTH, hdr_len,
                                           f"RECEIVE_UPDATE_DATA: trans_len {n} must be a non-zero multiple of 16 up to {MAX_GUEST_LEN:#x}")
            start = operator.index(gpa)
            why = self._span(guest, start, n)
            if why:
                return ReceiveUpdateResult(Status.INVALID_ADDRESS, hdr_len, f"RECEIVE_UPDATE_DATA: {why}")
            flags = int.from_bytes(bytes(header[:4]), "little")
            if flags:
                return ReceiveUpdateResult(*_flags_refusal(flags, 0, hdr_len))
            try:
                plain = open_packet(guest.tek, guest.tik, bytes(header[:HDR_LEN]), bytes(trans))
            except IntegrityError as exc:
                return ReceiveUpdateResult(Status.BAD_MEASUREMENT, hdr_len,
                                           f"RECEIVE_UPDATE_DATA at {start:#x}: {exc.sentence}; guest memory is unchanged")
            guest.memory[start:start + n] = guest.cipher.encrypt(start, plain)
            return ReceiveUpdateResult(Status.SUCCESS, hdr_len)
        return self._run(Command.RECEIVE_UPDATE_DATA, handle, ReceiveUpdateResult, body, pages=_pages_of(_size(trans)))

    def receive_pages(self, handle: int, gpa: int, headers: bytes, trans: bytes, packet_size: int = PAGE) -> ReceiveUpdateResult:
        """Batch RECEIVE_UPDATE_DATA: every MAC is checked before any page is decrypted or stored."""
        count = len(headers) // HDR_LEN if isinstance(headers, bytes | bytearray | memoryview) else 0

        def body() -> ReceiveUpdateResult:
            guest, status, why = self._guest(handle, _RUPDATE)
            if guest is None:
                return ReceiveUpdateResult(status, detail=f"RECEIVE_UPDATE_DATA: {why}")
            size = operator.index(packet_size)
            if not _length_ok(size) or count == 0 or len(headers) != count * HDR_LEN or len(trans) != count * size:
                return ReceiveUpdateResult(Status.INVALID_LENGTH, HDR_LEN,
                                           f"RECEIVE_UPDATE_DATA: {len(headers)} header bytes and {len(trans)} data bytes are not "
                                           f"a whole number of {HDR_LEN}-byte headers and {size}-byte packets")
            start = operator.index(gpa)
            why = self._span(guest, start, len(trans))
            if why:
                return ReceiveUpdateResult(Status.INVALID_ADDRESS, HDR_LEN, f"RECEIVE_UPDATE_DATA: {why}")
            flags = np.frombuffer(bytes(headers), dtype="<u4").reshape(count, HDR_LEN // 4)[:, 0]
            if flags.any():
                bad = int(np.argmax(flags != 0))
                return ReceiveUpdateResult(*_flags_refusal(int(flags[bad]), bad, HDR_LEN))
            try:
                plain = open_pages(guest.tek, guest.tik, bytes(headers), trans, size, out=self._scratch(len(trans)))
            except IntegrityError as exc:
                return ReceiveUpdateResult(Status.BAD_MEASUREMENT, HDR_LEN,
                                           f"RECEIVE_UPDATE_DATA at {start:#x}: {exc.sentence}; guest memory is unchanged")
            # Only now, every MAC good, does guest memory change: encrypted at rest in place.
            guest.cipher.encrypt(start, plain, out=guest.memory[start:start + len(trans)])
            return ReceiveUpdateResult(Status.SUCCESS, HDR_LEN)
        return self._run(Command.RECEIVE_UPDATE_DATA, handle, ReceiveUpdateResult, body,
                         pages=_pages_of(packet_size, count))

    def receive_finish(self, handle: int) -> Result:
        def body() -> Result:
            guest, status, why = self._guest(handle, _RUPDATE)
            if guest is None:
                return Result(status, f"RECEIVE_FINISH: {why}")
            guest.state = GuestState.RUNNING
            guest.tek = guest.tik = None
            return Result(Status.SUCCESS)
        return self._run(Command.RECEIVE_FINISH, handle, Result, body)

    # ------------------------------------------------------------------ the guest CPU's view

    def _cpu_guest(self, handle: int, gpa: int, length: int) -> _Guest:
        guest = self._guests.get(handle)
        if guest is None:
            raise GuestAccessError(f"guest {handle} does not exist on this platform")
        if guest.state not in _GUEST_CPU_STATES:
            raise GuestAccessError(f"guest {handle} is {guest.state.name}: its CPU cannot run here")
        why = self._span(guest, gpa, length) if length % 16 == 0 else f"length {length} is not a multiple of 16"
        if why:
            raise GuestAccessError(f"guest {handle}: {why}")
        return guest

    def guest_write(self, handle: int, gpa: int, plaintext: bytes) -> None:
        """The guest writes its private memory: stored encrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, len(plaintext))
        guest.memory[gpa:gpa + len(plaintext)] = guest.cipher.encrypt(gpa, bytes(plaintext))

    def guest_read(self, handle: int, gpa: int, length: int) -> bytes:
        """The guest reads its private memory: decrypted with its VEK (not a PSP command)."""
        guest = self._cpu_guest(handle, gpa, length)
        return guest.cipher.decrypt(gpa, guest.memory[gpa:gpa + length].tobytes())


def _flags_refusal(flags: int, packet: int, hdr_len: int) -> tuple[Status, int, str]:
    """COMPRESSED is UNSUPPORTED; any other flag bit is reserved (INVALID_PARAM)."""
    if flags & 1:
        return Status.UNSUPPORTED, hdr_len, (f"RECEIVE_UPDATE_DATA: packet {packet} is COMPRESSED, "
                                             "which this firmware does not support")
    return Status.INVALID_PARAM, hdr_len, (f"RECEIVE_UPDATE_DATA: packet {packet} sets reserved "
                                           f"header flag bits {flags:#010x}")


def _size(data: object) -> int:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _pages_of(size: object, count: object = 1) -> int:
    """Modelled page cost of `count` packets of `size` bytes (a started 4 KiB counts whole)."""
    try:
        return max(1, -(-operator.index(size) // PAGE)) * max(1, operator.index(count))
    except TypeError:
        return 1
