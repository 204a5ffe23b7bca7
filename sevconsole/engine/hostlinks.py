"""The HostLink for one host of a fleet: what the runner drives each end of a migration with.

One place decides how a host is reached, so the runner, and any other driver, hands the engine
the same kind of link for the same host: an SshHost (SSH + the helper) carrying the host's shared
storage folders from the inventory.
"""

from __future__ import annotations

from typing import Any

from sevconsole.engine.ssh import SshHost


def link_for(fleet: Any, pool: Any, name: str, address: str) -> SshHost:
    """`fleet` is a hosts.fleet.Fleet, `pool` its SshPool; `address` where QEMU listens for the stream."""
    spec = fleet.spec(name)
    return SshHost(name, address, fleet.connection(pool, name), reconnect=lambda: fleet.connection(pool, name),
                   storage=spec.shared_storage if spec is not None else ())
