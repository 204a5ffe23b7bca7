"""What the firmware model's commands return, its command log, and its timing setting.

Every result is a frozen dataclass whose first field is `status`. The other fields have
defaults so a failing command can answer with the status alone; `detail` carries a sentence
saying which rule refused the command (empty on success).
"""

from __future__ import annotations

from dataclasses import dataclass

from .status import Command, GuestState, PlatformState, Status


@dataclass(frozen=True)
class PspTiming:
    """The "realistic PSP": one command in flight, a cost per command and per page.

    A page command (SEND/RECEIVE_UPDATE_DATA, or one packet of a batch) costs `per_page_s`
    per started 4 KiB, which includes its own command overhead: the default 2.5 ms a page
    gives the 350-450 pages/s AMD measured. Every other command costs `per_command_s`.
    """

    per_command_s: float = 0.0005
    per_page_s: float = 0.0025


@dataclass(frozen=True)
class CommandRecord:
    command: Command
    handle: int | None
    status: Status
    time: float  # wall clock (time.time()) when the command finished


class _HasStatus:
    status: Status

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCESS


@dataclass(frozen=True)
class Result(_HasStatus):
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class PlatformStatusResult(_HasStatus):
    status: Status
    api_major: int = 0
    api_minor: int = 0
    state: PlatformState = PlatformState.UNINIT
    flags: int = 0
    build: int = 0
    guest_count: int = 0
    detail: str = ""


@dataclass(frozen=True)
class PdhExportResult(_HasStatus):
    status: Status
    pdh: bytes = b""
    cert_chain: bytes = b""  # PEK || OCA || CEK
    pdh_len: int = 0  # on INVALID_LENGTH: the lengths the firmware needs
    chain_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class CsrResult(_HasStatus):
    status: Status
    csr: bytes = b""
    csr_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class HandleResult(_HasStatus):
    status: Status
    handle: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ReceiveStartResult(_HasStatus):
    status: Status
    handle: int = 0
    session_len: int = 0  # on INVALID_LENGTH: what the firmware needs
    pdh_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class MeasureResult(_HasStatus):
    status: Status
    measurement: bytes = b""  # HMAC-SHA256 measurement (32) || mnonce (16)
    detail: str = ""


@dataclass(frozen=True)
class GuestStatusResult(_HasStatus):
    status: Status
    policy: int = 0
    asid: int = 0
    state: GuestState = GuestState.UNINIT
    detail: str = ""


@dataclass(frozen=True)
class SendStartResult(_HasStatus):
    status: Status
    session: bytes = b""
    policy: int = 0
    session_len: int = 0  # on INVALID_LENGTH: 128, the length the firmware needs
    detail: str = ""


@dataclass(frozen=True)
class SendUpdateResult(_HasStatus):
    status: Status
    header: bytes = b""
    trans: bytes = b""
    hdr_len: int = 0
    trans_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ReceiveUpdateResult(_HasStatus):
    status: Status
    hdr_len: int = 0  # on INVALID_LENGTH: 52 when the header was too short
    detail: str = ""


@dataclass(frozen=True)
class SendPagesResult(_HasStatus):
    status: Status
    headers: bytes = b""  # npages * 52 bytes
    trans: bytes | bytearray = b""  # npages * packet_size bytes (a fresh buffer, the caller's)
    detail: str = ""
