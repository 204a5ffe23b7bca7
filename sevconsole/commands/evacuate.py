"""`sevconsole evacuate HOST`: cordon a host, plan where each guest goes, confirm, move them all.

Exit status: 0 every movable guest moved; 1 a guest that was to move did not (or not
confirmed, or cancelled); 2 refused at plan (blockers without --skip-blocked, no target fits,
the host cannot be probed, another evacuation of it runs); 3 unknown host or bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from sevconsole.textsafe import escape_controls

EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2, 3

DESCRIPTION = """\
Move every guest off HOST, typically before updating its SEV firmware or kernel.

1. HOST is cordoned first: no migration chooses it as a target until `sevconsole uncordon HOST`
   (a run that starts nothing lifts the cordon it made).
2. Every host is probed; each SEV guest's dirty rate is measured by its QEMU (calc-dirty-rate);
   the preflight of every guest against every target gives the targets its policy and the fleet
   allow (DOMAIN, chain, API, ES, cbitpos, memory, cordons). Each guest gets a target, memory
   packed so no target is overcommitted. Guests that cannot move (NOSEND, QEMU's migration
   blocker, no compatible target, a dirty rate the PSP cannot outrun) are blockers: without
   --skip-blocked nothing starts while there is one.
3. The plan is shown and, unless --yes, confirmed.
4. The migrations run in runner processes of their own (as `sevconsole migrate`), on a
   PSP-aware schedule: a host's PSP encrypts one page at a time (about 400 pages/s), so SEV
   guests sharing a PSP share its rate; a guest dirtying more than half its share gets the PSP
   alone (the largest dirtiers first), the next migration's set-up overlaps the end of the
   previous one, plain guests move alongside; at most --parallel migrations at once.
5. A migration that fails leaves its guest running on HOST; its target is dropped, the rest is
   re-planned over the other targets and the guest tried once more elsewhere.

The fleet view shows one row per guest (target, phase, progress, rate, ETA, result) and the
totals, redrawn in place on a terminal, as lines otherwise; --json prints one JSON object per
change on stdout ({"event": "plan" | "guest" | "fleet" | "note" | "end", ...}), text on stderr.
Ctrl-C cancels: nothing more starts and running migrations roll back (guests stay on HOST).
If this command dies, running migrations finish in their runners; `sevconsole evacuate HOST`
again continues the same evacuation (record in the state folder), `sevconsole recover` finishes
migrations whose runner died.

exit status: 0 every movable guest moved; 1 a guest that was to move did not (also: not
confirmed, cancelled); 2 refused at plan (blockers without --skip-blocked, no target fits, HOST
cannot be probed, HOST already being evacuated); 3 unknown host or bad usage
"""


class _UsageError(Exception):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("evacuate", help="move every guest off a host (cordons it first)",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", metavar="HOST", help="the host to empty (inventory name)")
    parser.add_argument("--to", nargs="+", action="extend", default=[], metavar="HOST",
                        help="only these targets (repeatable; default: every other host)")
    parser.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="at most N migrations at once (default 4; the PSP rules come first)")
    parser.add_argument("--skip-blocked", action="store_true",
                        help="move the movable guests and leave the blocked ones on HOST")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--inventory", metavar="FILE", type=Path, help="a TOML inventory of [[host]] tables")
    where.add_argument("--lab", metavar="DIR", type=Path, help="a running lab's state folder")
    parser.add_argument("--downtime-ms", type=int, default=300, metavar="N",
                        help="downtime limit of each guest's final copy in ms (default 300)")
    parser.add_argument("--bandwidth", type=float, metavar="MBPS",
                        help="cap each migration's stream at MBPS megabytes per second")
    parser.add_argument("--stall-warn", type=float, default=10.0, metavar="S",
                        help="warn when a migration moved no byte for S seconds (default 10)")
    parser.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                        help="cancel a migration that moved no byte for S seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="one JSON object per change on stdout")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    def usage_error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        print(f"sevconsole evacuate: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = usage_error  # type: ignore[method-assign]  # bad usage is 3; 2 means refused
    parser.set_defaults(func=run)


def _say(args: argparse.Namespace, text: str = "") -> None:
    print(escape_controls(text) if text else "", file=sys.stderr if args.json else sys.stdout, flush=True)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _options(args: argparse.Namespace) -> Any:
    from sevconsole.engine.evacuate import EvacOptions

    if args.parallel < 1:
        raise _UsageError("--parallel must be at least 1")
    if args.downtime_ms < 0:
        raise _UsageError("--downtime-ms must be 0 or more")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        raise _UsageError("--bandwidth must be a positive, finite number of MB/s")
    if not (math.isfinite(args.stall_warn) and math.isfinite(args.stall_timeout)
            and 0 < args.stall_warn <= args.stall_timeout):
        raise _UsageError("--stall-warn must be positive and at most --stall-timeout")
    return EvacOptions(host=args.host, to=tuple(dict.fromkeys(args.to)), parallel=args.parallel,
                       skip_blocked=args.skip_blocked, downtime_ms=args.downtime_ms,
                       bandwidth_bps=None if args.bandwidth is None else int(args.bandwidth * 1e6),
                       stall_warn_s=args.stall_warn, stall_timeout_s=args.stall_timeout)


def run(args: argparse.Namespace) -> int:
    from sevconsole.engine import evac_record
    from sevconsole.engine.evacuate import EvacError, check_names
    from sevconsole.hosts.fleet import FleetError, open_fleet

    try:
        options = _options(args)
        fleet = open_fleet(inventory=args.inventory, lab=args.lab)
        check_names(fleet, options)
        if sys.stdin.isatty():  # a protected identity the ssh-agent lacks: asked once, passed to runners
            from sevconsole.hosts import passphrases

            passphrases.set_asker(passphrases.tty_asker)
    except (_UsageError, FleetError) as exc:
        print(f"sevconsole evacuate: {escape_controls(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except EvacError as exc:
        print(f"sevconsole evacuate: {escape_controls(exc)}", file=sys.stderr)
        return exc.code
    with evac_record.hold(options.host) as held:
        if not held:
            _say(args, f"sevconsole evacuate: {options.host} is already being evacuated by another process; "
                       "nothing was started")
            return EXIT_REFUSED
        return asyncio.run(_evacuate(args, fleet, options))


async def _evacuate(args: argparse.Namespace, fleet: Any, options: Any) -> int:
    from sevconsole.engine.evac_view import plan_lines
    from sevconsole.engine.evacuate import EvacError, Evacuation, abandon, prepare
    from sevconsole.hosts.chains import trust_with_lab_root

    try:
        prepared = await prepare(fleet, options, trust=trust_with_lab_root(fleet.lab_root),
                                 say=lambda text: _say(args, text))
    except EvacError as exc:
        _say(args, f"sevconsole evacuate: {exc}")
        return exc.code
    plan = prepared.plan
    for line in plan_lines(plan):
        _say(args, line)
    for vm, (mid, target, _guest) in prepared.adopted.items():
        _say(args, f"  {vm} -> {target}: already migrating (migration {mid}); followed, not started again")
    if args.json:
        _emit({"event": "plan", "id": prepared.record.id, **plan.to_json(),
               "adopted": {vm: {"migration": mid, "target": t} for vm, (mid, t, _g) in prepared.adopted.items()}})
    refusal = prepared.refusal
    if refusal is not None:
        _say(args, f"refused: {refusal}.")
        _end(args, abandon(prepared, EXIT_REFUSED), EXIT_REFUSED)
        return EXIT_REFUSED
    if not plan.moves and not prepared.adopted:
        _say(args, f"nothing to move: {options.host} runs no guest that can move.")
        _end(args, abandon(prepared, EXIT_DONE), EXIT_DONE)
        return EXIT_DONE
    if not args.yes and not _confirm(options.host, len(plan.moves)):
        _say(args, "not confirmed: nothing was started.")
        _end(args, abandon(prepared, EXIT_FAILED), EXIT_FAILED)
        return EXIT_FAILED
    show = _JsonStream() if args.json else _Table() if sys.stdout.isatty() else _Lines()
    evacuation = Evacuation(prepared, show)
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        _say(args, "\ncancelling: nothing more starts, running migrations roll back ...")
        evacuation.cancel("cancelled by the operator (Ctrl-C)")

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        code = await evacuation.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    view = evacuation.view()
    if not isinstance(show, _JsonStream):  # a JSON stream has no closing table
        show.final(view)
    _say(args, f"evacuation {view.id}: " + ("every movable guest moved" if code == EXIT_DONE
                                            else "some guests did not move (see above)")
         + f"; {options.host} stays cordoned (`sevconsole uncordon {options.host}`).")
    _end(args, None, code, view)
    return code


def _end(args: argparse.Namespace, sentence: str | None, code: int, view: Any = None) -> None:
    if sentence:
        _say(args, sentence)
    if args.json:
        _emit({"event": "end", "exit": code, "sentence": sentence,
               "summary": None if view is None else view.summary.to_json()})


def _confirm(host: str, count: int) -> bool:
    print(escape_controls(f"Start the evacuation of {host} ({count} migration(s))? [y/N] "), end="",
          file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class _JsonStream:
    """One JSON object per change: a guest row, the fleet totals, a note."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.summary: tuple[Any, ...] = ()
        self.notes = 0

    def __call__(self, view: Any) -> None:
        for row in view.rows:
            if self.rows.get(row.vm) != row:
                self.rows[row.vm] = row
                _emit({"event": "guest", **row.to_json()})
        s = view.summary
        key = (s.moved, s.left, s.running, s.blocked, s.failed,
               None if s.time_left_s is None else round(s.time_left_s))
        if key != self.summary:
            self.summary = key
            _emit({"event": "fleet", "id": view.id, "host": view.host, **s.to_json()})
        for note in view.notes[self.notes:]:
            _emit({"event": "note", "text": note})
        self.notes = len(view.notes)


class _Lines:
    """Not a terminal: a line per guest whose status, phase or note changed, and the totals."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Any, ...]] = {}
        self.summary = ""
        self.notes = 0

    def __call__(self, view: Any) -> None:
        from sevconsole.engine.evac_view import change_line, summary_line

        stamp = time.strftime("%H:%M:%S")
        for row in view.rows:
            key = (row.status, row.phase, row.target, row.note, None if row.percent is None else int(row.percent // 25))
            if self.seen.get(row.vm) != key:
                self.seen[row.vm] = key
                print(escape_controls(f"{stamp} {change_line(row)}"), flush=True)
        for note in view.notes[self.notes:]:
            print(escape_controls(f"{stamp} note: {note}"), flush=True)
        self.notes = len(view.notes)
        line = summary_line(view)
        counts = line.split("; elapsed")[0]
        if counts != self.summary:
            self.summary = counts
            print(escape_controls(f"{stamp} {line}"), flush=True)

    def final(self, view: Any) -> None:
        from sevconsole.engine.evac_view import table_lines

        for line in table_lines(view, width=200):
            print(escape_controls(line), flush=True)


class _Table:
    """A terminal: the fleet table redrawn in place, at most a few times a second."""

    def __init__(self) -> None:
        self.drawn = 0
        self.last = 0.0
        self.pending: Any = None

    def __call__(self, view: Any) -> None:
        self.pending = view
        now = time.monotonic()
        if view.done or now - self.last >= 0.25:
            self.last = now
            self._draw(view)

    def _draw(self, view: Any) -> None:
        from sevconsole.engine.evac_view import table_lines

        width = max(40, shutil.get_terminal_size((120, 40)).columns)
        lines = [escape_controls(line)[:width - 1] for line in table_lines(view, width=width - 1)]
        lines += [escape_controls(f"note: {n}")[:width - 1] for n in view.notes[-3:]]
        out = (f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines) + "\n"
        sys.stdout.write(out)
        sys.stdout.flush()
        self.drawn = len(lines)

    def final(self, view: Any) -> None:
        self._draw(view)
