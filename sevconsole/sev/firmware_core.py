"""The firmware model's state and plumbing: guest contexts, the command lock, log and timing.

`FirmwareCore` holds what every command needs (platform state, keys, guests, the lock that
keeps one command in flight, the command log and counts, the PSP timeline); the commands live
in firmware.py (platform, LAUNCH, guests) and firmware_migration.py (SEND, RECEIVE).
"""

from __future__ import annotations

import hashlib
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .certs import (
    SEV_CERT_LEN,
    AmdCert,
    SevCert,
    join_amd_chain,
    join_platform_chain,
)
from .errors import SevFormatError
from .firmware_keys import (
    PlatformKeys,
    generate_platform_keys,
)
from .firmware_results import (
    CommandRecord,
    PspTiming,
)
from .memory import GuestMemoryCipher
from .policy import GuestPolicy, PolicyFlag
from .status import (
    Command,
    GuestState,
    PlatformState,
    Status,
)
from .transport import (
    HEADER_LEN,
    TransportFormatError,
)

HDR_LEN = HEADER_LEN  # 52
PDH_LEN = SEV_CERT_LEN  # 2084
CHAIN_LEN = 3 * SEV_CERT_LEN  # 6252
MAX_GUEST_LEN = 0x5000
PAGE = 4096
LOG_SIZE = 1024
MNONCE_LEN = 16
VMSA_LEN = 4096  # one VMSA page per vCPU (SEV-ES)
PSP_SLACK_S = 0.01  # timing model: how far behind its timeline a busy PSP may catch up

IN_LUPDATE = frozenset({GuestState.LUPDATE})
IN_LSECRET = frozenset({GuestState.LSECRET})
IN_RUNNING = frozenset({GuestState.RUNNING})
IN_SUPDATE = frozenset({GuestState.SUPDATE})
IN_RUPDATE = frozenset({GuestState.RUPDATE})
ACTIVATABLE = frozenset(GuestState) - {GuestState.SENT, GuestState.UNINIT}
GUEST_CPU_STATES = frozenset(
    {GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING, GuestState.SUPDATE}
)


class GuestAccessError(RuntimeError):
    """The guest CPU cannot touch this memory now (unknown guest, SENT, incoming, out of range)."""


@dataclass(eq=False)
class GuestContext:
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


def as_memory(memory: object) -> memoryview | None:
    """A writable, contiguous byte view of the guest's RAM, or None."""
    try:
        view = memoryview(memory)  # type: ignore[arg-type]
    except TypeError:
        return None
    if view.readonly or not view.c_contiguous:
        return None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def length_ok(length: int) -> bool:
    return 0 < length <= MAX_GUEST_LEN and length % 16 == 0


class FirmwareCore:
    """State and plumbing shared by the commands; see `SevFirmware`."""

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
        self._guests: dict[int, GuestContext] = {}
        self._next_handle = 1
        self._lock = threading.RLock()
        self._info_lock = threading.Lock()
        self._log: deque[CommandRecord] = deque(maxlen=LOG_SIZE)
        self._counts: dict[Command, int] = {}
        self._last_status = Status.SUCCESS
        self._work = bytearray(0)
        self._psp_free_at = 0.0  # monotonic time the modelled PSP finishes its last command
        self._charged: tuple[int, int] | None = None  # set by a page command that succeeds

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
        return sorted(list(self._guests))

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

    def _run(
        self, command: Command, handle: int | None, result_type: type, body: Callable[[], object]
    ):
        """Run one command: under the lock, typed failure for bad input, logged, paced if timed.

        A page command that succeeds calls `_charge` with its packets and pages; anything else
        is one record and costs `per_command_s`.
        """
        with self._lock:
            began = time.monotonic()
            self._charged = None
            try:
                result = body()
            except (
                TypeError,
                ValueError,
                OverflowError,
                SevFormatError,
                TransportFormatError,
            ) as exc:
                result = result_type(
                    Status.INVALID_PARAM, detail=f"{command.name}: invalid parameter: {exc}"
                )
            status = result.status
            charged = self._charged if status is Status.SUCCESS else None
            packets = charged[0] if charged else 1
            self._record(command, getattr(result, "handle", None) or handle, status, packets)
            if self.timing is not None:
                cost = self.timing.per_page_s * charged[1] if charged else self.timing.per_command_s
                self._occupy(began, cost)
            return result

    def _charge(self, packets: int, pages: int) -> None:
        """A page command succeeded: `packets` go to the log and counts, `pages` to PSP time."""
        self._charged = (packets, pages)

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

    def _guest(
        self, handle: object, allowed: frozenset[GuestState] | None
    ) -> tuple[GuestContext | None, Status, str]:
        """The guest for a guest command, or the status that refuses it (platform, handle, state)."""
        if self._state is not PlatformState.WORKING:
            return (
                None,
                Status.INVALID_PLATFORM_STATE,
                f"the platform is {self._state.name}, guest commands need WORKING",
            )
        try:
            guest = self._guests.get(operator.index(handle))  # type: ignore[arg-type]
        except TypeError:
            guest = None
        if guest is None:
            return None, Status.INVALID_GUEST, f"no guest has handle {handle!r}"
        if allowed is not None and guest.state not in allowed:
            names = "/".join(s.name for s in sorted(allowed))
            return (
                None,
                Status.INVALID_GUEST_STATE,
                f"guest {guest.handle} is {guest.state.name}, this command needs {names}",
            )
        return guest, Status.SUCCESS, ""

    def _span(self, guest: GuestContext, gpa: int, length: int) -> str:
        """Why [gpa, gpa+length) is not a valid address range of the guest, or ''."""
        if length < 0:
            return f"length {length} is negative"
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
            return (
                f"the policy asks for firmware API {policy.api_major}.{policy.api_minor}, "
                f"this firmware is {self.api[0]}.{self.api[1]}"
            )
        if policy.flags & PolicyFlag.ES and not self.es:
            return "the policy sets ES, and SEV-ES is not configured on this platform"
        return ""

    def _shared_vek(self, handle: int, policy: GuestPolicy) -> tuple[bytes | None, Status, str]:
        """Key sharing (handle != 0): the other guest's VEK, unless NOKS forbids it."""
        other = self._guests.get(handle)
        if other is None:
            return None, Status.INVALID_GUEST, f"no guest has handle {handle} to share keys with"
        if policy.flags & PolicyFlag.NOKS or other.policy.flags & PolicyFlag.NOKS:
            return (
                None,
                Status.POLICY_FAILURE,
                f"NOKS: key sharing with guest {handle} is forbidden by policy",
            )
        return other.vek, Status.SUCCESS, ""

    def _attach(
        self, policy: GuestPolicy, memory: memoryview, vek: bytes, state: GuestState
    ) -> GuestContext:
        guest = GuestContext(self._new_handle(), policy, memory, vek, GuestMemoryCipher(vek), state)
        self._guests[guest.handle] = guest
        self._state = PlatformState.WORKING
        return guest


def flags_refusal(flags: int, packet: int, hdr_len: int) -> tuple[Status, int, str]:
    """COMPRESSED is UNSUPPORTED; any other flag bit is reserved (INVALID_PARAM)."""
    if flags & 1:
        return (
            Status.UNSUPPORTED,
            hdr_len,
            (
                f"RECEIVE_UPDATE_DATA: packet {packet} is COMPRESSED, "
                "which this firmware does not support"
            ),
        )
    return (
        Status.INVALID_PARAM,
        hdr_len,
        (f"RECEIVE_UPDATE_DATA: packet {packet} sets reserved header flag bits {flags:#010x}"),
    )


def vmsa_refusal(guest: GuestContext, gpa: int, length: int) -> tuple[Status, str] | None:
    """Why a *_UPDATE_VMSA command cannot move this page, or None: ES guests, whole pages."""
    if not guest.policy.flags & PolicyFlag.ES:
        return Status.POLICY_FAILURE, (
            f"guest {guest.handle} is not an SEV-ES guest (policy bit 2 clear): it has no VMSA"
        )
    if length != VMSA_LEN:
        return Status.INVALID_LENGTH, f"a VMSA is one {VMSA_LEN}-byte page, not {length} bytes"
    if gpa % VMSA_LEN:
        return Status.INVALID_ADDRESS, f"VMSA address {gpa:#x} is not page aligned"
    return None


def pages_of(size: int, count: int = 1) -> int:
    """Modelled page cost of `count` packets of `size` bytes (a started 4 KiB counts whole)."""
    return -(-size // PAGE) * count
