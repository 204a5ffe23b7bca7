"""`sevconsole` with no sub-command: pick the hosts (inventory, running lab, or a lab that cli.py
started for us), build the backend, run the app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sevconsole import paths
from sevconsole.tui.config import ConsoleConfig


def run_console(args: argparse.Namespace) -> int:
    """`args`: inventory, lab (state dir), theme, guide; `lab_starter` (optional callable
    returning a context manager that yields a started lab's state dir) comes from cli.py."""
    from sevconsole.tui.app import SevConsoleApp
    from sevconsole.tui.live_backend import BackendError, open_backend

    config = ConsoleConfig.load()
    lab_dir = getattr(args, "lab", None)
    inventory = getattr(args, "inventory", None)
    starter = getattr(args, "lab_starter", None)
    if lab_dir is None and inventory is None:
        if paths.default_inventory().is_file():
            inventory = str(paths.default_inventory())
        elif starter is None:
            print("sevconsole: no inventory and no lab; pass --inventory FILE or --lab DIR "
                  "(or run `sevconsole lab` in another terminal).", file=sys.stderr)
            return 2
    try:
        with _lab_context(starter, lab_dir, inventory) as lab_state:
            backend = open_backend(inventory=Path(inventory) if inventory else None,
                                   lab_dir=Path(lab_state) if lab_state else None)
            try:
                app = SevConsoleApp(backend, config=config, theme=getattr(args, "theme", None),
                                    guide=bool(getattr(args, "guide", False)))
                return int(app.run() or 0)
            finally:
                backend.close()
    except BackendError as exc:
        print(f"sevconsole: {exc}", file=sys.stderr)
        return 2


class _lab_context:
    """Start the embedded lab only when no hosts were named (cli.py supplies the starter)."""

    def __init__(self, starter, lab_dir, inventory) -> None:  # type: ignore[no-untyped-def]
        self.starter, self.lab_dir, self.inventory = starter, lab_dir, inventory
        self._cm = None

    def __enter__(self) -> str | None:
        if self.lab_dir or self.inventory or self.starter is None:
            return self.lab_dir
        from sevconsole.tui.live_backend import BackendError

        try:
            cm = self.starter()
            self._cm = cm
            return str(cm.__enter__())
        except Exception as exc:  # the lab's own errors carry the sentence
            self._cm = None
            raise BackendError(f"the built-in lab did not start: {exc}; try `sevconsole lab` in "
                               "another terminal, then `sevconsole --lab DIR`") from exc

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
