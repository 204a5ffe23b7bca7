"""`sevconsole cordon [HOST]` and `sevconsole uncordon HOST`: hosts never chosen as a target.

Exit status (cordon): 0 cordoned (or already), or the list shown; 3 unknown host or no fleet.
Exit status (uncordon): 0 lifted; 1 the host was not cordoned; 2 the cordon list cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from sevconsole.textsafe import escape_controls

EXIT_OK, EXIT_NOT_CORDONED, EXIT_BAD_LIST, EXIT_UNKNOWN = 0, 1, 2, 3

CORDON_DESCRIPTION = """\
Cordon HOST: from now on no migration chooses it as a target (the preflight's `cordon` check
fails, `sevconsole evacuate` never offers it, `discover` and the console mark it), until
`sevconsole uncordon HOST`. Guests already on HOST keep running; `sevconsole evacuate HOST`
cordons it and then moves them away. With no HOST, lists the cordoned hosts.

Cordons are kept by host name in the state folder (cordons.json), for every inventory and lab
of this user. HOST must be a host of the fleet (--inventory FILE, --lab DIR or the default
inventory), so a typo cordons nothing.

exit status: 0 cordoned (or already cordoned), or the list shown; 2 the cordon list cannot be
read or written; 3 unknown host or no inventory
"""

UNCORDON_DESCRIPTION = """\
Lift the cordon of HOST: it may be chosen as a migration target again.

exit status: 0 lifted; 1 HOST was not cordoned; 2 the cordon list cannot be read or written
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("cordon", help="never choose HOST as a migration target (list: no HOST)",
                                   description=CORDON_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", metavar="HOST", nargs="?", help="the host to cordon (inventory name)")
    parser.add_argument("--reason", default="", metavar="TEXT", help="why, shown with the cordon")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--inventory", metavar="FILE", type=Path, help="a TOML inventory of [[host]] tables")
    where.add_argument("--lab", metavar="DIR", type=Path, help="a running lab's state folder")
    parser.add_argument("--json", action="store_true", help="print the cordons as JSON")
    _usage_is(parser, EXIT_UNKNOWN)
    parser.set_defaults(func=run_cordon)

    un = subparsers.add_parser("uncordon", help="let HOST be chosen as a migration target again",
                               description=UNCORDON_DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    un.add_argument("host", metavar="HOST", help="the host to uncordon")
    un.add_argument("--json", action="store_true", help="print what was lifted as JSON")
    _usage_is(un, EXIT_BAD_LIST)
    un.set_defaults(func=run_uncordon)


def _usage_is(parser: argparse.ArgumentParser, code: int) -> None:
    def usage_error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: {message}", file=sys.stderr)
        sys.exit(code)

    parser.error = usage_error  # type: ignore[method-assign]


def _err(command: str, message: object) -> None:
    print(f"sevconsole {command}: {escape_controls(message)}", file=sys.stderr)


def run_cordon(args: argparse.Namespace) -> int:
    from sevconsole.engine import audit, cordon

    if args.host is None:
        return _list(args)
    from sevconsole.hosts.fleet import FleetError, open_fleet

    try:
        fleet = open_fleet(inventory=args.inventory, lab=args.lab)
    except FleetError as exc:
        _err("cordon", exc)
        return EXIT_UNKNOWN
    if args.host not in fleet.names:
        _err("cordon", f"{args.host}: no such host in the inventory (hosts: {', '.join(fleet.names)})")
        return EXIT_UNKNOWN
    try:
        entry, new = cordon.cordon(args.host, args.reason or "cordoned by hand", audit.operator_name())
    except cordon.CordonError as exc:
        _err("cordon", exc)
        return EXIT_BAD_LIST
    if args.json:
        print(json.dumps({**entry.to_json(), "new": new}))
    elif new:
        print(escape_controls(f"{entry.host} cordoned: no migration chooses it as a target until "
                              f"`sevconsole uncordon {entry.host}`."))
    else:
        print(escape_controls(f"{entry.host} was already cordoned since {entry.since_text}"
                              + (f" ({entry.reason})." if entry.reason else ".")))
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from sevconsole.engine import cordon

    try:
        entries = sorted(cordon.load().values(), key=lambda c: c.host)
    except cordon.CordonError as exc:
        _err("cordon", exc)
        return EXIT_BAD_LIST
    if args.json:
        print(json.dumps([c.to_json() for c in entries]))
    elif not entries:
        print("no host is cordoned")
    else:
        for c in entries:
            print(escape_controls(f"{c.host}  since {c.since_text}  by {c.by or '?'}  {c.reason}").rstrip())
    return EXIT_OK


def run_uncordon(args: argparse.Namespace) -> int:
    from sevconsole.engine import cordon

    try:
        lifted = cordon.uncordon(args.host)
    except cordon.CordonError as exc:
        _err("uncordon", exc)
        return EXIT_BAD_LIST
    if args.json:
        print(json.dumps({"host": args.host, "lifted": lifted.to_json() if lifted else None}))
    elif lifted is None:
        print(escape_controls(f"{args.host} was not cordoned."), file=sys.stderr)
    else:
        print(escape_controls(f"{args.host} uncordoned: it may be chosen as a migration target again "
                              f"(cordoned since {lifted.since_text})."))
    return EXIT_OK if lifted is not None else EXIT_NOT_CORDONED
