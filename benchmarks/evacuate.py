"""Evacuation makespan on a realistic-PSP lab against the bound the PSP allows, and against
starting every migration at once.

The lab: lab-1 runs K SEV guests (--mem MiB each) whose workloads dirty --dirty pages/s each
(one value per guest); lab-2 and lab-3 (same OCA domain, recent firmware) receive. Every host
has the realistic PSP (2.5 ms a page: r = 400 pages/s).

The bound: the source's PSP must encrypt every page of every pass. A guest of N private pages
dirtying d pages/s, alone on a PSP of r pages/s, sends N/(1-d/r) pages: at least N/(r-d)
seconds, and one source's guests pass through its PSP one after another, so the makespan is at
least the sum over the guests (shared pages need no PSP and are left out). In the lab a
workload writes random pages, so a pass dirties fewer distinct pages than d times its length:
the bound is conservative there (real guests with a working set would hit it harder).

Two evacuations of the same layout, one after the other, on two fresh labs:
- psp-aware: `sevconsole evacuate`'s engine (engine/evacuate.py) with its schedule. Goal:
  makespan at most 1.25x the bound, every guest converged (moved).
- all-at-once: the same engine with every migration started at the same time
  (evac_schedule.start_all); guests that share the PSP get r/K each and those dirtying faster
  never converge; stopped (cancelled, rolled back) at --cap-factor times the bound.

The makespan is timed from the start of the evacuation (probes, dirty-rate measurement and
planning included) to the last guest moved; `run_s` from the first migration's start.

Prints one JSON object. Usage:

    python benchmarks/evacuate.py [--mem 8] [--dirty 0,100,200,300] [--cap-factor 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sevconsole.lab import Lab  # noqa: E402
from sevconsole.lab.layout import DB_POLICY, RECENT_API, HostSpec, VmSpec, default_shared_ranges  # noqa: E402

PSP_PPS = 400.0  # the realistic PSP: 2.5 ms a page
PAGE = 4096


def layout(mem_mib: int, dirty: list[float]) -> tuple[HostSpec, ...]:
    hosts = [HostSpec(f"lab-{i}", RECENT_API, "a", realistic_psp=True) for i in (1, 2, 3)]
    guests = tuple(VmSpec(f"g{i}", True, DB_POLICY, mem_mib=mem_mib, dirty_rate=d) for i, d in enumerate(dirty, 1))
    return (replace(hosts[0], vms=guests), *hosts[1:])


def private_pages(mem_mib: int) -> int:
    pages = mem_mib * (1 << 20) // PAGE
    return pages - sum(n for _, n in default_shared_ranges(pages))


def bound(mem_mib: int, dirty: list[float], rate: float = PSP_PPS) -> tuple[float, list[float]]:
    each = [private_pages(mem_mib) / (rate - d) if d < rate else float("inf") for d in dirty]
    return sum(each), each


def isolate(base: Path) -> None:
    """This run's journals, runner sockets, audit log and config in a folder of its own (the
    runners inherit the environment)."""
    runtime = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/tmp"))
    os.environ.update({"SEVCONSOLE_STATE_DIR": str(base / "state"), "SEVCONSOLE_RUNTIME_DIR": str(runtime),
                       "SEVCONSOLE_DATA_DIR": str(base / "data"), "SEVCONSOLE_CONFIG_DIR": str(base / "config")})


async def evacuate(lab_dir: Path, guests: int, *, all_at_once: bool, cap_s: float) -> dict[str, Any]:
    from sevconsole.engine import evac_schedule
    from sevconsole.engine.evacuate import EvacOptions, Evacuation, prepare
    from sevconsole.hosts.chains import trust_with_lab_root
    from sevconsole.hosts.fleet import open_fleet

    t0 = time.monotonic()
    fleet = open_fleet(lab=lab_dir)
    options = EvacOptions(host="lab-1", parallel=max(guests, 1) if all_at_once else 4)
    prepared = await prepare(fleet, options, trust=trust_with_lab_root(fleet.lab_root))
    planned_s = time.monotonic() - t0
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    last: list[Any] = []

    def on_view(view: Any) -> None:
        now = time.monotonic() - t0
        for row in view.rows:
            if row.status in ("starting", "migrating"):
                started.setdefault(row.vm, now)
            if row.status in ("moved", "failed", "needs-operator"):
                ended.setdefault(row.vm, now)
        last[:] = [view]

    decide = evac_schedule.start_all if all_at_once else evac_schedule.decide
    evacuation = Evacuation(prepared, on_view, decide=decide)
    run = asyncio.get_running_loop().create_task(evacuation.run())
    capped = False
    try:
        await asyncio.wait_for(asyncio.shield(run), max(cap_s - (time.monotonic() - t0), 1.0))
    except TimeoutError:
        capped = True
        evacuation.cancel(f"benchmark cap: {cap_s:.0f} s")
    code = await run
    view = last[0]
    rows = {r.vm: r for r in view.rows}
    moved = [vm for vm, r in rows.items() if r.status == "moved"]
    first = min(started.values(), default=planned_s)
    end = max((ended[vm] for vm in moved), default=None)
    return {
        "exit": code, "capped": capped, "converged": len(moved), "guests": len(rows),
        "makespan_s": round(end, 2) if end is not None and len(moved) == len(rows) else None,
        "run_s": round(end - first, 2) if end is not None and len(moved) == len(rows) else None,
        "plan_s": round(planned_s, 2), "stopped_after_s": round(time.monotonic() - t0, 2) if capped else None,
        "psp_rate_measured": round(evacuation.rates.get("lab-1", 0.0), 1) or None,
        "per_guest": [{"vm": vm, "target": r.target, "status": r.status, "attempts": r.attempts,
                       "start_s": round(started[vm], 2) if vm in started else None,
                       "end_s": round(ended[vm], 2) if vm in ended else None} for vm, r in sorted(rows.items())],
        "notes": list(view.notes),
    }


def one(base: Path, name: str, mem: int, dirty: list[float], *, all_at_once: bool, cap_s: float) -> dict[str, Any]:
    isolate(base / name)
    lab = Lab.start(base / name / "lab", layout=layout(mem, dirty))
    try:
        return asyncio.run(evacuate(lab.paths.root, len(dirty), all_at_once=all_at_once, cap_s=cap_s))
    finally:
        lab.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", type=int, default=8, help="MiB per guest (default 8)")
    parser.add_argument("--dirty", default="0,100,200,300", help="pages/s each guest dirties, comma-separated")
    parser.add_argument("--cap-factor", type=float, default=3.0,
                        help="stop the all-at-once run at this many times the bound (default 3)")
    args = parser.parse_args()
    dirty = [float(x) for x in args.dirty.split(",") if x.strip()]
    total, each = bound(args.mem, dirty)
    base = Path(tempfile.mkdtemp(prefix="sevconsole-evac-bench-"))
    aware = one(base, "psp-aware", args.mem, dirty, all_at_once=False, cap_s=args.cap_factor * total)
    naive = one(base, "all-at-once", args.mem, dirty, all_at_once=True, cap_s=args.cap_factor * total)
    ratio = None if aware["makespan_s"] is None else round(aware["makespan_s"] / total, 3)
    result = {
        "layout": {"guests": len(dirty), "mem_mib": args.mem, "private_pages": private_pages(args.mem),
                   "dirty_pages_per_s": dirty, "psp_pages_per_s": PSP_PPS},
        "bound_s": round(total, 2), "bound_per_guest_s": [round(x, 2) for x in each],
        "psp_aware": {**aware, "ratio": ratio,
                      "run_ratio": None if aware["run_s"] is None else round(aware["run_s"] / total, 3)},
        "all_at_once": {**naive, "ratio": None if naive["makespan_s"] is None
                        else round(naive["makespan_s"] / total, 3)},
        "goal": {"ratio_max": 1.25, "met": ratio is not None and ratio <= 1.25
                 and aware["converged"] == len(dirty)},
    }
    print(json.dumps(result, indent=2))
    return 0 if result["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
