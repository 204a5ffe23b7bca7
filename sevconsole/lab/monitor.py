"""The QMP commands of one lab VM: QEMU's, the SEV migration series', and the lab's `x-` ones.

Answers follow QEMU 7.2 (shapes, error classes and sentences); the SEV migration inputs follow
the never-merged patch series (`migrate-set-parameters` sev-pdh/sev-plat-cert/sev-amd-cert and
the older `migrate-set-sev-info`). The lab's extensions are documented in docs/internals.md.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from sevconsole.sev.pagestate import ENCODING, encode_states
from sevconsole.sev.status import Command, GuestState

from .dirtyrate import ARGS as DIRTY_RATE_ARGS
from .dirtyrate import DirtyRateMeter
from .layout import PAGE_SIZE
from .migration import Fault, IncomingMigration, MigrationError, OutgoingMigration
from .psp import FirmwareError
from .qmp import QEMU_VERSION, Arg, CommandSpec, QmpError

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

DEFAULT_PARAMS: dict[str, Any] = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "compress-level": 1, "compress-threads": 8, "compress-wait-thread": True, "decompress-threads": 2,
    "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False,
    "max-cpu-throttle": 99, "throttle-trigger-threshold": 50, "tls-creds": "", "tls-hostname": "",
    "tls-authz": "", "max-bandwidth": 134217728, "downtime-limit": 300, "x-checkpoint-delay": 20000,
    "block-incremental": False, "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "multifd-compression": "none", "multifd-zlib-level": 1,
    "multifd-zstd-level": 1, "sev-pdh": "", "sev-plat-cert": "", "sev-amd-cert": "",
}
SETTABLE: dict[str, Arg] = {
    "downtime-limit": Arg("uint"), "max-bandwidth": Arg("uint"), "x-checkpoint-delay": Arg("uint"),
    "multifd-channels": Arg("uint"), "max-postcopy-bandwidth": Arg("uint"),
    "sev-pdh": Arg("str"), "sev-plat-cert": Arg("str"), "sev-amd-cert": Arg("str"),
}
MAX_DOWNTIME_MS = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME
# QEMU 7.2's MigrationCapability names. The lab implements `events` (MIGRATION and
# MIGRATION_PASS are sent only with it on, as QEMU does); the others may only stay off.
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
    "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt",
)
IMPLEMENTED_CAPABILITIES = ("events",)
FAULTS = ("none", "tamper-packet", "cut-link")
MAX_DIRTY_RATE = 1_000_000  # pages/s, about 4 GB/s: beyond any guest the lab can model


class Monitor:
    """Binds QMP commands to one VM on one host."""

    def __init__(self, host: LabHost, vm: LabVm) -> None:
        self.host = host
        self.vm = vm
        self.params: dict[str, Any] = dict(DEFAULT_PARAMS)
        self.fault = Fault()
        self.dirty_rate = DirtyRateMeter(vm)  # calc-dirty-rate / query-dirty-rate (lab/dirtyrate.py)
        vm.params = self.params

    def commands(self) -> dict[str, CommandSpec]:
        c = CommandSpec
        specs = [
            c("query-status", self.query_status),
            c("query-name", self.query_name),
            c("query-commands", self.query_commands),
            c("query-version", self.query_version),
            c("query-sev", self.query_sev),
            c("query-sev-capabilities", self.query_sev_capabilities),
            c("migrate-set-parameters", self.migrate_set_parameters, dict(SETTABLE)),
            c("query-migrate-parameters", self.query_migrate_parameters),
            c("migrate-set-capabilities", self.migrate_set_capabilities, {"capabilities": Arg("list", True)}),
            c("query-migrate-capabilities", self.query_migrate_capabilities),
            c("query-memory-size-summary", self.query_memory_size_summary),
            c("migrate-set-sev-info", self.migrate_set_sev_info,
              {"pdh": Arg("str", True), "plat-cert": Arg("str", True), "amd-cert": Arg("str", True)}),
            c("migrate-sev-set-info", self.migrate_set_sev_info,
              {"pdh": Arg("str", True), "plat-cert": Arg("str", True), "amd-cert": Arg("str", True)}),
            c("migrate", self.migrate, {"uri": Arg("str", True), "blk": Arg("bool"), "inc": Arg("bool"),
                                        "detach": Arg("bool"), "resume": Arg("bool")}),
            c("migrate-incoming", self.migrate_incoming, {"uri": Arg("str", True)}),
            c("migrate_cancel", self.migrate_cancel),
            c("query-migrate", self.query_migrate),
            c("stop", self.stop),
            c("cont", self.cont),
            c("quit", self.quit),
            c("calc-dirty-rate", self.dirty_rate.calc, DIRTY_RATE_ARGS),
            c("query-dirty-rate", self.dirty_rate.query),
            c("x-query-sev-page-state", self.x_page_state),
            c("x-query-sev-firmware", self.x_firmware),
            c("x-query-guest-digest", self.x_digest),
            c("x-lab-inject-fault", self.x_inject_fault, {"fault": Arg("str", True), "after-pages": Arg("uint")}),
            c("x-sev-receive-finish", self.x_receive_finish),
            c("x-lab-set", self.x_lab_set, {"dirty-rate": Arg("uint"), "digest-on-send": Arg("bool")}),
        ]
        return {s.name: s for s in specs}

    # --- QEMU basics ----------------------------------------------------------------------

    def query_status(self, args: dict) -> dict:
        return {"status": self.vm.status, "singlestep": False, "running": self.vm.running}

    def query_name(self, args: dict) -> dict:
        return {"name": self.vm.name}

    def query_commands(self, args: dict) -> list:
        return [{"name": name} for name in self.host.monitor_commands(self.vm)]

    def query_version(self, args: dict) -> dict:
        return dict(QEMU_VERSION)

    def stop(self, args: dict) -> dict:
        if self.vm.incoming:
            self.vm.autostart = False  # QEMU: stays paused once the incoming migration completes
            return {}
        if self.vm.status == "running":
            self.vm.set_status("paused")
        return {}

    def cont(self, args: dict) -> dict:
        vm = self.vm
        if vm.incoming:
            vm.autostart = True  # QEMU: runs once the incoming migration completes
            return {}
        if vm.status == "postmigrate" and vm.sev:
            raise QmpError(f"{vm.name} was migrated away (its SEV guest is SENT): it cannot run on "
                           f"{self.host.name} again; quit this VM")
        if vm.status in ("paused", "postmigrate", "prelaunch"):
            vm.set_status("running")
        return {}

    def quit(self, args: dict) -> dict:
        self.host.quit_vm(self.vm)
        return {}

    # --- SEV ------------------------------------------------------------------------------

    def _require_sev(self) -> None:
        if not self.vm.sev:
            raise QmpError("SEV feature is not available")

    def query_sev(self, args: dict) -> dict:
        self._require_sev()
        vm, fw = self.vm, self.host.psp.fw
        handle = vm.handle or 0
        state = fw.guest_state(handle) if handle else GuestState.UNINIT
        return {"enabled": True, "api-major": fw.api[0], "api-minor": fw.api[1], "build-id": fw.build,
                "policy": vm.policy, "state": SEV_STATE[state], "handle": handle, "sev-type": "sev"}

    def query_sev_capabilities(self, args: dict) -> dict:
        if not self.vm.sev:
            raise QmpError("SEV is not enabled in KVM")
        res = self.host.psp.call("pdh_cert_export")
        return {"pdh": base64.b64encode(res.pdh).decode(), "cert-chain": base64.b64encode(res.cert_chain).decode(),
                "cpu0-id": base64.b64encode(self.host.cpu0_id).decode(),
                "cbitpos": self.host.cbitpos, "reduced-phys-bits": self.host.reduced_phys_bits}

    # --- migration ------------------------------------------------------------------------

    def migrate_set_parameters(self, args: dict) -> dict:
        if "downtime-limit" in args and args["downtime-limit"] > MAX_DOWNTIME_MS:
            raise QmpError("Parameter 'downtime_limit' expects an integer in the range of 0 to "
                           f"{MAX_DOWNTIME_MS} milliseconds")
        for key in ("sev-pdh", "sev-plat-cert", "sev-amd-cert"):
            if args.get(key):
                _b64(args[key], key)
        self.params.update(args)
        return {}

    def migrate_set_capabilities(self, args: dict) -> dict:
        wanted: dict[str, bool] = {}
        for i, item in enumerate(args["capabilities"]):
            where = f"capabilities[{i}]"
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise QmpError(f"Parameter '{where}' expects MigrationCapabilityStatus")
            name, state = item["capability"], item["state"]
            if name not in CAPABILITIES:
                raise QmpError(f"Parameter '{where}.capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise QmpError(f"Parameter '{where}.state' expects boolean")
            if state and name not in IMPLEMENTED_CAPABILITIES:
                raise QmpError(f"{self.vm.name}: the lab does not implement the migration capability '{name}'")
            wanted[name] = state
        mig = self.vm.migration
        if isinstance(mig, OutgoingMigration) and mig.stats.status in ("setup", "active", "cancelling"):
            raise QmpError("There's a migration process in progress")
        self.vm.capabilities.update(wanted)
        return {}

    def query_migrate_capabilities(self, args: dict) -> list:
        return [{"capability": name, "state": bool(self.vm.capabilities.get(name, False))} for name in CAPABILITIES]

    def query_memory_size_summary(self, args: dict) -> dict:
        return {"base-memory": self.vm.mem_bytes}

    def query_migrate_parameters(self, args: dict) -> dict:
        return dict(self.params)

    def migrate_set_sev_info(self, args: dict) -> dict:
        for qkey, pkey in (("pdh", "sev-pdh"), ("plat-cert", "sev-plat-cert"), ("amd-cert", "sev-amd-cert")):
            _b64(args[qkey], qkey)
            self.params[pkey] = args[qkey]
        return {}

    def migrate(self, args: dict) -> dict:
        vm = self.vm
        if vm.incoming:
            raise QmpError("Guest is waiting for an incoming migration")
        current = vm.migration
        if isinstance(current, OutgoingMigration) and current.stats.status in ("setup", "active", "cancelling"):
            raise QmpError("There's a migration process in progress")
        if vm.status == "postmigrate" and vm.sev:
            raise QmpError(f"{vm.name} was already migrated away (SENT): only DECOMMISSION is left for it here")
        mig = OutgoingMigration(vm, args["uri"], self.params, self.host.emitter(vm), self.fault)
        vm.migration = mig
        mig.start()
        return {}

    def migrate_incoming(self, args: dict) -> dict:
        vm = self.vm
        if not vm.incoming:
            raise QmpError("'-incoming' was not specified on the command line")
        if vm.migration is not None:
            raise QmpError("The incoming migration has already been started")
        try:
            mig = IncomingMigration(vm, args["uri"], self.host.emitter(vm), self.host.discard_vm)
        except MigrationError as exc:
            raise QmpError(str(exc)) from None
        vm.migration = mig
        mig.start()
        return {}

    def migrate_cancel(self, args: dict) -> dict:
        mig = self.vm.migration
        if isinstance(mig, OutgoingMigration):
            mig.request_cancel()
        return {}

    def query_migrate(self, args: dict) -> dict:
        mig = self.vm.migration
        if mig is None:
            return {}
        return mig.info() if isinstance(mig, IncomingMigration) else mig.stats.info()

    # --- lab extensions -------------------------------------------------------------------

    def x_page_state(self, args: dict) -> dict:
        with self.vm.lock:
            data = encode_states(self.vm.states)
        return {"page-size": PAGE_SIZE, "count": self.vm.pages, "encoding": ENCODING, "data": data}

    def x_firmware(self, args: dict) -> dict:
        fw, vm = self.host.psp.fw, self.vm
        handle = vm.handle or 0
        state = fw.guest_state(handle) if handle else GuestState.UNINIT
        log = fw.log[-64:]
        return {
            "platform-state": int(fw.platform_state), "guest-state": int(state),
            "guest-state-name": state.name, "handle": handle,
            "api-major": fw.api[0], "api-minor": fw.api[1], "build": fw.build,
            "counts": {Command(k).name: v for k, v in fw.counts.items()},
            "last-status": int(fw.last_status),
            "log": [{"command": r.command.name, "status": int(r.status), "time": r.time,
                     "handle": r.handle} for r in log],
        }

    def x_digest(self, args: dict) -> dict:
        try:
            return {"sha256": self.vm.digest()}
        except Exception as exc:
            raise QmpError(f"{self.vm.name}: the guest's memory cannot be read now: {exc}") from None

    def x_inject_fault(self, args: dict) -> dict:
        if args["fault"] not in FAULTS:
            raise QmpError(f"Parameter 'fault' expects one of {', '.join(FAULTS)}")
        self.fault.kind = args["fault"]
        self.fault.after_pages = args.get("after-pages", 0)
        self.fault.fired = False
        return {}


    def x_receive_finish(self, args: dict) -> dict:
        """Runs an incoming guest held after its link died between READY and FINISHED."""
        mig = self.vm.migration
        if not isinstance(mig, IncomingMigration):
            raise QmpError(f"{self.vm.name} has no incoming migration")
        try:
            mig.finish_held()
        except (MigrationError, FirmwareError) as exc:
            raise QmpError(str(exc)) from None
        return {}

    def x_lab_set(self, args: dict) -> dict:
        """Lab knobs: the guest workload's dirty rate (pages/s) and whether the source records
        the guest's digest while stopped for the last copy (costs downtime; tests use it)."""
        if "dirty-rate" in args:
            if args["dirty-rate"] > MAX_DIRTY_RATE:
                raise QmpError(f"Parameter 'dirty-rate' must be at most {MAX_DIRTY_RATE} pages/s")
            self.vm.workload.rate = float(args["dirty-rate"])
            if self.vm.running:
                self.vm.workload.start()
        if "digest-on-send" in args:
            self.vm.digest_on_send = args["digest-on-send"]
        return {}


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise QmpError(f"Parameter '{name}' is not valid base64") from None
