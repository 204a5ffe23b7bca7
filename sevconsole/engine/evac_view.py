"""The fleet view of an evacuation (pure): one row per guest and the aggregate, as immutable
snapshots the driver posts (engine/evacuate.py) and the command and the console show.

Row statuses: waiting (planned, not started), starting (runner spawned), migrating, moved,
failed (its migrations failed; the guest still runs on the host), needs-operator (no single
runnable copy could be confirmed: `sevconsole recover`), blocked (a blocker: it cannot move),
skipped (cancelled before it started).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sevconsole.engine.evac_plan import EvacPlan

DONE_STATUSES = ("moved", "failed", "needs-operator", "blocked", "skipped")


@dataclass(frozen=True)
class Row:
    vm: str
    sev: bool
    status: str
    target: str | None = None
    phase: str = ""
    percent: float | None = None
    pages_per_s: float | None = None
    eta_s: float | None = None
    note: str = ""  # why it waits, what happened
    attempts: int = 0
    migration_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    moved: int = 0
    left: int = 0  # movable guests not moved yet (waiting or migrating)
    running: int = 0  # migrations in flight
    blocked: int = 0
    failed: int = 0  # failed or needing the operator
    time_left_s: float | None = None
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvacView:
    id: str
    host: str
    rows: tuple[Row, ...]
    summary: Summary
    notes: tuple[str, ...] = ()
    done: bool = False
    exit_code: int | None = None
    at: float = field(default_factory=time.time)


def summarize(rows: Sequence[Row], time_left_s: float | None, elapsed_s: float) -> Summary:
    count = {s: sum(1 for r in rows if r.status == s) for s in
             ("moved", "waiting", "starting", "migrating", "failed", "needs-operator", "blocked", "skipped")}
    running = count["starting"] + count["migrating"]
    return Summary(moved=count["moved"], left=count["waiting"] + running, running=running,
                   blocked=count["blocked"] + count["skipped"], failed=count["failed"] + count["needs-operator"],
                   time_left_s=time_left_s, elapsed_s=elapsed_s)


# -- text


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


def plan_lines(plan: EvacPlan) -> list[str]:
    """The plan as the operator reads it before confirming (host strings: escape before a TTY)."""
    lines = [f"evacuation plan for {plan.host} (targets: {', '.join(plan.targets) or 'none'}; "
             f"PSP rate {plan.psp_rate:.0f} pages/s):"]
    for m in plan.moves:
        kind = "SEV" if m.sev else "plain"
        dirty = "" if m.dirty is None else f", dirties {m.dirty.text()}"
        lines.append(f"  {m.vm} ({kind}, {m.mem_mib} MiB{dirty}) -> {m.target}: {m.reason}")
        if len(m.allowed) > 1:
            lines.append(f"      allowed: {', '.join(m.allowed)}")
        for target, why in m.refusals:
            lines.append(f"      not {target}: {why}")
        if m.warning:
            lines.append(f"      warning: {m.warning}")
    if plan.blockers:
        lines.append("blockers (these guests stay on the host):")
        lines += [f"  {b.vm}: {b.sentence}" for b in plan.blockers]
    lines += [f"note: {n}" for n in plan.notes]
    return lines


def row_cells(r: Row) -> list[str]:
    pct = "" if r.percent is None else f"{r.percent:5.1f}%"
    rate = "" if not r.pages_per_s else f"{r.pages_per_s:.0f} p/s"
    eta = "" if r.eta_s is None or r.status != "migrating" else duration(r.eta_s)
    return [r.vm, "SEV" if r.sev else "plain", r.target or "-", r.status, r.phase, pct, rate, eta, r.note]


HEADER = ["GUEST", "KIND", "TARGET", "STATUS", "PHASE", "PROGRESS", "RATE", "ETA", "NOTE"]


def summary_line(view: EvacView) -> str:
    s = view.summary
    return (f"{view.host}: moved {s.moved}, left {s.left} ({s.running} running), blocked {s.blocked}, "
            f"failed {s.failed}; elapsed {duration(s.elapsed_s)}, time left {duration(s.time_left_s)}")


def table_lines(view: EvacView, width: int = 120) -> list[str]:
    rows = [HEADER] + [row_cells(r) for r in view.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    out = []
    for cells in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + "  " + cells[-1]
        out.append(line.rstrip()[:width])
    return out + [summary_line(view)[:width]]


def change_line(row: Row) -> str:
    """One line for a row that changed (non-TTY output)."""
    parts = [f"{row.vm}", f"-> {row.target or '-'}", row.status]
    if row.phase and row.status in ("starting", "migrating"):
        parts.append(row.phase)
    if row.percent is not None and row.status == "migrating":
        parts.append(f"{row.percent:.0f}%")
    if row.note:
        parts.append(f"({row.note})")
    return " ".join(parts)
