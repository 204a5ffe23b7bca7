"""The SEV commands of a lab VM's monitor: QEMU 7.2's upstream ones and the migration series'.

Upstream (target/i386/sev.c, answers and sentences of 7.2): `query-sev` (a VM without SEV
answers `enabled: false` with zeros; 7.2 has no `sev-type`), `query-sev-capabilities` (any VM
of an SEV host: the PDH and chain come from the platform, not the guest),
`query-sev-launch-measure` (LAUNCH_MEASURE's answer of a guest launched here; an incoming guest
has none) and `query-sev-attestation-report` (mnonce checked as QEMU does).

The migration series (never merged): `migrate-set-sev-info` (and its other spelling
`migrate-sev-set-info`) hands the target's PDH and chains to the source, like the
migration parameters sev-pdh/sev-plat-cert/sev-amd-cert.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import TYPE_CHECKING, Any

from sevconsole.sev.status import GuestState

from .qapi import Str
from .qapi import struct as qstruct
from .qmp import CommandSpec, QmpError

if TYPE_CHECKING:
    from .host import LabHost
    from .vm import LabVm

# QEMU's SevState names; the firmware's SENT has no QEMU name (the series left it out).
SEV_STATE = {
    GuestState.UNINIT: "uninit",
    GuestState.LUPDATE: "launch-update",
    GuestState.LSECRET: "launch-secret",
    GuestState.RUNNING: "running",
    GuestState.SUPDATE: "send-update",
    GuestState.RUPDATE: "receive-update",
    GuestState.SENT: "send-update",
}
MNONCE_LEN = 16
NO_SIGNATURE = 0x1000  # the SEV certificate's "no key" usage: the lab's report is not signed
SEV_INFO_ARGS = qstruct(("pdh", Str(), False), ("plat-cert", Str(), False), ("amd-cert", Str(), False))
_B64_ALPHABET = re.compile(rb"[^A-Za-z0-9+/]")


class SevCommands:
    def __init__(self, host: LabHost, vm: LabVm, params: dict[str, Any]) -> None:
        self.host = host
        self.vm = vm
        self.params = params

    def specs(self) -> list[CommandSpec]:
        c = CommandSpec
        return [
            c("query-sev", self.query_sev),
            c("query-sev-capabilities", self.query_sev_capabilities),
            c("query-sev-launch-measure", self.query_sev_launch_measure),
            c("query-sev-attestation-report", self.query_sev_attestation_report,
              qstruct(("mnonce", Str(), False))),
            c("migrate-set-sev-info", self.migrate_set_sev_info, SEV_INFO_ARGS),
            c("migrate-sev-set-info", self.migrate_set_sev_info, SEV_INFO_ARGS),
        ]

    def _guest_state(self) -> GuestState:
        handle = self.vm.handle or 0
        return self.host.psp.fw.guest_state(handle) if handle else GuestState.UNINIT

    def query_sev(self, args: dict) -> dict:
        vm, fw = self.vm, self.host.psp.fw
        if not vm.sev:
            return {"enabled": False, "api-minor": 0, "handle": 0, "state": "uninit", "api-major": 0,
                    "build-id": 0, "policy": 0}
        return {"enabled": True, "api-major": fw.api[0], "api-minor": fw.api[1], "build-id": fw.build,
                "policy": vm.policy, "state": SEV_STATE[self._guest_state()], "handle": vm.handle or 0}

    def query_sev_capabilities(self, args: dict) -> dict:
        res = self.host.psp.call(self.host.psp.fw.pdh_cert_export)
        return {"pdh": base64.b64encode(res.pdh).decode(), "cert-chain": base64.b64encode(res.cert_chain).decode(),
                "cpu0-id": base64.b64encode(self.host.cpu0_id).decode(),
                "cbitpos": self.host.cbitpos, "reduced-phys-bits": self.host.reduced_phys_bits}

    def query_sev_launch_measure(self, args: dict) -> dict:
        if not self.vm.sev or self.vm.measurement is None:
            raise QmpError("SEV launch measurement is not available")
        return {"data": base64.b64encode(self.vm.measurement).decode()}

    def query_sev_attestation_report(self, args: dict) -> dict:
        """The report's layout (SEV API, ATTESTATION): mnonce, launch digest, policy, then the
        signature slot; the lab's firmware model has no ATTESTATION command, so the slot says
        "no signature" (usage 0x1000) and is zero."""
        vm = self.vm
        if not vm.sev:
            raise QmpError("SEV is not enabled")
        mnonce = _glib_b64decode(args["mnonce"])
        if len(mnonce) != MNONCE_LEN:
            raise QmpError(f"SEV: mnonce must be {MNONCE_LEN} bytes (got {len(mnonce)})")
        if self._guest_state() is not GuestState.RUNNING or vm.launch_digest is None:
            raise QmpError("SEV: Failed to query the attestation report length ret=-1 fw_err=2 "
                           "(Guest state is invalid)")
        report = (mnonce + vm.launch_digest + struct.pack("<IIII", vm.policy, NO_SIGNATURE, 0, 0)
                  + bytes(144))
        return {"data": base64.b64encode(report).decode()}

    def migrate_set_sev_info(self, args: dict) -> dict:
        for qkey, pkey in (("pdh", "sev-pdh"), ("plat-cert", "sev-plat-cert"), ("amd-cert", "sev-amd-cert")):
            check_base64(args[qkey], qkey)
            self.params[pkey] = args[qkey]
        return {}


def check_base64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise QmpError(f"Parameter '{name}' is not valid base64") from None


def _glib_b64decode(text: str) -> bytes:
    """g_base64_decode: characters outside the alphabet are skipped, never an error."""
    data = _B64_ALPHABET.sub(b"", text.encode("utf-8", "replace"))
    if len(data) % 4 == 1:
        data = data[:-1]  # a lone sixth of a byte carries nothing
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data)
    except (ValueError, binascii.Error):
        return b""
