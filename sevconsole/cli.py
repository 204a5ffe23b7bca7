"""Entry point: `sevconsole [options]` opens the console; sub-commands work without a screen.

Each sub-command lives in a module exposing `register(subparsers)`; that function adds its
parser and sets `func(args) -> int`. Registration modules import their heavy dependencies
inside `func`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sevconsole import __version__

# Order is the order shown by --help. `lab` is "another machine": only this file may import it.
COMMAND_MODULES = (
    "sevconsole.commands.certs",
    "sevconsole.commands.discover",
    "sevconsole.commands.migrate",
    "sevconsole.commands.migrations",
    "sevconsole.commands.recover",
    "sevconsole.commands.evacuate",
    "sevconsole.commands.cordon",
    "sevconsole.commands.audit",
    "sevconsole.lab.cli",
)

DESCRIPTION = """\
Live-migrate AMD SEV confidential VMs between hypervisor hosts.

With no sub-command, opens the console. With no inventory, it starts a local lab of
simulated SEV hosts (reached over real SSH and QMP) and opens on it.
"""

EPILOG = """\
examples:
  sevconsole                          open the console on a built-in lab
  sevconsole --inventory hosts.toml   open the console on real hosts
  sevconsole --guide                  a guided tour of an SEV migration on the lab
  sevconsole lab --hosts 3            run a lab in the foreground
  sevconsole discover --lab DIR       list hosts and VMs of a running lab
  sevconsole certs verify --platform-dir DIR --amd-dir DIR
  sevconsole migrate web --to lab-2 --lab DIR
  sevconsole migrations               in-flight and recent migrations (watch ID re-attaches)
  sevconsole migrations show ID       replay a finished migration (--json: its summary)
  sevconsole recover                  finish migrations whose runner died
  sevconsole evacuate lab-1 --lab DIR  move every guest off a host (cordons it first)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sevconsole",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sevconsole {__version__}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--inventory", metavar="FILE", help="open on the hosts of this TOML inventory")
    source.add_argument("--lab", metavar="DIR", help="open on a running lab (its state directory)")
    parser.add_argument("--theme", metavar="NAME", help="colour theme (dark, light, high-contrast)")
    parser.add_argument("--guide", action="store_true", help="start the guided tour of a migration")
    parser.set_defaults(func=_run_console, replay_viewer=_replay_viewer)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _run_console(args: argparse.Namespace) -> int:
    from sevconsole.tui.main import run_console

    if args.inventory is None and args.lab is None:
        args.lab_starter = _embedded_lab  # the console never imports the lab itself
    return run_console(args)


def _replay_viewer(migration_id: str, theme: str | None) -> int:
    """`migrations show ID` on a terminal: the console's replay screen on its own (commands never
    import the console; this file hands it to them, as it hands the console the lab)."""
    from sevconsole.tui.screens.replay import run_replay

    return run_replay(migration_id, theme)


def _embedded_lab():  # type: ignore[no-untyped-def]
    """A context manager yielding the built-in lab's state folder (4 hosts, lab-4 with a
    realistic PSP). A keeper process runs the lab for as long as a lease is held on it: this
    console's, another console's, or a runner's migrating on it (see sevconsole.lab.keeper)."""
    import contextlib

    from sevconsole import paths
    from sevconsole.lab import keeper

    @contextlib.contextmanager
    def lab():  # type: ignore[no-untyped-def]
        folder = paths.state_dir() / "lab"
        with keeper.attach(folder, "console"):
            yield folder

    return lab()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
