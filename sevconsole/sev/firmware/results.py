"""What the firmware model's commands return, its command log, its cost model, and `Refusal`.

Every result is a frozen dataclass whose first field is `status` and whose last is `detail`.
The fields between have defaults, so a refused command answers with the status, the sentence
and (on INVALID_LENGTH) the lengths the firmware needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..status import Command, GuestState, PlatformState, Status


@dataclass(frozen=True)
class PspTiming:
    """The "realistic PSP" cost model: a cost per command and per page, in modelled seconds.

    A page command (SEND/RECEIVE_UPDATE_DATA, or one packet of a batch) costs `per_page_s`
    per started 4 KiB, which includes its own command overhead: the default 2.5 ms a page
    gives the 350-450 pages/s AMD measured. Every other command costs `per_command_s`. The
    firmware only adds the costs up (`SevFirmware.busy_s`); lab/psp.py makes real time follow.
    """

    per_command_s: float = 0.0005
    per_page_s: float = 0.0025

    def cost(self, pages: int) -> float:
        """The modelled time of one command that moved `pages` pages (0: not a page command)."""
        return self.per_page_s * pages if pages else self.per_command_s


@dataclass(frozen=True)
class CommandRecord:
    command: Command
    handle: int | None
    status: Status
    time: float  # the firmware's clock (wall clock by default) when the command finished


class Refusal(Exception):
    """Raised inside a command: it answers `status`, the sentence, and any written-back fields.

    The command decorators (command.py) turn it into the command's result, with the command's
    name before the sentence.
    """

    def __init__(self, status: Status, detail: str, **fields: int) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.fields = fields


class CommandResult:
    """What every result has: `status`, `detail` (empty on success) and `ok`."""

    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCESS


@dataclass(frozen=True)
class Result(CommandResult):
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class PlatformStatusResult(CommandResult):
    status: Status
    api_major: int = 0
    api_minor: int = 0
    state: PlatformState = PlatformState.UNINIT
    flags: int = 0
    build: int = 0
    guest_count: int = 0
    detail: str = ""


@dataclass(frozen=True)
class PdhExportResult(CommandResult):
    status: Status
    pdh: bytes = b""
    cert_chain: bytes = b""  # PEK || OCA || CEK
    pdh_len: int = 0  # on INVALID_LENGTH: the lengths the firmware needs
    chain_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class CsrResult(CommandResult):
    status: Status
    csr: bytes = b""
    csr_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class HandleResult(CommandResult):
    status: Status
    handle: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ReceiveStartResult(CommandResult):
    status: Status
    handle: int = 0
    session_len: int = 0  # on INVALID_LENGTH: what the firmware needs
    pdh_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class MeasureResult(CommandResult):
    status: Status
    measurement: bytes = b""  # HMAC-SHA256 measurement (32) || mnonce (16)
    detail: str = ""


@dataclass(frozen=True)
class GuestStatusResult(CommandResult):
    status: Status
    policy: int = 0
    asid: int = 0
    state: GuestState = GuestState.UNINIT
    detail: str = ""


@dataclass(frozen=True)
class SendStartResult(CommandResult):
    status: Status
    session: bytes = b""
    policy: int = 0
    session_len: int = 0  # on INVALID_LENGTH: 128, the length the firmware needs
    detail: str = ""


@dataclass(frozen=True)
class SendUpdateResult(CommandResult):
    status: Status
    header: bytes = b""
    trans: bytes = b""
    hdr_len: int = 0
    trans_len: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ReceiveUpdateResult(CommandResult):
    status: Status
    hdr_len: int = 0  # on INVALID_LENGTH: 52 when the header was too short
    detail: str = ""


@dataclass(frozen=True)
class SendPagesResult(CommandResult):
    status: Status
    headers: bytes = b""  # npages * 52 bytes
    trans: bytes | bytearray = b""  # npages * packet_size bytes (a fresh buffer, the caller's)
    detail: str = ""
