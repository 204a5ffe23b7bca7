"""`sevconsole discover`: a table (or JSON) of hosts, their SEV firmware, chain and VMs.

Exit status: 0 every host answered, 1 some host could not be probed (its error says why),
2 bad input (inventory, options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from sevconsole.textsafe import escape_controls

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")

DESCRIPTION = """\
Probe hosts over SSH: reachability, SEV support and firmware, PDH and certificate chain
(verified), and the QEMU VMs with their status and SEV policy.

Hosts come from a TOML inventory (--inventory, default in the user's config folder), a
running lab (--lab DIR), and/or ~/.ssh/config (--ssh-config [PATTERN]).
An unknown host key stops that host with its fingerprint; check it, then pass it with
--accept-host-key to trust it (it is then saved in the console's known_hosts).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("discover", help="list hosts, their SEV firmware and VMs",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--inventory", metavar="FILE", type=Path, help="a TOML inventory of [[host]] tables")
    source.add_argument("--lab", metavar="DIR", type=Path, help="a running lab's state folder")
    parser.add_argument("--ssh-config", nargs="?", const="*", metavar="PATTERN",
                        help="add the Host entries of ~/.ssh/config (optionally only those matching PATTERN)")
    parser.add_argument("--accept-host-key", action="append", default=[], metavar="FINGERPRINT",
                        help="trust an unknown host key with this SHA256:... fingerprint (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="connect and SSH banner timeout per host (default 5)")
    parser.add_argument("--jobs", type=int, default=16, metavar="N", help="hosts probed at once (default 16)")
    parser.add_argument("--no-vms", action="store_true", help="do not open QMP to each VM")
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"sevconsole discover: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from sevconsole import paths
    from sevconsole.hosts.discovery import DiscoveryOptions, discover
    from sevconsole.hosts.errors import InventoryError
    from sevconsole.hosts.fleet import FleetError, open_fleet
    from sevconsole.hosts.inventory import hosts_from_ssh_config
    from sevconsole.hosts.ssh import Timeouts

    bad = [fp for fp in args.accept_host_key if not FINGERPRINT.match(fp)]
    if bad:
        return _fail(f"{bad[0]!r} is not a host key fingerprint; expected SHA256: and 43 base64 "
                     "characters, as shown in the unknown-key message")
    if args.timeout <= 0 or args.jobs < 1:
        return _fail("--timeout must be positive and --jobs at least 1")
    fleet = None
    try:
        # --ssh-config alone needs no inventory; otherwise the hosts come from open_fleet, as for
        # every other command (the inventory, the default one, or --lab).
        if args.lab is not None or args.inventory is not None or args.ssh_config is None \
                or paths.default_inventory().is_file():
            fleet = open_fleet(inventory=args.inventory, lab=args.lab)
        hosts: list[Any] = list(fleet.hosts) if fleet is not None else []
        if args.ssh_config is not None:
            taken = {h.name for h in hosts}
            hosts += [h for h in hosts_from_ssh_config(None if args.ssh_config == "*" else args.ssh_config)
                      if h.name not in taken]
    except FleetError as exc:
        if not exc.problems:
            return _fail(escape_controls(str(exc)))
        for problem in exc.problems:
            print(escape_controls(problem), file=sys.stderr)
        return 2
    except InventoryError as exc:  # --ssh-config's file
        for item in exc.problems:
            print(escape_controls(str(item)), file=sys.stderr)
        return 2
    t = args.timeout
    options = dataclasses.replace(fleet.options if fleet is not None else DiscoveryOptions(),
                                  accept_fingerprints=frozenset(args.accept_host_key), max_workers=args.jobs,
                                  query_vms=not args.no_vms,
                                  timeouts=Timeouts(connect=t, banner=t, handshake=2 * t, auth=2 * t,
                                                    channel=2 * t))
    progress = (lambda r: print(escape_controls(f"  {r.name}: {'ok' if r.reachable and not r.host_key else 'failed'}"),
                                file=sys.stderr)) if sys.stderr.isatty() and not args.json else None
    reports = discover(hosts, options, on_report=progress)
    items = _attention(reports)
    if args.json:
        from sevconsole.hosts.report_json import report_to_dict

        dicts = [report_to_dict(r) for r in reports]
        cordoned = _cordoned()
        for d in dicts:
            d["cordoned"] = d.get("name") in cordoned  # never chosen as a migration target
        for item in items:  # each copy of a guest that needs attention says so, with the safe action
            for d in dicts:
                for vm in d.get("vms") or []:
                    if vm.get("name") == item.vm:
                        vm["attention"] = item.to_json()
        print(json.dumps(dicts, indent=2))
    else:
        print(render_table(reports, _cordoned()))
        if items:
            print(escape_controls(f"\nattention ({len(items)}):"))
            for item in items:
                fix = item.action.sentence if item.action else "no safe action: check the hosts by hand"
                print(escape_controls(f"  {item.vm}: {item.problem}"))
                how = "" if item.action is None else " (`sevconsole recover`, or A in the console)" \
                    if item.action.fix == "recover" else " (A in the console)"
                print(escape_controls(f"      safe action: {fix}{how}"))
    failed = [r for r in reports if not r.reachable or r.host_key is not None or r.hostname is None]
    return 1 if failed else 0


def _sev_words(report: Any) -> tuple[str, str]:
    sev = report.sev
    if sev is None:
        return "-", "-"
    kinds = [k for k, on in (("sev", sev.kernel_sev), ("es", sev.kernel_sev_es)) if on]
    support = ",".join(kinds) or ("no" if sev.kernel_sev is False else "none")
    if sev.dev_sev and not kinds:
        support = "/dev/sev"
    fw = "-" if sev.api is None else f"{sev.api[0]}.{sev.api[1]} b{sev.build}"
    if sev.platform_state is not None:
        fw += " " + {0: "UNINIT", 1: "INIT", 2: "WORKING"}.get(sev.platform_state, str(sev.platform_state))
    return support, fw


def _chain_words(report: Any) -> str:
    caps = report.capabilities
    if caps is None:
        return "-"
    chain = caps.chain_report
    if chain is not None and chain.ok:
        return f"ok ({chain.root.generation})" if chain.root else "ok"
    if chain is not None:
        return f"FAILED ({len(chain.failures)} links)"
    return "unchecked"


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    """Aligned columns; every cell is host data, so each shows its control characters escaped."""
    rows = [[escape_controls(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _cordoned() -> dict[str, Any]:
    """The cordoned hosts (engine/cordon.py); an unreadable list is said once, on stderr."""
    from sevconsole.engine.cordon import CordonError, load

    try:
        return load()
    except CordonError as exc:
        print(escape_controls(f"sevconsole discover: {exc}"), file=sys.stderr)
        return {}


def render_table(reports: list[Any], cordoned: Any = ()) -> str:
    rows = [["HOST", "ADDRESS", "LATENCY", "SEV", "FIRMWARE", "CHAIN", "VMS"]]
    for r in reports:
        support, fw = _sev_words(r)
        alias = r.extra.get("same_machine_as")
        key = r.host_key.status if r.host_key is not None else None
        rows.append([r.name + (" (lab)" if r.lab else "") + (" cordoned" if r.name in cordoned else "")
                     + (f" = {alias}" if alias else "")
                     + {"changed": " REFUSED: host key changed", "unknown": " unknown host key"}.get(key or "", ""),
                     f"{r.address}:{r.port}",
                     "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms",
                     support if r.hostname else "-", fw, _chain_words(r),
                     str(len(r.vms)) if r.hostname else "-"])
    lines = _table(rows)
    for r in reports:
        if not r.vms or r.extra.get("same_machine_as"):  # one machine's VMs are listed once
            continue
        lines += ["", f"{escape_controls(r.name)}:"]
        vm_rows = [["VM", "PID", "STATUS", "MEM", "SEV", "POLICY", "STATE", "MIGRATION", "QMP"]]
        for vm in r.vms:
            migration = (vm.stale if vm.stale else "blocked: " + vm.migration_blocker if vm.migration_blocker
                         else "no (NOSEND)" if vm.sev_enabled and vm.policy is not None and vm.policy & 0x8
                         else {True: "sev ok", False: "no sev migration", None: "-"}[vm.migration_support])
            vm_rows.append([vm.name, str(vm.pid or "-"), vm.status or "?",
                            "-" if vm.memory_mib is None else f"{vm.memory_mib} MiB",
                            "yes" if vm.sev_enabled else "no",
                            "-" if vm.policy is None else f"0x{vm.policy:08x}",
                            vm.sev_state or "-", migration, vm.qmp_path or "-"])
        lines += _table(vm_rows, "  ")
    problems = [e for r in reports for e in r.errors]
    problems += [e for r in reports for vm in r.vms for e in vm.errors]
    problems += [r.capabilities.chain_error for r in reports
                 if r.capabilities is not None and r.capabilities.chain_error]
    if problems:
        lines += ["", "problems:"] + [f"  - {escape_controls(p)}" for p in problems]
    notes = [r.extra["same_machine_note"] for r in reports if r.extra.get("same_machine_note")]
    if notes:
        lines += ["", "notes:"] + [f"  - {escape_controls(n)}" for n in notes]
    return "\n".join(lines)


def _attention(reports: list[Any]) -> list[Any]:
    """Guests with no runnable copy, or a stranded copy, given the journal's migrations."""
    from sevconsole.engine import attention, journal

    entries = journal.entries()
    return attention.find(reports, [e for e in entries if e.in_flight], [e for e in entries if e.unfinished])
