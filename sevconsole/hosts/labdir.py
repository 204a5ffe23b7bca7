"""A lab's state folder, as `sevconsole lab` writes it, read the way the console reads any host.

    DIR/inventory.toml      the lab hosts ([[host]] with lab = true; identity relative to DIR)
    DIR/known_hosts         their host keys
    DIR/lab-root/*.cert     the lab's own AMD-format root, ARK and ASK (trusted only for
                            lab = true hosts); the inventory's `lab_root` may point elsewhere

Only files are read: the lab itself (sevconsole.lab) is another machine to this layer. They are
read like any inventory and known_hosts: bounded, regular files only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sevconsole.hosts.errors import InventoryError, InventoryProblem
from sevconsole.hosts.inventory import Inventory, load_inventory

INVENTORY = "inventory.toml"
KNOWN_HOSTS = "known_hosts"
LAB_ROOT = "lab-root"


@dataclass(frozen=True)
class LabState:
    dir: Path
    inventory: Inventory
    known_hosts: Path
    lab_root: Path  # folder with ark.cert and ask.cert


def load_lab(folder: Path | str) -> LabState:
    folder = Path(folder)
    problems = []
    if not folder.is_dir():
        raise InventoryError([InventoryProblem(str(folder), None, None,
                                               "not a folder; give the state folder `sevconsole lab` printed")])
    for name in (INVENTORY, KNOWN_HOSTS):
        if (folder / name).is_file():
            continue
        # is_file() follows links; anything else there (a FIFO, a folder) is refused, never opened
        what = "not a regular file" if (folder / name).exists() else \
            "missing; is this a lab state folder, and is the lab running?"
        problems.append(InventoryProblem(str(folder / name), None, None, what))
    if problems:
        raise InventoryError(problems)
    inventory = load_inventory(folder / INVENTORY)
    lab_root = inventory.lab_root or folder / LAB_ROOT
    root_dir = lab_root.parent if lab_root.is_file() else lab_root
    if not root_dir.is_dir() or not any(root_dir.glob("*.cert")):
        raise InventoryError([InventoryProblem(str(root_dir), None, None,
                                               "no lab root certificates (*.cert) here")])
    return LabState(folder, inventory, inventory.known_hosts or folder / KNOWN_HOSTS, lab_root)
