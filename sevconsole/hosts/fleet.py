"""An inventory or a lab folder -> the hosts, how to reach them and what to trust: one place.

Every command that reaches hosts (migrate, the runner, recover, the console) opens its fleet
here, so an inventory problem reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevconsole import paths
from sevconsole.hosts.discovery import DiscoveryOptions, endpoint_for
from sevconsole.hosts.errors import InventoryError
from sevconsole.hosts.inventory import HostSpec, load_inventory, load_ssh_config
from sevconsole.hosts.labdir import load_lab
from sevconsole.hosts.ssh import SshConnection, SshPool


class FleetError(Exception):
    """No hosts to work with; the sentence says what to fix. `problems` holds the inventory's
    problems one by one (file:line: what), for a caller that shows one line each."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class Fleet:
    hosts: tuple[HostSpec, ...]
    options: DiscoveryOptions
    lab_root: Path | None
    lab_dir: Path | None = None  # the lab's state folder, when opened from one
    inventory: Path | None = None  # the inventory file, when opened from one

    def spec(self, name: str) -> HostSpec | None:
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def where(self) -> dict[str, Any]:
        """How a runner or recover reaches the same fleet again (absolute paths)."""
        if self.lab_dir is not None:
            return {"lab": str(self.lab_dir.resolve())}
        return {"inventory": None if self.inventory is None else str(self.inventory.resolve())}

    def connection(self, pool: SshPool, name: str) -> SshConnection:
        spec = self.spec(name)
        if spec is None:
            raise FleetError(f"{name} is not in the inventory (hosts: {', '.join(self.names)})")
        return pool.get(endpoint_for(spec, self.hosts, self.options.ssh_config))


def open_fleet(*, inventory: Path | None = None, lab: Path | None = None) -> Fleet:
    """The hosts of a lab folder, an inventory file, or the default inventory. A bad
    ~/.ssh/config is found here too, before any host is reached."""
    try:
        fleet = _open(inventory, lab)
        load_ssh_config(fleet.options.ssh_config)
        return fleet
    except InventoryError as exc:
        problems = tuple(str(p) for p in exc.problems)
        raise FleetError("; ".join(problems) or str(exc), problems) from None


def _open(inventory: Path | None, lab: Path | None) -> Fleet:
    if lab is not None:
        state = load_lab(lab)
        return Fleet(tuple(state.inventory.hosts),
                     DiscoveryOptions(known_hosts=state.known_hosts, lab_root=state.lab_root),
                     state.lab_root, lab_dir=Path(lab))
    if inventory is None and not paths.default_inventory().is_file():
        raise FleetError(f"no inventory: write {paths.default_inventory()}, or give --inventory FILE "
                         "or --lab DIR")
    inv = load_inventory(inventory)
    return Fleet(tuple(inv.hosts), DiscoveryOptions(known_hosts=inv.known_hosts, lab_root=inv.lab_root),
                 inv.lab_root, inventory=inventory or paths.default_inventory())


def open_where(where: dict[str, Any]) -> Fleet:
    """The fleet a job or journal recorded with `Fleet.where()`."""
    lab, inventory = where.get("lab"), where.get("inventory")
    return open_fleet(lab=Path(lab) if lab else None, inventory=Path(inventory) if inventory else None)


def pick_vm(reports: Sequence[Any], vm: str) -> Any:
    """The VM's copy that runs, or is paused, preferring a running one (a host may also list the
    SENT copy a migration left, or a failed incoming one, under the same name). A stale copy (a
    migration's leftover) is never picked: None when it is all there is."""
    matches = [v for r in reports for v in r.vms if v.name == vm and getattr(v, "stale", None) is None]
    for wanted in (("running",), ("paused",)):
        hit = next((v for v in matches if v.status in wanted), None)
        if hit is not None:
            return hit
    return matches[0] if matches else None
