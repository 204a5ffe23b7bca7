"""The SEV firmware's numbers: status codes, guest and platform states, command ids.

Values follow the SEV API (sev-reference.md sections 1 and 2). The guest states use the
firmware numbering (SUPDATE 4, RUPDATE 5), which the kernel documentation swaps.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18

    @property
    def ok(self) -> bool:
        return self is Status.SUCCESS


# What each failure means to an operator, for messages that name the status.
STATUS_MEANING: dict[Status, str] = {
    Status.SUCCESS: "the command succeeded",
    Status.INVALID_PLATFORM_STATE: "the platform is not in a state that allows this command",
    Status.INVALID_GUEST_STATE: "the guest is not in a state that allows this command",
    Status.INVALID_CONFIG: "the platform configuration is invalid",
    Status.INVALID_LENGTH: "a buffer length is wrong (the firmware wrote back the length it needs)",
    Status.ALREADY_OWNED: "the platform already has an external owner",
    Status.INVALID_CERTIFICATE: "a certificate is malformed or of the wrong kind",
    Status.POLICY_FAILURE: "the guest policy forbids this (NOSEND, DOMAIN, SEV, API version or reserved bits)",
    Status.INACTIVE: "the guest is not active",
    Status.INVALID_ADDRESS: "a guest address is misaligned or outside guest memory",
    Status.BAD_SIGNATURE: "a certificate signature does not verify",
    Status.BAD_MEASUREMENT: "an integrity check failed (wrap_mac, policy_mac or packet MAC)",
    Status.ASID_OWNED: "the ASID is already in use by another guest",
    Status.INVALID_ASID: "the ASID is out of range",
    Status.WBINVD_REQUIRED: "a WBINVD is required first",
    Status.DFFLUSH_REQUIRED: "a DF_FLUSH is required first",
    Status.INVALID_GUEST: "no guest has this handle",
    Status.INVALID_COMMAND: "the command is not known",
    Status.ACTIVE: "the guest is still active",
    Status.HWERROR_PLATFORM: "hardware error (platform)",
    Status.HWERROR_UNSAFE: "hardware error (unsafe)",
    Status.UNSUPPORTED: "the firmware does not support this (for example compressed packets)",
    Status.INVALID_PARAM: "a parameter is invalid",
    Status.RESOURCE_LIMIT: "the firmware ran out of a resource",
    Status.SECURE_DATA_INVALID: "secure data is invalid",
}


class GuestState(IntEnum):
    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


class PlatformState(IntEnum):
    UNINIT = 0
    INIT = 1
    WORKING = 2


class Command(IntEnum):
    INIT = 0x01
    SHUTDOWN = 0x02
    PLATFORM_RESET = 0x03
    PLATFORM_STATUS = 0x04
    PEK_GEN = 0x05
    PEK_CSR = 0x06
    PEK_CERT_IMPORT = 0x07
    PDH_CERT_EXPORT = 0x08
    PDH_GEN = 0x09
    DF_FLUSH = 0x0A
    GET_ID = 0x0C
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    DEACTIVATE = 0x22
    GUEST_STATUS = 0x23
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53


# Platform flags of PLATFORM_STATUS.
FLAG_OWNER_EXTERNAL = 0x0001
FLAG_ES_CONFIGURED = 0x0100
