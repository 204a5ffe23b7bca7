"""`sevconsole migrate VM --to HOST`: preflight, confirmation, then one live migration.

Exit status: 0 done; 1 failed or cancelled (the source still runs); 2 refused by preflight;
3 bad usage (unknown host or VM, bad inventory, bad option).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from sevconsole.textsafe import escape_controls

EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2, 3

DESCRIPTION = """\
Live-migrate one VM to another host. Hosts come from --lab DIR, --inventory FILE or the
default inventory. The preflight is printed first (policy NOSEND/DOMAIN/SEV, certificate
chain, firmware API, ES, cbitpos, memory, QEMU support); any failed check refuses the
migration. Then, unless --yes, it asks for confirmation, and shows one updating progress line
(or, with --json, JSON lines on stdout: {"checks": [...]}, one Progress snapshot per line, then
{"outcome": {...}, "migration": ID}).

The migration itself runs in a runner process of its own: closing the terminal, a dropped SSH
session or killing this command never stops it (`sevconsole migrations watch ID` re-attaches,
`sevconsole recover` finishes one whose runner died). Ctrl-C asks the runner to cancel: the
source keeps the guest. Every attempt is appended to the audit log (see `sevconsole audit`).

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
    parser.add_argument("--accept-host-key", action="append", default=[], metavar="FINGERPRINT",
                        help="trust this SSH host key (SHA256:..., as the unknown-key message shows it, "
                             "checked out of band); it is saved in the console's known_hosts")
    parser.add_argument("--keep-source", action="store_true",
                        help="leave the source QEMU (stopped, postmigrate or SENT) after a confirmed "
                             "migration; by default it is quit")
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
    from sevconsole.hosts.fleet import FleetError, open_fleet

    try:
        _validate(args)
        fleet = open_fleet(inventory=args.inventory, lab=args.lab)
        _check_names(args, fleet)
        fleet = _with_keys(args, fleet)
    except (_UsageError, FleetError) as exc:
        print(f"sevconsole migrate: {escape_controls(exc)}", file=sys.stderr)
        return EXIT_USAGE
    pool = fleet.options.pool()
    try:
        try:
            plan = _plan(args, fleet, pool)
        except _UsageError as exc:
            print(f"sevconsole migrate: {escape_controls(exc)}", file=sys.stderr)
            return EXIT_USAGE
        return _migrate(args, fleet, plan)
    finally:
        pool.close()


def _validate(args: argparse.Namespace) -> None:
    if args.downtime_ms < 0:
        raise _UsageError("--downtime-ms must be 0 or more")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        raise _UsageError("--bandwidth must be a positive, finite number of MB/s")
    if not (math.isfinite(args.stall_warn) and math.isfinite(args.stall_timeout)
            and 0 < args.stall_warn <= args.stall_timeout):
        raise _UsageError("--stall-warn must be positive and at most --stall-timeout")


def _with_keys(args: argparse.Namespace, fleet: Any) -> Any:
    """--accept-host-key fingerprints (saved on first use, so the runner finds them known) and, on a
    terminal, a passphrase prompt for a protected identity the ssh-agent does not hold."""
    from dataclasses import replace

    from sevconsole.commands.discover import FINGERPRINT
    from sevconsole.hosts import passphrases

    bad = [fp for fp in args.accept_host_key if not FINGERPRINT.match(fp)]
    if bad:
        raise _UsageError(f"--accept-host-key {bad[0]!r} is not a host key fingerprint; expected SHA256: and "
                          "43 base64 characters, as shown in the unknown-key message")
    if sys.stdin.isatty():
        passphrases.set_asker(passphrases.tty_asker)
    if not args.accept_host_key:
        return fleet
    return replace(fleet, options=replace(fleet.options, accept_fingerprints=frozenset(args.accept_host_key)))


def _check_names(args: argparse.Namespace, fleet: Any) -> None:
    names = set(fleet.names)
    for role, name in (("--to", args.to), ("--from", args.source)):
        if name is not None and name not in names:
            raise _UsageError(f"{role} {name}: no such host in the inventory (hosts: {', '.join(sorted(names))})")
    if args.source is not None and args.source == args.to:
        raise _UsageError(f"--from and --to are both {args.to}")


def _plan(args: argparse.Namespace, fleet: Any, pool: Any) -> Any:
    from sevconsole.engine.plan import MigrationPlan
    from sevconsole.hosts.discovery import discover
    from sevconsole.hosts.fleet import pick_vm

    wanted = [h for h in fleet.hosts if h.name in (args.to, args.source)] if args.source else list(fleet.hosts)
    _say(args, f"probing {', '.join(h.name for h in wanted)} ...")
    reports = {r.name: r for r in discover(wanted, fleet.options, pool=pool)}
    if args.source is None:
        found = [r for r in reports.values() if _runs(r, args.vm) and r.name != args.to]
        if not found:
            if _runs(reports.get(args.to), args.vm):
                raise _UsageError(f"{args.vm} already runs on {args.to}; nothing to migrate")
            unreachable = [r.name for r in reports.values() if not r.reachable or r.host_key is not None]
            hint = f" ({', '.join(unreachable)} could not be probed)" if unreachable else ""
            keys = [r.errors[0] for r in reports.values() if r.host_key is not None and r.errors]
            if keys:  # the sentence names the fingerprint and --accept-host-key
                hint += ": " + " ".join(keys)
            raise _UsageError(f"no host runs a VM named {args.vm}{hint}; see `sevconsole discover`")
        if len(found) > 1:
            raise _UsageError(f"{args.vm} runs on {', '.join(r.name for r in found)}; say which with --from")
        source = found[0]
    else:
        source = reports[args.source]
        if pick_vm([source], args.vm) is None:
            why = "; ".join(source.errors) or f"its VMs: {', '.join(v.name for v in source.vms) or 'none'}"
            stale = next((v.stale for v in source.vms if v.name == args.vm and v.stale), None)
            if stale:  # a migration's leftover is never a source
                why = f"it holds only a {stale}"
            raise _UsageError(f"{args.source} runs no VM named {args.vm} ({why})")
    vm = pick_vm([source], args.vm)
    return MigrationPlan(vm=vm, source=source, target=reports[args.to], downtime_limit_ms=args.downtime_ms,
                         bandwidth_bps=None if args.bandwidth is None else int(args.bandwidth * 1e6),
                         stall_warn_s=args.stall_warn, stall_timeout_s=args.stall_timeout,
                         keep_source=args.keep_source)


def _runs(report: Any, vm: str) -> bool:
    """The host has a copy of `vm` that runs or is paused (not a SENT or incoming leftover)."""
    from sevconsole.hosts.fleet import pick_vm

    if report is None:
        return False
    copy = pick_vm([report], vm)
    return copy is not None and copy.status in ("running", "paused", None)


MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}


def _migrate(args: argparse.Namespace, fleet: Any, plan: Any) -> int:
    from sevconsole.engine import audit
    from sevconsole.engine.checks import preflight, refused
    from sevconsole.engine.run import Outcome, Result
    from sevconsole.engine.runner import RunnerError, spawn
    from sevconsole.hosts.chains import trust_with_lab_root

    checks = preflight(plan, trust_with_lab_root(fleet.lab_root))
    _say(args, f"preflight: {escape_controls(plan.describe())}")
    for c in checks:
        _say(args, f"  {MARK[c.status.value]}  {c.title}: {escape_controls(c.sentence)}")
    if args.json:  # the checks as data too (stdout: checks, then Progress lines, then the outcome)
        print(json.dumps({"checks": [{"key": c.key, "title": c.title, "status": c.status.value,
                                      "sentence": c.sentence} for c in checks],
                          "plan": plan.describe()}), flush=True)
    if refused(checks):
        _say(args, "refused by preflight: nothing was started.")
        try:
            audit.record(plan, checks, Outcome(Result.REFUSED, "refused by preflight", runnable=(plan.source.name,)))
        except (OSError, ValueError) as exc:
            _say(args, f"audit log not written: {escape_controls(exc)}")
        return EXIT_REFUSED
    if not args.yes and not _confirm(args, plan):
        _say(args, "not confirmed: nothing was started.")
        return EXIT_FAILED
    job = {"vm": plan.vm.name, "source": plan.source.name, "target": plan.target.name,
           "where": fleet.where(), "downtime_ms": plan.downtime_limit_ms, "bandwidth_bps": plan.bandwidth_bps,
           "stall_warn_s": plan.stall_warn_s, "stall_timeout_s": plan.stall_timeout_s,
           "keep_source": bool(args.keep_source)}
    try:
        migration_id = spawn(job)
    except (RunnerError, OSError) as exc:
        _say(args, f"sevconsole migrate: {escape_controls(exc)}")
        return EXIT_FAILED
    _say(args, f"migration {migration_id} runs in its own process: closing this terminal does not stop it "
               f"(`sevconsole migrations watch {migration_id}` re-attaches; Ctrl-C cancels)")
    return follow(args, migration_id)


def follow(args: argparse.Namespace, migration_id: str) -> int:
    """Attach to a runner and show its progress until the outcome; Ctrl-C sends cancel."""
    from sevconsole.engine.run import Result
    from sevconsole.engine.runner import RunnerError

    try:
        outcome = asyncio.run(_follow(args, migration_id))
    except RunnerError as exc:
        _say(args, f"sevconsole: {escape_controls(exc)}")
        return EXIT_FAILED
    if outcome is None:
        return EXIT_FAILED
    if not args.json:
        print(file=sys.stdout)
    _say(args, f"{outcome.result}: {escape_controls(outcome.message)}")
    for err in outcome.errors:
        _say(args, f"  {escape_controls(err)}")
    if args.json:
        print(json.dumps({"outcome": outcome.to_json(), "migration": migration_id}), flush=True)
    return {Result.DONE: EXIT_DONE, Result.REFUSED: EXIT_REFUSED}.get(outcome.result, EXIT_FAILED)


async def _follow(args: argparse.Namespace, migration_id: str) -> Any:
    from sevconsole.engine.attach import Ended, RunnerClient, RunnerGone, Snapshot

    client = await RunnerClient.connect(migration_id)
    show = _JsonLines() if args.json else _ProgressLine()
    loop = asyncio.get_running_loop()
    cancelling: list[asyncio.Task[None]] = []

    def on_sigint() -> None:
        _say(args, "\ncancelling (the source keeps the guest) ...")
        cancelling.append(loop.create_task(client.cancel("cancelled by the operator (Ctrl-C)")))

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async for message in client.messages():
            if isinstance(message, Snapshot):
                show(message.progress)
            elif isinstance(message, Ended):
                return message.outcome
            elif isinstance(message, RunnerGone):
                _say(args, f"\n{message.sentence}")
                return None
        return None
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await client.close()


def _confirm(args: argparse.Namespace, plan: Any) -> bool:
    print(f"Start the {escape_controls(plan.describe())}? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


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
