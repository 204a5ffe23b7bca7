"""A lab's state folder, as `sevconsole lab` writes it, read the way the console reads any host.

    DIR/inventory.toml      the lab hosts ([[host]] with lab = true; identity relative to DIR)
    DIR/known_hosts         their host keys
    DIR/lab-root/ark.cert   the lab's own AMD-format root (trusted only for lab = true hosts)
    DIR/lab-root/ask.cert

Only files are read: the lab itself (sevconsole.lab) is another machine to this layer.
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
    for name in (INVENTORY, KNOWN_HOSTS, f"{LAB_ROOT}/ark.cert", f"{LAB_ROOT}/ask.cert"):
        if not (folder / name).is_file():
            problems.append(InventoryProblem(str(folder / name), None, None,
                                             "missing; is this a lab state folder, and is the lab running?"))
    if problems:
        raise InventoryError(problems)
    return LabState(folder, load_inventory(folder / INVENTORY), folder / KNOWN_HOSTS, folder / LAB_ROOT)
