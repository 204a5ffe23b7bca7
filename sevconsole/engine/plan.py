"""MigrationPlan: what the operator asked for, with the two host pictures it was decided on."""

from __future__ import annotations

from dataclasses import dataclass

from sevconsole.hosts.report import HostReport, VmInfo

DEFAULT_DOWNTIME_MS = 300  # QEMU's own default downtime-limit


@dataclass(frozen=True)
class MigrationPlan:
    vm: VmInfo
    source: HostReport
    target: HostReport
    downtime_limit_ms: int = DEFAULT_DOWNTIME_MS
    bandwidth_bps: int | None = None  # bytes/s cap (QEMU max-bandwidth); None keeps QEMU's
    stall_warn_s: float = 10.0
    stall_timeout_s: float = 60.0
    keep_source: bool = False  # leave the source QEMU (postmigrate/SENT) after a confirmed migration

    @property
    def sev(self) -> bool:
        return self.vm.sev_enabled

    def describe(self) -> str:
        kind = "SEV" if self.sev else "plain"
        return f"{kind} migration of {self.vm.name} from {self.source.name} to {self.target.name}"
