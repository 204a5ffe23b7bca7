"""`sevconsole migrate VM --to HOST`: preflight, confirmation, then one live migration.

Exit status: 0 done; 1 failed or cancelled (the source still runs); 2 refused by preflight;
3 bad usage (unknown host or VM, bad inventory, bad option).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2, 3

DESCRIPTION = """\
Live-migrate one VM to another host. Hosts come from --lab DIR, --inventory FILE or the
default inventory. The preflight is printed first (policy NOSEND/DOMAIN/SEV, certificate
chain, firmware API, ES, cbitpos, memory, QEMU support); any failed check refuses the
migration. Then, unless --yes, it asks for confirmation, and shows one updating progress line
(or, with --json, one Progress snapshot per line on stdout). Ctrl-C cancels: the source keeps
the guest. Every attempt is appended to the audit log (see `sevconsole audit`).

exit status: 0 done, 1 failed or cancelled (the source still runs), 2 refused by preflight,
3 bad usage
"""


class _UsageError(Exception):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("migrate", help="live-migrate a VM to another host",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vm", metavar="VM", help="the VM's name (QEMU -name)")
    parser.add_argument("--to", required=True, metavar="HOST", help="target host (inventory name)")
    parser.add_argument("--from", dest="source", metavar="HOST",
                        help="source host (default: the host that runs VM)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--inventory", metavar="FILE", type=Path, help="a TOML inventory of [[host]] tables")
    where.add_argument("--lab", metavar="DIR", type=Path, help="a running lab's state folder")
    parser.add_argument("--downtime-ms", type=int, default=300, metavar="N",
                        help="downtime limit for the final copy in ms (default 300, QEMU's)")
    parser.add_argument("--bandwidth", type=float, metavar="MBPS",
                        help="cap the stream at MBPS megabytes per second (default: QEMU's)")
    parser.add_argument("--stall-warn", type=float, default=10.0, metavar="S",
                        help="warn when no byte moved for S seconds (default 10)")
    parser.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                        help="cancel when no byte moved for S seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="one Progress JSON object per line on stdout")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    def usage_error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        print(f"sevconsole migrate: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = usage_error  # type: ignore[method-assign]  # bad usage is 3; 2 means refused
    parser.set_defaults(func=run)


def _say(args: argparse.Namespace, text: str = "") -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        _validate(args)
        setup = _load(args)
    except _UsageError as exc:
        print(f"sevconsole migrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            plan = _plan(args, setup)
        except _UsageError as exc:
            print(f"sevconsole migrate: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return _migrate(args, setup, plan)
    finally:
        setup["pool"].close()


def _validate(args: argparse.Namespace) -> None:
    if args.downtime_ms < 0:
        raise _UsageError("--downtime-ms must be 0 or more")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise _UsageError("--bandwidth must be a positive number of MB/s")
    if not 0 < args.stall_warn <= args.stall_timeout:
        raise _UsageError("--stall-warn must be positive and at most --stall-timeout")


def _load(args: argparse.Namespace) -> dict[str, Any]:
    from sevconsole import paths
    from sevconsole.hosts.discovery import DiscoveryOptions
    from sevconsole.hosts.errors import InventoryError
    from sevconsole.hosts.inventory import load_inventory
    from sevconsole.hosts.labdir import load_lab

    try:
        if args.lab is not None:
            lab = load_lab(args.lab)
            hosts, known_hosts, lab_root = lab.inventory.hosts, lab.known_hosts, lab.lab_root
        else:
            if args.inventory is None and not paths.default_inventory().is_file():
                raise _UsageError(f"no inventory: write {paths.default_inventory()}, or give "
                                  "--inventory FILE or --lab DIR")
            inventory = load_inventory(args.inventory)
            hosts, known_hosts, lab_root = inventory.hosts, inventory.known_hosts, inventory.lab_root
    except InventoryError as exc:
        raise _UsageError("; ".join(str(p) for p in exc.problems)) from None
    names = {h.name for h in hosts}
    for role, name in (("--to", args.to), ("--from", args.source)):
        if name is not None and name not in names:
            raise _UsageError(f"{role} {name}: no such host in the inventory (hosts: {', '.join(sorted(names))})")
    if args.source is not None and args.source == args.to:
        raise _UsageError(f"--from and --to are both {args.to}")
    options = DiscoveryOptions(known_hosts=known_hosts, lab_root=lab_root)
    return {"hosts": list(hosts), "options": options, "pool": options.pool(), "lab_root": lab_root}


def _plan(args: argparse.Namespace, setup: dict[str, Any]) -> Any:
    from sevconsole.engine.plan import MigrationPlan
    from sevconsole.hosts.discovery import discover

    hosts = setup["hosts"]
    wanted = [h for h in hosts if h.name in (args.to, args.source)] if args.source else hosts
    _say(args, f"probing {', '.join(h.name for h in wanted)} ...")
    reports = {r.name: r for r in discover(wanted, setup["options"], pool=setup["pool"])}
    if args.source is None:
        found = [r for r in reports.values() if r.vm(args.vm) is not None and r.name != args.to]
        if not found:
            unreachable = [r.name for r in reports.values() if not r.reachable]
            hint = f" ({', '.join(unreachable)} could not be probed)" if unreachable else ""
            raise _UsageError(f"no host runs a VM named {args.vm}{hint}; see `sevconsole discover`")
        if len(found) > 1:
            raise _UsageError(f"{args.vm} runs on {', '.join(r.name for r in found)}; say which with --from")
        source = found[0]
    else:
        source = reports[args.source]
        if source.vm(args.vm) is None:
            why = "; ".join(source.errors) or f"its VMs: {', '.join(v.name for v in source.vms) or 'none'}"
            raise _UsageError(f"{args.source} runs no VM named {args.vm} ({why})")
    vm = source.vm(args.vm)
    return MigrationPlan(vm=vm, source=source, target=reports[args.to], downtime_limit_ms=args.downtime_ms,
                         bandwidth_bps=None if args.bandwidth is None else int(args.bandwidth * 1e6),
                         stall_warn_s=args.stall_warn, stall_timeout_s=args.stall_timeout)


MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}


def _migrate(args: argparse.Namespace, setup: dict[str, Any], plan: Any) -> int:
    from sevconsole.engine import audit
    from sevconsole.engine.checks import preflight, refused
    from sevconsole.engine.run import Outcome
    from sevconsole.hosts.chains import trust_with_lab_root

    checks = preflight(plan, trust_with_lab_root(setup["lab_root"]))
    _say(args, f"preflight: {plan.describe()}")
    for c in checks:
        _say(args, f"  {MARK[c.status.value]}  {c.title}: {c.sentence}")
    if refused(checks):
        _say(args, "refused by preflight: nothing was started.")
        audit.record(plan, checks, Outcome("refused", "refused by preflight", runnable=(plan.source.name,)))
        return EXIT_REFUSED
    if not args.yes and not _confirm(args, plan):
        _say(args, "not confirmed: nothing was started.")
        return EXIT_FAILED
    outcome = asyncio.run(_run(args, setup, plan, checks))
    if not args.json:
        print(file=sys.stdout)
    _say(args, f"{outcome.result}: {outcome.message}")
    for err in outcome.errors:
        _say(args, f"  {err}")
    return {"done": EXIT_DONE, "refused": EXIT_REFUSED}.get(outcome.result, EXIT_FAILED)


def _confirm(args: argparse.Namespace, plan: Any) -> bool:
    print(f"Start the {plan.describe()}? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def _run(args: argparse.Namespace, setup: dict[str, Any], plan: Any, checks: Any) -> Any:
    from sevconsole.engine.run import Migration
    from sevconsole.engine.ssh import SshHost
    from sevconsole.hosts.discovery import endpoint_for

    def link(report: Any) -> SshHost:
        spec = next(h for h in setup["hosts"] if h.name == report.name)
        endpoint = endpoint_for(spec, setup["hosts"])
        pool = setup["pool"]
        return SshHost(report.name, report.address, pool.get(endpoint), reconnect=lambda: pool.get(endpoint))

    source, target = await asyncio.to_thread(link, plan.source), await asyncio.to_thread(link, plan.target)
    show = _JsonLines() if args.json else _ProgressLine()
    migration = Migration(plan, source, target, checks=checks, on_progress=show)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, migration.cancel, "cancelled by the operator (Ctrl-C)")
    try:
        return await migration.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await source.close()
        await target.close()


class _JsonLines:
    def __call__(self, progress: Any) -> None:
        print(json.dumps(progress.to_json()), flush=True)


class _ProgressLine:
    """One line rewritten in place: phase, percent, MB/s, pass, dirty rate, ETA."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = ""

    def __call__(self, p: Any) -> None:
        line = progress_line(p)
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print("\r" + line.ljust(100)[:100], end="", flush=True)
        else:
            print(line, flush=True)


def progress_line(p: Any) -> str:
    total = p.bytes_total
    pct = 100.0 * (total - p.bytes_remaining) / total if total else 0.0
    eta = "-" if p.eta_s is None else f"{p.eta_s:.0f}s"
    converge = {True: "converging", False: "NOT converging", None: ""}[p.converging]
    stalled = "  STALLED" if p.extra.get("stalled") else ""
    cap = p.extra.get("max_bandwidth_bps")
    capped = f" (cap {cap / 1e6:.0f})" if isinstance(cap, int | float) and cap and p.rate_bps > 0.8 * cap else ""
    return (f"{p.phase.value:<13} {pct:5.1f}%  {p.rate_bps / 1e6:7.1f} MB/s{capped}  pass {p.pass_number}  "
            f"dirty {p.dirty_pages_per_s:.0f} p/s  ETA {eta}  {converge}{stalled}").rstrip()
