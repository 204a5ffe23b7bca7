"""`sevconsole audit`: check and read the migration audit log."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("audit", help="verify or show the migration audit log",
                                   description="Every migration appends one hash-chained JSON line "
                                   "to the audit log; `verify` finds an edited or removed line.")
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


def _verify(args: argparse.Namespace) -> int:
    from sevconsole.engine.audit import verify

    path = _path(args)
    verdict = verify(path)
    print(verdict.sentence(path), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1


def _show(args: argparse.Namespace) -> int:
    path = _path(args)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        print(f"{path}: no migrations recorded yet")
        return 0
    except OSError as exc:
        print(f"sevconsole audit: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    for line in lines[-max(args.n, 0):] if args.n else []:
        if args.json:
            print(line)
            continue
        try:
            e = json.loads(line)
            print(f"{e.get('seq'):>4} {e.get('time', '?')[:19]} {e.get('operator', '?'):<10} "
                  f"{e.get('vm')} {e.get('source')} -> {e.get('target')}: {e.get('outcome')} "
                  f"({e.get('bytes', 0) / 1e6:.1f} MB, {e.get('duration_s', 0):.1f} s)")
        except (json.JSONDecodeError, AttributeError, TypeError):
            print(f"(unreadable) {line[:80]}")
    return 0
