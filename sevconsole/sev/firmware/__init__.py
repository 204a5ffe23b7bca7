"""A software model of the SEV firmware (the PSP): platform, guests, LAUNCH and SEND/RECEIVE.

`SevFirmware` answers every command with a frozen result whose first field is a `Status`,
following the rules of sev-reference.md: state machines, lengths (with the needed length
written back), policy (NOSEND, DOMAIN, SEV, API version, reserved bits), integrity (every MAC
checked before anything is decrypted; failures are BAD_MEASUREMENT and leave guest memory as
it was). It mints its own CEK/OCA/PEK/PDH in the real formats, signed by the ASK it is given.

Modules:
  command.py   the one way to define a command (`platform_command`, `guest_command`)
  platform.py  INIT, SHUTDOWN, PLATFORM_STATUS, PEK_GEN, PDH_GEN, PDH_CERT_EXPORT, PEK_CSR,
               PEK_CERT_IMPORT
  launch.py    LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE, LAUNCH_FINISH
  guests.py    ACTIVATE, DEACTIVATE, GUEST_STATUS, DECOMMISSION; guest_write, guest_read
  send.py      SEND_START, SEND_UPDATE_DATA, SEND_UPDATE_VMSA, send_pages (batch), SEND_FINISH,
               SEND_CANCEL
  receive.py   RECEIVE_START, RECEIVE_UPDATE_DATA, RECEIVE_UPDATE_VMSA, receive_pages (batch),
               RECEIVE_FINISH
  checks.py    SEND_START's checks of the target (pure functions preflight can call)
  state.py     platform state, keys, guests, the lock, the log and counts, modelled time
  guest.py     a guest context, the sizes, the checks guest commands share
  keys.py      the platform's CEK/OCA/PEK/PDH;  results.py  results, `Refusal`, `PspTiming`
  model.py     `SevFirmware`

Memory: each guest is given the hypervisor's RAM buffer (bytearray, memoryview or uint8
array). Pages the firmware writes are encrypted at rest with the guest's VEK, tweaked by the
guest physical address (GuestMemoryCipher); the firmware reads and writes it by gpa.

Rules where the reference is silent, chosen and kept consistent: guest commands need the
platform WORKING (it is, whenever a guest exists), then a known handle, then the guest's
state; LAUNCH_START and RECEIVE_START need INIT or WORKING; a SENT guest accepts only
DECOMMISSION (plus the harmless GUEST_STATUS and DEACTIVATE); the target checks at
SEND_START are in checks.py.

Pure: one lock keeps one command in flight; nothing sleeps and the only clock is the one
given (`clock`, for the log). With a `PspTiming` the firmware adds up each command's
modelled cost in `busy_s`; lab/psp.py holds real time to it. Introspection does not wait
for a running command.
"""

from __future__ import annotations

from ..transport import SESSION_LEN
from .checks import CheckOutcome, check_target, parse_pdh
from .guest import CHAIN_LEN, HDR_LEN, MAX_GUEST_LEN, PDH_LEN, GuestAccessError
from .model import SevFirmware
from .results import (
    CommandRecord,
    CommandResult,
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

__all__ = [
    "CHAIN_LEN",
    "HDR_LEN",
    "MAX_GUEST_LEN",
    "PDH_LEN",
    "SESSION_LEN",
    "CheckOutcome",
    "CommandRecord",
    "CommandResult",
    "CsrResult",
    "GuestAccessError",
    "GuestStatusResult",
    "HandleResult",
    "MeasureResult",
    "PdhExportResult",
    "PlatformStatusResult",
    "PspTiming",
    "ReceiveStartResult",
    "ReceiveUpdateResult",
    "Result",
    "SendPagesResult",
    "SendStartResult",
    "SendUpdateResult",
    "SevFirmware",
    "check_target",
    "parse_pdh",
]
