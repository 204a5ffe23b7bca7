"""`sevconsole recover`: finish every migration whose runner died, by the engine's own rules.

Exit status: 0 all reconciled (or nothing to do), 1 one needs the operator, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sevconsole.textsafe import escape_controls

DESCRIPTION = """\
Take every unfinished migration whose runner is gone (its terminal closed with it, it was
killed, the machine rebooted), observe both ends over SSH and QMP, and apply the engine's own
finish/rollback rules until exactly one copy of the guest can run: a stream still flowing is
cancelled; a target that holds the whole guest while the source was SENT is resumed; otherwise
the incoming VM is stopped and the source resumed. Each result goes to the audit log.

Without --inventory or --lab each migration is reached the way it was started; with one, only
the migrations started on that fleet are taken. Two recovers at once: the second waits.

exit status: 0 all reconciled (or nothing to do), 1 one needs the operator (the sentence says
what and why), 2 bad input
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("recover", help="finish migrations whose runner died (one runnable copy)",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--inventory", metavar="FILE", type=Path, help="only migrations on this inventory's hosts")
    where.add_argument("--lab", metavar="DIR", type=Path, help="only migrations on this lab")
    parser.add_argument("--json", action="store_true", help="one JSON object per migration, then a summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sevconsole.hosts.fleet import FleetError, open_fleet

    override = None
    if args.inventory is not None or args.lab is not None:
        try:
            override = open_fleet(inventory=args.inventory, lab=args.lab)
        except FleetError as exc:
            print(f"sevconsole recover: {escape_controls(exc)}", file=sys.stderr)
            return 2

    def say(text: str) -> None:
        print(escape_controls(text), file=sys.stderr if args.json else sys.stdout, flush=True)

    from sevconsole.engine.recover import recover_all

    results = recover_all(override, on_wait=lambda: say("another recover is running: waiting for it ..."),
                          on_start=lambda e: say(f"recovering {e.id}: {e.vm} {e.source} -> {e.target} "
                                                 f"(last step: {e.step.value if e.step else '?'})"))
    for r in results:
        if args.json:
            print(json.dumps(r.to_json()), flush=True)
        else:
            where = ", ".join(r.runnable) or "nowhere"
            mark = {"reconciled": "ok", "needs-operator": "NEEDS OPERATOR", "skipped": "skipped"}[r.result]
            print(escape_controls(f"{mark}: {r.id} {r.vm}: {r.sentence} (runnable on: {where})"), flush=True)
    need = [r for r in results if r.result == "needs-operator"]
    summary = {"reconciled": sum(r.result == "reconciled" for r in results), "needs_operator": len(need),
               "skipped": sum(r.result == "skipped" for r in results)}
    if args.json:
        print(json.dumps({"summary": summary}), flush=True)
    elif not results:
        print("nothing to recover: no unfinished migration without a runner")
    return 1 if need else 0
