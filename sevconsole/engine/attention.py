"""Guests that need the operator's attention, across the fleet, with the one safe action.

Pure: from host reports and the journal's view of migrations. A guest needs attention when no
copy of it runs, or when a paused or held copy sits beside another copy with no migration in
flight (what a migration whose driver died leaves behind). The action offered is the one
`recover` would take; the console and `discover` show it, and it is run only once confirmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sevconsole.sev.status import GuestState

LEFTOVER = ("inmigrate", "postmigrate", "finish-migrate")


class Fix(StrEnum):
    RECOVER = "recover"  # reconcile the interrupted migration from its journal
    CONT = "cont"  # resume the one copy that can run
    STOP = "stop"  # stop a leftover incoming VM beside the running copy


@dataclass(frozen=True)
class CopySeen:
    host: str
    pid: int | None
    status: str | None
    guest: int | None  # firmware guest state, when the host shows it


@dataclass(frozen=True)
class SafeAction:
    fix: Fix
    sentence: str  # what it does, for the confirmation
    host: str | None = None
    pid: int | None = None
    qmp: str | None = None
    migration_id: str | None = None


@dataclass(frozen=True)
class Attention:
    vm: str
    problem: str
    copies: tuple[CopySeen, ...]
    action: SafeAction | None = None

    def to_json(self) -> dict[str, Any]:
        action = None
        if self.action is not None:
            action = {"fix": self.action.fix.value, "sentence": self.action.sentence, "host": self.action.host,
                      "pid": self.action.pid, "migration": self.action.migration_id}
        return {"vm": self.vm, "problem": self.problem, "action": action,
                "copies": [{"host": c.host, "pid": c.pid, "status": c.status, "guest_state": c.guest}
                           for c in self.copies]}


def _can_run(vm: Any) -> bool:
    """This copy holds a guest that `cont` (or nothing) would run."""
    if vm.status not in ("running", "paused"):
        return False
    state = vm.firmware_guest_state
    return not vm.sev_enabled or state is None or state == GuestState.RUNNING


def find(reports: Sequence[Any], in_flight: Sequence[Any] = (), unfinished: Sequence[Any] = ()) -> list[Attention]:
    """`reports`: HostReports; `in_flight`/`unfinished`: journal entries (vm, source, target, id)."""
    busy = {(e.vm, h) for e in in_flight for h in (e.source, e.target)}
    interrupted = {e.vm: e for e in unfinished}
    by_vm: dict[str, list[tuple[Any, Any]]] = {}
    for report in reports:
        if not report.reachable:
            continue
        for vm in report.vms:
            by_vm.setdefault(vm.name, []).append((report, vm))
    out: list[Attention] = []
    for name in sorted(by_vm):
        pairs = [(r, v) for r, v in by_vm[name] if (name, r.name) not in busy]
        if not pairs or len(pairs) < len(by_vm[name]):
            continue  # a migration owns this guest right now
        copies = tuple(CopySeen(r.name, v.pid, v.status, v.firmware_guest_state) for r, v in pairs)
        running = [(r, v) for r, v in pairs if v.status == "running" and _can_run(v)]
        paused = [(r, v) for r, v in pairs if v.status == "paused" and _can_run(v)]
        leftovers = [(r, v) for r, v in pairs if v.status in LEFTOVER]
        entry = interrupted.get(name)
        if entry is not None:
            out.append(Attention(name, f"its migration {entry.id} ({entry.source} → {entry.target}) was "
                                 "interrupted and its runner is gone", copies,
                                 SafeAction(Fix.RECOVER, f"reconcile migration {entry.id} as `sevconsole "
                                            "recover` does", migration_id=entry.id)))
            continue
        if not running and not paused:
            out.append(Attention(name, "no copy can run (" + ", ".join(
                f"{c.host}: {c.status}" for c in copies) + "); no migration journal says where it went",
                copies))
            continue
        if not running and len(paused) == 1 and (leftovers or len(pairs) > 1):
            host, vm = paused[0]
            out.append(Attention(name, f"no copy runs: the copy on {host.name} is paused beside "
                                 + ", ".join(f"{r.name} ({v.status})" for r, v in pairs if v is not vm),
                                 copies, SafeAction(Fix.CONT, f"resume {name} on {host.name} (cont)",
                                                    host=host.name, pid=vm.pid, qmp=vm.qmp_path)))
            continue
        if len(running) + len(paused) > 1:
            out.append(Attention(name, "more than one copy can run: " + ", ".join(
                f"{r.name} ({v.status})" for r, v in running + paused) + "; check which is current",
                copies))
            continue
        for host, vm in leftovers:
            if vm.status == "inmigrate" and running:
                out.append(Attention(name, f"an incoming copy on {host.name} waits for a migration that "
                                     f"is not in flight, beside the copy running on {running[0][0].name}",
                                     copies, SafeAction(Fix.STOP, f"stop the incoming VM on {host.name} "
                                                        f"(pid {vm.pid})", host=host.name, pid=vm.pid,
                                                        qmp=vm.qmp_path)))
    return out
