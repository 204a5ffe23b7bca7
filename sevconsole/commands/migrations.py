"""`sevconsole migrations`: in-flight and recent migrations (from the journal); `watch ID`
re-attaches to one and streams its progress; `show ID` replays a finished one."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from sevconsole.textsafe import escape_controls

DESCRIPTION = """\
List the migrations this user started, newest first, from their journals: in flight (a runner
owns it), finished (done, rolled back, refused), or unfinished (its runner died: run
`sevconsole recover`). `watch ID` attaches to a running migration from any terminal and shows
its progress as `migrate` does; Ctrl-C there cancels the migration, closing the terminal only
detaches. `show ID` replays a finished migration from the snapshots its runner recorded (page
map, rate chart, firmware panels, with a time scrubber) on a terminal, or prints its summary
(`--json`, or when the output is not a terminal).

exit status: 0 listed, watched to a successful end, or shown; 1 the watched migration failed or
has no runner, or the shown one recorded no snapshots; 2 bad usage or no such migration
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("migrations", help="list in-flight and recent migrations; watch one",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per migration")
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="recent migrations shown (default 20)")
    parser.set_defaults(func=run_list)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    watch = sub.add_parser("watch", help="attach to a migration and stream its progress",
                           description="Attach to migration ID's runner and show its progress until it ends.")
    watch.add_argument("id", metavar="ID", help="the migration's id (see `sevconsole migrations`)")
    watch.add_argument("--json", action="store_true", help="one Progress JSON object per line")
    watch.set_defaults(func=run_watch)
    show = sub.add_parser("show", help="replay a finished migration, or print its summary",
                          description="Replay migration ID from the snapshots its runner recorded: the page "
                                      "map, rate chart and firmware panels at any moment (left/right a frame, "
                                      "shift for a second, home/end, p play, -/+ speed, q quits). With --json, "
                                      "or when stdout is not a terminal, print the summary instead.")
    show.add_argument("id", metavar="ID", help="the migration's id (see `sevconsole migrations`)")
    show.add_argument("--json", action="store_true", help="the replay's summary as one JSON object")
    show.add_argument("--theme", metavar="NAME", help="colour theme of the replay (dark, light, high-contrast)")
    show.set_defaults(func=run_show)


def state_of(entry: Any) -> str:
    if entry.in_flight:
        return "in flight"
    if entry.finished:
        return str(entry.step.value)
    if not entry.journal.trusted:
        return "corrupt journal"
    if entry.step is None:
        return "starting" if entry.runner_alive else "not started"
    return f"unfinished ({entry.step.value}): run recover"


def entry_json(entry: Any) -> dict[str, Any]:
    outcome = entry.outcome or {}
    return {"id": entry.id, "vm": entry.vm, "source": entry.source, "target": entry.target,
            "state": state_of(entry), "step": entry.step.value if entry.step else None,
            "in_flight": entry.in_flight, "unfinished": entry.unfinished, "started": entry.started,
            "result": outcome.get("result"), "message": outcome.get("message"),
            "runnable": outcome.get("runnable"), "problems": list(entry.journal.problems)}


def run_list(args: argparse.Namespace) -> int:
    from sevconsole.engine import journal

    entries = journal.entries()
    shown = [e for e in entries if e.in_flight or e.unfinished] + \
        [e for e in entries if not (e.in_flight or e.unfinished)][:max(0, args.limit)]
    if args.json:
        for e in shown:
            print(json.dumps(entry_json(e)), flush=True)
        return 0
    if not shown:
        print("no migrations yet")
        return 0
    print(f"{'ID':<22} {'VM':<12} {'FROM -> TO':<22} {'STARTED':<19} STATE")
    for e in shown:
        started = datetime.datetime.fromtimestamp(e.started).strftime("%Y-%m-%d %H:%M:%S") if e.started else "?"
        route = f"{e.source} -> {e.target}"
        line = f"{e.id:<22} {e.vm:<12} {route:<22} {started:<19} {state_of(e)}"
        message = (e.outcome or {}).get("message")
        if message and not e.in_flight:
            line += f": {message}"
        print(escape_controls(line))
        for problem in e.journal.problems:
            print(escape_controls(f"    {problem}"))
    return 0


def run_watch(args: argparse.Namespace) -> int:
    from sevconsole.commands.migrate import follow
    from sevconsole.engine import journal
    from sevconsole.engine.run import Result

    try:
        entry = journal.entry(args.id)
    except journal.JournalError as exc:
        print(f"sevconsole migrations watch: {escape_controls(exc)}", file=sys.stderr)
        return 2
    if not entry.runner_alive:
        outcome = entry.outcome
        if outcome is not None:
            print(escape_controls(f"{entry.id} ended: {outcome.get('result')}: {outcome.get('message')}"),
                  file=sys.stderr)
            return 0 if outcome.get("result") == Result.DONE else 1
        print(escape_controls(f"{entry.id} has no runner ({state_of(entry)})"), file=sys.stderr)
        return 1
    return follow(args, entry.id)


def run_show(args: argparse.Namespace) -> int:
    from sevconsole.engine import journal
    from sevconsole.engine.replay import ReplayError, Tape

    def fail(sentence: str, code: int) -> int:
        if args.json:
            print(json.dumps({"id": args.id, "ok": False, "error": sentence}))
        print(f"sevconsole migrations show: {escape_controls(sentence)}", file=sys.stderr)
        return code

    try:
        entry = journal.entry(args.id)
    except journal.JournalError as exc:
        return fail(str(exc), 2)
    if entry.in_flight:
        return fail(f"{entry.id} is still in flight: `sevconsole migrations watch {entry.id}` follows it", 1)
    try:
        tape = Tape.for_migration(entry.id)
    except ReplayError as exc:
        return fail(str(exc), 1)
    viewer = getattr(args, "replay_viewer", None)
    if not args.json and viewer is not None and sys.stdout.isatty() and sys.stdin.isatty():
        return int(viewer(entry.id, getattr(args, "theme", None)) or 0)
    summary = {"ok": True, **tape.summary(), "state": state_of(entry), "outcome": entry.outcome}
    if args.json:
        print(json.dumps(summary))
        return 0
    for line in summary_lines(summary):
        print(escape_controls(line))
    return 0


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The replay's summary for a pipe or a log: one fact a line."""
    mb = 1e6
    lines = [f"{s['id']}: {s['vm']} {s['source']} -> {s['target']}, {s['state']}",
             f"  {s['frames']} snapshots over {s['duration_s']:.2f} s"
             + (f" ({s['thinned']} left out)" if s.get("thinned") else ""),
             "  phases: " + ", ".join(f"{p['phase']} {p['from_s']:.2f}-{p['to_s']:.2f} s" for p in s["phases"]),
             f"  sent {s['bytes_transferred'] / mb:.1f} MB of {s['bytes_total'] / mb:.1f} MB in {s['passes']} "
             f"pass(es), peak {s['peak_rate_bps'] / mb:.1f} MB/s"]
    pages = s.get("pages")
    if pages:
        lines.append("  pages at the end: " + ", ".join(f"{k} {v}" for k, v in pages.items() if v))
    for host, counts in (s.get("sev_commands") or {}).items():
        lines.append(f"  {host}: " + ", ".join(f"{c} x{n}" for c, n in counts.items()))
    lines += [f"  error: {e}" for e in s.get("errors") or ()]
    lines += [f"  note: {p}" for p in s.get("problems") or ()]
    outcome = s.get("outcome") or {}
    if outcome:
        lines.append(f"  outcome: {outcome.get('result')}: {outcome.get('message')}")
    return lines
