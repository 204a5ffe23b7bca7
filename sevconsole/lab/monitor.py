"""The QMP commands of one lab VM: QEMU's generic ones, the SEV ones (`sev_commands`), the
evacuation's dirty-rate pair (`dirtyrate`) and the lab's `x-` extensions.

Generic commands answer as QEMU 7.2 (shapes, error classes and sentences, the order of its
checks); argument checks are the QAPI visitor's (`qapi`), migration parameters and
capabilities QEMU's rules (`params`), URIs QEMU's parsing (`uri`). The lab's extensions and
what differs on purpose are documented in docs/internals.md.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sevconsole.sev.pagestate import ENCODING, encode_states
from sevconsole.sev.status import Command, GuestState

from . import params as mp
from . import uri
from .dirtyrate import ARGS as DIRTY_RATE_ARGS
from .dirtyrate import DirtyRateMeter
from .layout import PAGE_SIZE
from .migration import Fault, IncomingMigration, MigrationError, OutgoingMigration
from .psp import FirmwareError
from .qapi import Bool, Enum, QapiError, Str, Uint, struct
from .qmp import QEMU_VERSION, CommandSpec, QmpError
from .sev_commands import SevCommands, check_base64

if TYPE_CHECKING:
    from .host import LabHost
    from .vm import LabVm

FAULTS = ("none", "tamper-packet", "cut-link")
MAX_DIRTY_RATE = 1_000_000  # pages/s, about 4 GB/s: beyond any guest the lab can model
ACTIVE = ("setup", "active", "cancelling")  # QEMU's migration_is_running(), as the lab has them
MIGRATE_ARGS = struct(("uri", Str(), False), ("blk", Bool()), ("inc", Bool()), ("detach", Bool()),
                      ("resume", Bool()))


class Monitor:
    """Binds QMP commands to one VM on one host."""

    def __init__(self, host: LabHost, vm: LabVm) -> None:
        self.host = host
        self.vm = vm
        self.params: dict[str, Any] = dict(mp.DEFAULT_PARAMS)
        self.fault = Fault()
        self.dirty_rate = DirtyRateMeter(vm)  # calc-dirty-rate / query-dirty-rate (lab/dirtyrate.py)
        self.sev = SevCommands(host, vm, self.params)
        vm.params = self.params

    def commands(self) -> dict[str, CommandSpec]:
        c = CommandSpec
        specs = [
            c("query-status", self.query_status),
            c("query-name", self.query_name),
            c("query-commands", self.query_commands),
            c("query-version", self.query_version),
            *self.sev.specs(),
            c("migrate-set-parameters", self.migrate_set_parameters, mp.SET_PARAMETERS),
            c("query-migrate-parameters", self.query_migrate_parameters),
            c("migrate-set-capabilities", self.migrate_set_capabilities, mp.SET_CAPABILITIES),
            c("query-migrate-capabilities", self.query_migrate_capabilities),
            c("query-memory-size-summary", self.query_memory_size_summary),
            c("migrate", self.migrate, MIGRATE_ARGS),
            c("migrate-incoming", self.migrate_incoming, struct(("uri", Str(), False))),
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
            c("x-lab-inject-fault", self.x_inject_fault,
              struct(("fault", Enum(FAULTS), False), ("after-pages", Uint()))),
            c("x-sev-receive-finish", self.x_receive_finish),
            c("x-lab-set", self.x_lab_set, struct(("dirty-rate", Uint()), ("digest-on-send", Bool()))),
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

    def query_memory_size_summary(self, args: dict) -> dict:
        return {"base-memory": self.vm.mem_bytes, "plugged-memory": 0}

    def stop(self, args: dict) -> dict:
        if self.vm.incoming:
            self.vm.autostart = False  # QEMU: stays paused once the incoming migration completes
        elif self.vm.status == "running":
            self.vm.set_status("paused")  # STOP goes out before this answer, as in QEMU
        return {}

    def cont(self, args: dict) -> dict:
        vm = self.vm
        if vm.status == "finish-migrate":
            raise QmpError("Migration is not finalized yet")
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

    # --- migration ------------------------------------------------------------------------

    def _outgoing_active(self) -> bool:
        mig = self.vm.migration
        return isinstance(mig, OutgoingMigration) and mig.stats.status in ACTIVE

    def migrate_set_parameters(self, args: dict) -> dict:
        for key in mp.SEV_PARAMS:
            if args.get(key):
                check_base64(args[key], key)
        try:
            self.params.update(mp.apply_parameters(self.params, args, self.vm.capabilities))
        except QapiError as exc:
            raise QmpError(str(exc)) from None
        return {}

    def query_migrate_parameters(self, args: dict) -> dict:
        return mp.query_parameters(self.params)

    def migrate_set_capabilities(self, args: dict) -> dict:
        if self._outgoing_active():
            raise QmpError("There's a migration process in progress")
        try:
            caps = mp.apply_capabilities(self.vm.capabilities, args["capabilities"], self.params)
        except QapiError as exc:
            raise QmpError(str(exc)) from None
        self.vm.capabilities.clear()
        self.vm.capabilities.update(caps)
        return {}

    def query_migrate_capabilities(self, args: dict) -> list:
        return mp.query_capabilities(self.vm.capabilities)

    def migrate(self, args: dict) -> dict:
        """qmp_migrate: migrate_prepare's checks in QEMU's order, then the URI; a refused URI
        still leaves a failed migration behind (setup, failed), as in QEMU."""
        vm = self.vm
        if args.get("resume"):
            raise QmpError("Cannot resume if there is no paused migration")
        if self._outgoing_active():
            raise QmpError("There's a migration process in progress")
        if vm.incoming:
            raise QmpError("Guest is waiting for an incoming migration")
        if vm.status == "postmigrate":
            raise QmpError("Can't migrate the vm that was paused due to previous migration")
        if vm.blockers:
            raise QmpError(vm.blockers[-1])
        if (args.get("blk") or args.get("inc")) and self.vm.capabilities.get("block"):
            raise QmpError("Command options are incompatible with current migration capabilities")
        unmodelled = [c for c in mp.UNMODELLED_AT_MIGRATE if vm.capabilities.get(c)]
        if unmodelled:
            raise QmpError(f"{vm.name}: the lab does not model the migration capability '{unmodelled[0]}'; "
                           "turn it off to migrate")
        mig = OutgoingMigration(vm, self.params, self.host.emitter(vm), self.fault)
        vm.migration = mig
        mig.announce()
        try:
            address = uri.parse(args["uri"], incoming=False)
        except uri.UriError as exc:
            mig.fail_at_once(str(exc) if exc.recorded else None)
            raise QmpError(str(exc)) from None
        # QEMU connects from its main loop, after this answer: start once the answer is out
        asyncio.get_running_loop().call_soon(mig.start, address)
        return {}

    def migrate_incoming(self, args: dict) -> dict:
        vm = self.vm
        if isinstance(vm.migration, IncomingMigration):
            raise QmpError("The incoming migration has already been started")
        if not vm.incoming:
            raise QmpError("'-incoming' was not specified on the command line")
        self.host.emit(vm, "MIGRATION", {"status": "setup"})  # QEMU sends it whatever the capabilities
        try:
            listeners = uri.listen(uri.parse(args["uri"], incoming=True))
        except (uri.UriError, uri.ConnectError) as exc:
            raise QmpError(str(exc)) from None
        mig = IncomingMigration(vm, listeners, self.host.emitter(vm), self.host.discard_vm)
        vm.migration = mig
        mig.start()
        return {}

    def migrate_cancel(self, args: dict) -> dict:
        mig = self.vm.migration
        if isinstance(mig, OutgoingMigration) and mig.mark_cancelling():  # before this answer
            asyncio.get_running_loop().call_soon(mig.cancel.set)
        return {}

    def query_migrate(self, args: dict) -> dict:
        mig = self.vm.migration
        info: dict[str, Any] = {}
        if isinstance(mig, IncomingMigration):
            info = mig.info()
        elif isinstance(mig, OutgoingMigration):
            info = mig.stats.info()
        if self.vm.blockers:
            info["blocked-reasons"] = list(self.vm.blockers)
        return info

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

