"""`sevconsole lab`: run a lab of simulated SEV hosts in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lab", help="run a lab of simulated SEV hosts (SSH + QMP on 127.0.0.1)",
        description="Start N simulated SEV hypervisor hosts on 127.0.0.1, each its own process with "
                    "an SSH server and a QMP socket per VM; write an inventory for the console; "
                    "stop cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("--hosts", type=int, default=3, metavar="N", help="number of hosts (default 3: lab-1..lab-3)")
    p.add_argument("--state-dir", metavar="DIR", help="state folder (default: the console's data folder/lab)")
    p.add_argument("--vms-per-host", type=int, default=0, metavar="K", help="add SEV VMs up to K per host")
    p.add_argument("--mem", type=int, default=64, metavar="MIB", help="guest memory in MiB (default 64)")
    p.add_argument("--dirty-rate", type=float, default=0.0, metavar="PAGES_PER_S",
                   help="pages per second each guest's workload dirties while it runs (default 0)")
    p.add_argument("--realistic-psp", action="store_true",
                   help="model the PSP's speed: one command at a time, about 2.5 ms a page")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from sevconsole.paths import data_dir

    from .control import Lab, LabError, StateDirError

    if args.hosts < 1 or args.mem < 1 or args.vms_per_host < 0 or args.dirty_rate < 0:
        print("sevconsole lab: --hosts and --mem must be at least 1, --vms-per-host and --dirty-rate "
              "at least 0", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else data_dir() / "lab"
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            lab = Lab.start(state_dir, args.hosts, vms_per_host=args.vms_per_host, mem_mib=args.mem,
                            dirty_rate=args.dirty_rate, realistic_psp=args.realistic_psp)
        except StateDirError as exc:
            print(f"sevconsole lab: {exc}", file=sys.stderr)
            return 2
        except (LabError, ValueError, OSError) as exc:
            print(f"sevconsole lab: {exc}", file=sys.stderr)
            return 1
        with lab:
            print(f"lab running: {len(lab.hosts)} hosts, state in {lab.paths.root}")
            for h in lab.hosts:
                api = f"{h.spec.api[0]}.{h.spec.api[1]}"
                vms = ", ".join(h.qmp) or "no VMs"
                print(f"  {h.name:<8} ssh 127.0.0.1:{h.port:<5}  API {api:<5} OCA domain {h.spec.oca_domain}  {vms}")
            print(f"inventory:   {lab.inventory}")
            print(f"known_hosts: {lab.known_hosts}")
            print(f"client key:  {lab.client_key}")
            print(f"lab root:    {lab.lab_ark} (a LAB root, not AMD's: trust it for lab hosts only)")
            print("Ctrl-C stops the lab.", flush=True)
            reported: set[str] = set()  # hosts whose exit was told
            while not stop.wait(1.0):
                for h in lab.hosts:
                    if not h.alive and h.name not in reported:
                        reported.add(h.name)
                        print(f"lab host {h.name} exited (code {h.process.returncode}); see {h.log}",
                              file=sys.stderr, flush=True)
        print("lab stopped.")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
