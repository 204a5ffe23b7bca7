"""Discovery of many lab hosts: concurrency at work.

Starts a lab of N hosts (default 32: real SSH servers and QMP sockets on loopback, one process
each), then, in one run and side by side, discovers them all with the default bound (16 at
once) and one at a time. Prints JSON: wall times, per-host median, the ratio of wall time to
the sum of per-host times (1.0 = no overlap; lower = concurrency at work), and the speed-up
over the sequential pass.

    python -m benchmarks.discovery [--hosts 32] [--workers 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.labdir import load_lab
from sevconsole.lab.control import Lab  # a benchmark may start a lab, like tests


def one_pass(hosts: list, options: DiscoveryOptions) -> dict:
    started = time.monotonic()
    reports = discover(hosts, options)
    wall = time.monotonic() - started
    per_host = [r.extra["duration_ms"] / 1000 for r in reports]
    failed = [f"{r.name}: {'; '.join(r.errors)}" for r in reports if r.errors or not r.reachable]
    return {"wall_s": round(wall, 3), "per_host_median_s": round(statistics.median(per_host), 4),
            "per_host_max_s": round(max(per_host), 4), "sum_per_host_s": round(sum(per_host), 3),
            "wall_over_sum": round(wall / sum(per_host), 4),
            "vms": sum(len(r.vms) for r in reports), "chains_ok": sum(
                1 for r in reports if r.capabilities and r.capabilities.chain_report
                and r.capabilities.chain_report.ok), "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="passes of each kind; the median pass is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sevconsole-bench-") as tmp:
        started = time.monotonic()
        with Lab.start(Path(tmp) / "lab", hosts=args.hosts, mem_mib=4) as lab:
            lab_start = time.monotonic() - started
            state = load_lab(lab.paths.root)
            hosts = list(state.inventory.hosts)
            base = {"known_hosts": state.known_hosts, "system_known_hosts": (), "lab_root": state.lab_root,
                    "amd_roots": Path(tmp) / "none", "ssh_config": Path(tmp) / "none", "use_agent": False}
            concurrent, sequential = [], []
            for _ in range(args.repeat):  # interleaved, so load changes hit both alike
                concurrent.append(one_pass(hosts, DiscoveryOptions(max_workers=args.workers, **base)))
                sequential.append(one_pass(hosts, DiscoveryOptions(max_workers=1, **base)))
    pick = lambda runs: sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # noqa: E731
    c, s = pick(concurrent), pick(sequential)
    print(json.dumps({
        "benchmark": "discovery", "hosts": args.hosts, "workers": args.workers, "repeat": args.repeat,
        "lab_start_s": round(lab_start, 2),
        "concurrent": c, "sequential": s,
        "speedup_sequential_over_concurrent": round(s["wall_s"] / c["wall_s"], 2),
        "all_concurrent_walls_s": [r["wall_s"] for r in concurrent],
        "all_sequential_walls_s": [r["wall_s"] for r in sequential],
    }, indent=2))
    return 0 if not c["failed"] and not s["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
