"""The fleet overview's data, without a screen: every VM across the hosts (filtered, sorted), each
guest's migratability in words, and the migrations list (journal entries, then older ones from
the audit log). Plain functions over immutable reports, so the screen only draws."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevconsole.hosts.report import HostReport, VmInfo

SORTS = ("host", "state", "policy", "memory")
RUNNABLE = ("running", "paused")
AUDIT_TAIL_BYTES = 256 * 1024  # the last few hundred audit lines: plenty for "recent"


# -- VMs

@dataclass(frozen=True)
class VmRow:
    host: str
    index: int  # position in the host's report (names can repeat on one host)
    vm: VmInfo

    @property
    def key(self) -> str:
        return f"{self.host}\x00{self.index}"


def migratable(vm: VmInfo) -> tuple[str, str]:
    """(words, style) for whether this copy can be migrated now, and if not why, in a few words."""
    from sevconsole.sev.policy import GuestPolicy, PolicyFlag

    if vm.stale:
        return "no: stale copy", "$text-muted"
    if vm.status is not None and vm.status not in RUNNABLE:
        return f"no: {vm.status}", "$text-muted"
    if vm.status is None and vm.errors:
        return "? not answering", "$warning"
    if not vm.sev_enabled:
        return "yes (plain)", "$success"
    if vm.policy is not None:
        try:
            if GuestPolicy.from_u32(vm.policy).flags & PolicyFlag.NOSEND:
                return "no: NOSEND", "$error"
        except ValueError:
            return "no: bad policy", "$error"
    if vm.migration_blocker:
        return "no: blocked", "$error"
    if vm.migration_support is False:
        return "no: QEMU lacks it", "$error"
    if vm.migration_support is None:
        return "?", "$text-muted"
    return "yes", "$success"


def vm_rows(reports: Mapping[str, HostReport], order: Sequence[str] = ()) -> list[VmRow]:
    names = [*order, *(n for n in reports if n not in order)]
    return [VmRow(name, i, vm) for name in names if name in reports
            for i, vm in enumerate(reports[name].vms)]


def matches(row: VmRow, text: str) -> bool:
    from sevconsole.tui import format as fmt

    text = text.lower().strip()
    if not text:
        return True
    hay = (row.vm.name, row.host, row.vm.status or "", fmt.policy(row.vm.policy), migratable(row.vm)[0],
           "sev" if row.vm.sev_enabled else "plain")
    return any(text in h.lower() for h in hay)


_STATE_ORDER = {"running": 0, "paused": 1, "inmigrate": 2, "postmigrate": 3}


def sort_rows(rows: Iterable[VmRow], key: str, host_order: Sequence[str] = ()) -> list[VmRow]:
    position = {name: i for i, name in enumerate(host_order)}

    def host_key(r: VmRow) -> tuple[int, str, int]:
        return (position.get(r.host, len(position)), r.host, r.index)

    if key == "state":
        return sorted(rows, key=lambda r: (_STATE_ORDER.get(r.vm.status or "", 9), r.vm.status or "",
                                           r.vm.name, host_key(r)))
    if key == "policy":
        return sorted(rows, key=lambda r: (r.vm.policy is None, r.vm.policy or 0, r.vm.name, host_key(r)))
    if key == "memory":
        return sorted(rows, key=lambda r: (-(r.vm.memory_mib or 0), r.vm.name, host_key(r)))
    return sorted(rows, key=lambda r: (host_key(r), r.vm.name))


# -- hosts

def sev_words(report: HostReport) -> tuple[str, str]:
    """A host's SEV state in a few words: `SEV 1.55 WORKING`, `no /dev/sev`, `no SEV`."""
    from sevconsole.tui import format as fmt

    sev = report.sev
    if not report.reachable:
        return "-", "$text-muted"
    if sev is None:
        return "no SEV information", "$warning"
    if not sev.dev_sev:
        return "no /dev/sev", "$warning"
    if sev.kernel_sev is False:
        return "SEV off in kvm_amd", "$warning"
    api = "?" if sev.api is None else f"{sev.api[0]}.{sev.api[1]}"
    es = " +ES" if sev.es_configured else ""
    return f"{api} {fmt.platform_state(sev.platform_state)}{es}", "$success"


# -- migrations

@dataclass(frozen=True)
class MigrationRow:
    id: str | None  # None: known from the audit log only
    vm: str
    source: str
    target: str
    started: float  # epoch seconds; 0 unknown
    state: str  # in flight, done, rolled-back, unfinished (...), failed, ...
    message: str = ""
    in_flight: bool = False
    unfinished: bool = False
    replayable: bool = False  # a journal folder that may hold snapshots


def entry_row(entry: Any) -> MigrationRow:
    outcome = entry.outcome or {}
    if entry.in_flight:
        state = "in flight"
    elif not entry.journal.trusted:
        state = "corrupt journal"
    elif entry.step is None:
        state = "starting" if entry.runner_alive else "not started"
    elif entry.unfinished:
        state = f"unfinished ({entry.step.value})"
    else:
        state = str(outcome.get("result") or entry.step.value)
    return MigrationRow(entry.id, entry.vm, entry.source, entry.target, float(entry.started or 0.0), state,
                        str(outcome.get("message") or ""), bool(entry.in_flight), bool(entry.unfinished),
                        replayable=not entry.in_flight and entry.step is not None)


def audit_row(record: Mapping[str, Any]) -> MigrationRow:
    return MigrationRow(None, str(record.get("vm", "?")), str(record.get("source", "?")),
                        str(record.get("target", "?")), _epoch(record.get("time")),
                        str(record.get("outcome", "?")), str(record.get("message") or ""))


def migration_rows(entries: Sequence[Any], audit: Sequence[Mapping[str, Any]], limit: int = 50) -> list[MigrationRow]:
    """In flight and unfinished first, then the finished ones newest first; audit lines older than
    the oldest journal entry fill up to `limit` (their journal folders are gone)."""
    rows = [entry_row(e) for e in entries]
    busy = [r for r in rows if r.in_flight or r.unfinished]
    done = [r for r in rows if not (r.in_flight or r.unfinished)]
    oldest = min((r.started for r in rows if r.started), default=None)
    older = [audit_row(a) for a in audit if a.get("event") is None]  # recover's lines are not migrations
    if oldest is not None:
        older = [r for r in older if r.started and r.started < oldest - 1.0]
    older.sort(key=lambda r: r.started, reverse=True)
    return busy + (done + older)[: max(0, limit - len(busy))]


def _epoch(value: Any) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0


def read_audit_tail(path: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The last `limit` readable lines of the audit log, oldest first (blocking; thread workers).
    Reads at most AUDIT_TAIL_BYTES from the end; a missing log is no migration yet."""
    from sevconsole.boundedio import BoundedReadError, open_regular

    try:
        handle = open_regular(path, "audit log")
    except BoundedReadError as exc:
        if exc.missing:
            return []
        raise
    with handle:
        size = handle.seek(0, 2)
        start = max(0, size - AUDIT_TAIL_BYTES)
        handle.seek(start)
        data = handle.read(AUDIT_TAIL_BYTES)
    lines = data.split(b"\n")
    if start:
        lines = lines[1:]  # the first one is cut
    out: list[dict[str, Any]] = []
    for raw in reversed(lines):  # from the end: a torn or foreign line is skipped, not counted
        if len(out) >= limit:
            break
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out[::-1]


def when(started: float, now: float | None = None) -> str:
    """`14:03:12` today, `Nov 28 14:03` before."""
    if not started:
        return "?"
    moment = datetime.datetime.fromtimestamp(started)
    today = datetime.datetime.fromtimestamp(now) if now is not None else datetime.datetime.now()
    return moment.strftime("%H:%M:%S") if moment.date() == today.date() else moment.strftime("%b %d %H:%M")
