"""One guest context, the firmware's sizes, and the checks every guest command shares.

The checks raise `Refusal` with the status the reference gives, so a command states them in
one line each; the command decorator adds the command's name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from ..certs import SEV_CERT_LEN
from ..memory import GuestMemoryCipher
from ..policy import GuestPolicy, PolicyFlag
from ..status import GuestState, Status
from ..transport import HEADER_LEN
from .results import Refusal

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

HDR_LEN = HEADER_LEN  # 52
PDH_LEN = SEV_CERT_LEN  # 2084
CHAIN_LEN = 3 * SEV_CERT_LEN  # 6252
MAX_GUEST_LEN = 0x5000
PAGE = 4096
MNONCE_LEN = 16
VMSA_LEN = 4096  # one VMSA page per vCPU (SEV-ES)

IN_LUPDATE = frozenset({GuestState.LUPDATE})
IN_LSECRET = frozenset({GuestState.LSECRET})
IN_RUNNING = frozenset({GuestState.RUNNING})
IN_SUPDATE = frozenset({GuestState.SUPDATE})
IN_RUPDATE = frozenset({GuestState.RUPDATE})
ACTIVATABLE = frozenset(GuestState) - {GuestState.SENT, GuestState.UNINIT}
ANY_STATE = frozenset(GuestState)
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
    tek: bytes = b""  # the session's keys while a launch or migration is in flight
    tik: bytes = b""
    launch_digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def end_session(self, state: GuestState) -> None:
        """Move to `state` and forget the session's keys."""
        self.state = state
        self.tek = self.tik = b""


def as_memory(memory: object) -> memoryview | None:
    """A writable, contiguous byte view of the guest's RAM, or None."""
    try:
        view = memoryview(cast("ReadableBuffer", memory))  # memoryview() refuses non-buffers
    except TypeError:
        return None
    if view.readonly or not view.c_contiguous:
        return None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def span_problem(guest: GuestContext, gpa: int, length: int) -> str:
    """Why [gpa, gpa+length) is not a valid address range of the guest, or ''."""
    if length < 0:
        return f"length {length} is negative"
    if gpa < 0 or gpa % 16:
        return f"guest address {gpa:#x} is not 16-byte aligned"
    if gpa + length > len(guest.memory):
        return f"guest range {gpa:#x}+{length:#x} ends beyond guest memory ({len(guest.memory):#x} bytes)"
    return ""


def check_span(guest: GuestContext, gpa: int, length: int) -> memoryview:
    """The guest's memory [gpa, gpa+length), or INVALID_ADDRESS."""
    why = span_problem(guest, gpa, length)
    if why:
        raise Refusal(Status.INVALID_ADDRESS, why)
    return guest.memory[gpa : gpa + length]


def packet_len_ok(length: int) -> bool:
    return 0 < length <= MAX_GUEST_LEN and length % 16 == 0


def check_vmsa(guest: GuestContext, gpa: int, length: int) -> None:
    """A *_UPDATE_VMSA command moves one whole, page-aligned VMSA page of an SEV-ES guest."""
    if not guest.policy.flags & PolicyFlag.ES:
        raise Refusal(
            Status.POLICY_FAILURE,
            f"guest {guest.handle} is not an SEV-ES guest (policy bit 2 clear): it has no VMSA",
        )
    if length != VMSA_LEN:
        raise Refusal(
            Status.INVALID_LENGTH, f"a VMSA is one {VMSA_LEN}-byte page, not {length} bytes"
        )
    if gpa % VMSA_LEN:
        raise Refusal(Status.INVALID_ADDRESS, f"VMSA address {gpa:#x} is not page aligned")


def check_header_flags(flags: int, packet: int) -> None:
    """COMPRESSED is UNSUPPORTED; any other flag bit is reserved (INVALID_PARAM)."""
    if flags & 1:
        raise Refusal(
            Status.UNSUPPORTED,
            f"packet {packet} is COMPRESSED, which this firmware does not support",
        )
    if flags:
        raise Refusal(
            Status.INVALID_PARAM,
            f"packet {packet} sets reserved header flag bits {flags:#010x}",
        )


def pages_of(size: int, count: int = 1) -> int:
    """Modelled page cost of `count` packets of `size` bytes (a started 4 KiB counts whole)."""
    return -(-size // PAGE) * count
