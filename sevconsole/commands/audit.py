"""`sevconsole audit`: check and read the migration audit log.

Exit codes: 0 done (verify: the chain is intact), 1 the chain is broken (the first bad line is
named), 2 the log cannot be used: a `--file` that is missing or empty, not a regular file, or
unreadable (one line on stderr).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

EXIT_BROKEN, EXIT_INPUT = 1, 2


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("audit", help="verify or show the migration audit log",
                                   description="Every migration appends one hash-chained JSON line "
                                   "to the audit log; `verify` finds an edited or removed line.",
                                   epilog="exit codes: 0 ok, 1 the chain is broken, 2 the log is "
                                   "missing (--file), empty (--file) or unreadable")
    parser.set_defaults(func=lambda args: (parser.print_help(), 3)[1])
    sub = parser.add_subparsers(title="actions", metavar="ACTION")
    verify = sub.add_parser("verify", help="check the hash chain (exit 1 naming the first bad line)")
    verify.add_argument("--file", metavar="PATH", help="audit log (default: the console's own)")
    verify.set_defaults(func=_verify)
    show = sub.add_parser("show", help="print the last entries")
    show.add_argument("--file", metavar="PATH", help="audit log (default: the console's own)")
    show.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    show.add_argument("--json", action="store_true", help="the raw JSON lines")
    show.set_defaults(func=_show)


def _path(args: argparse.Namespace) -> Path:
    from sevconsole.paths import audit_log_file

    return Path(args.file) if args.file else audit_log_file()


def _fail(message: str, code: int = EXIT_INPUT) -> int:
    from sevconsole.textsafe import escape_controls

    print(f"sevconsole audit: {escape_controls(message)}", file=sys.stderr)
    return code


def _verify(args: argparse.Namespace) -> int:
    from sevconsole.engine.audit import AuditError, verify
    from sevconsole.textsafe import escape_controls

    path = _path(args)
    try:
        verdict = verify(path)
    except AuditError as exc:
        return _fail(str(exc))
    if verdict.ok and verdict.lines == 0 and args.file:
        if not path.exists():
            return _fail(f"{path}: no such file; give the audit log to check (default: {_path_default()})")
        return _fail(f"{path} is empty: no migration was ever recorded in it; is it the right file?")
    if verdict.ok and verdict.lines == 0:
        print(f"{escape_controls(path)}: no migrations recorded yet")
        return 0
    for note in verdict.notes:
        print(f"note: {escape_controls(note)}", file=sys.stderr)
    print(escape_controls(verdict.sentence(path)), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else EXIT_BROKEN


def _path_default() -> str:
    from sevconsole.paths import audit_log_file

    return str(audit_log_file())


def _show(args: argparse.Namespace) -> int:
    from sevconsole.boundedio import BoundedReadError, open_regular
    from sevconsole.engine.audit import LINE_LIMIT
    from sevconsole.textsafe import escape_controls

    path = _path(args)
    count = max(args.n, 0)
    try:
        with open_regular(path, "audit log") as handle:
            last: collections.deque[bytes] = collections.deque(maxlen=count)
            for raw in iter(lambda: handle.readline(LINE_LIMIT + 1), b""):
                # an over-long line is shown cut (it is not the writer's anyway); the rest of it
                # is read as further lines and shown as unreadable
                last.append(raw.rstrip(b"\n"))
    except BoundedReadError as exc:
        if exc.missing and not args.file:
            print(f"{escape_controls(path)}: no migrations recorded yet")
            return 0
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc.strerror or exc}")
    for raw in last:
        entry = _parse(raw)
        if args.json:
            # Re-encoded: JSON escapes every control character, so nothing raw reaches the terminal.
            print(json.dumps(entry, sort_keys=True, separators=(",", ":")) if entry is not None
                  else escape_controls(raw.decode("utf-8", "replace")))
        elif entry is None:
            print(f"(unreadable) {escape_controls(raw[:80].decode('utf-8', 'replace'))}")
        else:
            print(_summary(entry))
    return 0


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def _summary(e: dict[str, Any]) -> str:
    from sevconsole.textsafe import escape_controls

    def text(key: str, default: str = "?") -> str:
        value = e.get(key)
        return escape_controls(default if value is None else value)

    def number(key: str) -> float:
        value = e.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

    return (f"{text('seq'):>4} {text('time')[:19]} {text('operator'):<10} {text('vm')} {text('source')} -> "
            f"{text('target')}: {text('outcome')} ({number('bytes') / 1e6:.1f} MB, {number('duration_s'):.1f} s)")
