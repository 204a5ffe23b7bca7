"""What the console needs from the world, behind one small Protocol (Harlequin's pattern).

Screens never open SSH or QMP themselves: `probe` blocks and runs in thread workers, a
migration runs as a coroutine in an async worker. The live backend adapts hosts/ and engine/;
tests and screenshots use a scripted one that replays HostReports and Progress snapshots.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sevconsole.engine.attention import Attention, SafeAction
from sevconsole.engine.checks import Check
from sevconsole.engine.journal import Entry
from sevconsole.engine.progress import Progress
from sevconsole.engine.recover import Reconciled
from sevconsole.engine.replay import Tape
from sevconsole.engine.run import Outcome
from sevconsole.hosts.report import HostReport, VmInfo


@dataclass(frozen=True)
class HostKeyQuestion:
    """An unknown host key: the operator decides. Changed keys are refused, never asked."""

    host: str
    key_type: str
    fingerprint: str  # SHA256:... as ssh-keygen prints it
    message: str


class HostKeyPending(Exception):
    """`probe` raises this when the host's key is unknown; carries the question to ask."""

    def __init__(self, question: HostKeyQuestion) -> None:
        super().__init__(question.message)
        self.question = question


class MigrationHandle(Protocol):
    def run(self) -> Awaitable[Outcome]: ...

    def cancel(self, reason: str = ...) -> None: ...


ProgressSink = Callable[[Progress], None]


class ConsoleBackend(Protocol):
    lab: bool  # hosts are lab hosts (the lab root is trusted for them)

    def host_names(self) -> Sequence[str]:
        """Inventory order; quick (no network)."""
        ...

    def probe(self, name: str) -> HostReport:
        """Blocking: SSH in, run the helper's probe, query QMP. Raises HostKeyPending."""
        ...

    def accept_host_key(self, question: HostKeyQuestion) -> None:
        """Blocking: record the key in the console's known_hosts."""
        ...

    def preflight(self, vm: VmInfo, source: HostReport, target: HostReport,
                  downtime_limit_ms: int) -> list[Check]:
        """Pure: the engine's checks for this plan."""
        ...

    def migration(self, vm: VmInfo, source: HostReport, target: HostReport,
                  downtime_limit_ms: int, checks: Sequence[Check],
                  on_progress: ProgressSink, bandwidth_bps: int | None = None) -> MigrationHandle:
        ...

    async def lab_command(self, host: HostReport, vm: VmInfo, command: str,
                          arguments: dict[str, Any]) -> Any:
        """A lab-only QMP command (x-lab-...) to `vm` on `host`; the guide's failure demos."""
        ...

    def close(self) -> None: ...

    # durable migrations: runners own them, the journal lists them (engine/journal.py, recover.py)
    def attach(self, migration_id: str, on_progress: ProgressSink) -> MigrationHandle:
        """A handle on a migration in flight, started by any console or `migrate`."""
        ...

    def migrations(self) -> list[Entry]:
        """Blocking: every migration from the journal, newest first."""
        ...

    def recover(self) -> list[Reconciled]:
        """Blocking: reconcile this fleet's migrations whose runner is gone."""
        ...

    def attention(self, reports: Sequence[HostReport]) -> list[Attention]:
        """Blocking (reads the journal): guests needing attention, with their safe action."""
        ...

    async def apply_fix(self, action: SafeAction) -> str:
        """Run an attention item's safe action (already confirmed); returns what happened."""
        ...

    # the overview and replay
    def replay(self, migration_id: str) -> Tape:
        """Blocking: the snapshots a finished migration recorded (engine.replay.Tape); raises
        ReplayError with a sentence when there are none."""
        ...

    def audit_tail(self, limit: int) -> list[dict[str, Any]]:
        """Blocking: the last `limit` audit log lines, oldest first (migrations older than the journal)."""
        ...


RUNNABLE = ("running", "paused")


def find_vm(report: HostReport, name: str) -> VmInfo | None:
    """The VM called `name`, preferring a runnable one: after a migration the host may also hold
    the SENT copy (QEMU postmigrate) or a failed incoming one under the same name."""
    matches = [vm for vm in report.vms if vm.name == name]
    return next((vm for vm in matches if vm.status in RUNNABLE), matches[0] if matches else None)
