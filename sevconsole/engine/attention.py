"""Guests that need the operator's attention, across the fleet, with the one safe action.

Pure: from host reports and the journal's view of migrations. A guest needs attention when no
copy of it runs, or when a paused or held copy sits beside another copy with no migration in
flight (what a migration whose driver died leaves behind). The action offered is the one
`recover` would take; the console and `discover` show it, and it is run only once confirmed.

With `fleet=True` (the console's overview) the list also names what keeps the operator from
seeing a guest at all: hosts that do not answer, host keys refused or not yet accepted, QMP
monitors held by another client; and stale source copies (SENT or postmigrate) left beside the
running copy, with stopping them as the safe action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sevconsole.sev.status import GuestState

LEFTOVER = ("inmigrate", "postmigrate", "finish-migrate")
HELD_MONITOR = "another client may hold it"  # hosts/qmp.py's sentence for a monitor with no greeting


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
    vm: str  # "" for an item about a host
    problem: str
    copies: tuple[CopySeen, ...]
    action: SafeAction | None = None
    # guest (the copies above), host-down, host-key-changed, host-key-unknown, monitor-held, stale-copy
    kind: str = "guest"
    host: str | None = None  # the host the item is about, when it is one host's

    def to_json(self) -> dict[str, Any]:
        action = None
        if self.action is not None:
            action = {"fix": self.action.fix.value, "sentence": self.action.sentence, "host": self.action.host,
                      "pid": self.action.pid, "migration": self.action.migration_id}
        return {"vm": self.vm, "problem": self.problem, "action": action, "kind": self.kind, "host": self.host,
                "copies": [{"host": c.host, "pid": c.pid, "status": c.status, "guest_state": c.guest}
                           for c in self.copies]}


def _can_run(vm: Any) -> bool:
    """This copy holds a guest that `cont` (or nothing) would run."""
    if vm.status not in ("running", "paused"):
        return False
    state = vm.firmware_guest_state
    return not vm.sev_enabled or state is None or state == GuestState.RUNNING


def _unseen(vm: Any) -> bool:
    """Discovery could not ask this copy's QEMU (no status): it proves neither way whether it runs."""
    return vm.status is None and bool(vm.errors)


def _host_items(reports: Sequence[Any]) -> list[Attention]:
    out = []
    for report in reports:
        key = getattr(report, "host_key", None)
        why = report.errors[0] if report.errors else "it did not answer its probe"
        if key is not None and key.status == "changed":
            out.append(Attention("", f"{report.name}'s SSH host key changed ({key.fingerprint}, known "
                                     f"{key.known_fingerprint}): refused, as always", (),
                                 kind="host-key-changed", host=report.name))
        elif key is not None:
            out.append(Attention("", f"{report.name} offers an SSH host key not known yet ({key.fingerprint}); "
                                     "accept it once checked", (), kind="host-key-unknown", host=report.name))
        elif not report.reachable:
            out.append(Attention("", f"{report.name} cannot be reached: {why}", (), kind="host-down",
                                 host=report.name))
    return out


def find(reports: Sequence[Any], in_flight: Sequence[Any] = (), unfinished: Sequence[Any] = (), *,
         fleet: bool = False) -> list[Attention]:
    """`reports`: HostReports; `in_flight`/`unfinished`: journal entries (vm, source, target, id).
    `fleet`: also hosts that cannot be seen, held monitors and stale copies (see the module)."""
    busy = {(e.vm, h) for e in in_flight for h in (e.source, e.target)}
    interrupted = {e.vm: e for e in unfinished}
    by_vm: dict[str, list[tuple[Any, Any]]] = {}
    for report in reports:
        if not report.reachable:
            continue
        for vm in report.vms:
            by_vm.setdefault(vm.name, []).append((report, vm))
    out: list[Attention] = _host_items(reports) if fleet else []
    for name in sorted(by_vm):
        pairs = [(r, v) for r, v in by_vm[name] if (name, r.name) not in busy]
        if not pairs or len(pairs) < len(by_vm[name]):
            continue  # a migration owns this guest right now
        copies = tuple(CopySeen(r.name, v.pid, v.status, v.firmware_guest_state) for r, v in pairs)
        unseen = [(r, v) for r, v in pairs if _unseen(v)]
        if fleet:
            for host, vm in unseen:
                held = any(HELD_MONITOR in e for e in vm.errors)
                out.append(Attention(name, (f"its QMP monitor on {host.name} is held by another client (QEMU "
                                            "serves one at a time): the console cannot see or migrate it"
                                            if held else f"its QEMU on {host.name} did not answer: {vm.errors[0]}"),
                                     copies, kind="monitor-held" if held else "guest", host=host.name))
        if unseen and name not in interrupted:
            pairs = [(r, v) for r, v in pairs if not _unseen(v)]
            if not pairs:
                continue  # nothing is known of it: no verdict on its copies
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
        if not fleet or not running:
            continue
        for host, vm in pairs:
            sent = vm.firmware_guest_state == GuestState.SENT
            if vm.status == "postmigrate" or (sent and vm.status != "inmigrate"):
                out.append(Attention(name, f"a stale copy stays on {host.name} ({vm.status}"
                                     + (", guest SENT" if sent else "")
                                     + f") beside the copy running on {running[0][0].name}", copies,
                                     SafeAction(Fix.STOP, f"stop the stale copy on {host.name} (pid {vm.pid}); "
                                                f"{name} keeps running on {running[0][0].name}",
                                                host=host.name, pid=vm.pid, qmp=vm.qmp_path),
                                     kind="stale-copy", host=host.name))
    return out
