"""The HostLinks and the engine for one migration of a fleet: what the runner drives it with.

One place decides how a host is reached, so the runner, and any other driver, hands the engine
the same kind of link for the same host: an SshHost (SSH + the helper) carrying the host's shared
storage folders from the inventory, or, for a libvirt domain, a LibvirtHost on both ends and
libvirt's own migration (engine/libvirt_run.py) instead of the engine's.
"""

from __future__ import annotations

from typing import Any

from sevconsole.engine.libvirt_link import LibvirtHost
from sevconsole.engine.ssh import SshHost


def link_for(fleet: Any, pool: Any, name: str, address: str, *, libvirt: bool = False) -> SshHost:
    """`fleet` is a hosts.fleet.Fleet, `pool` its SshPool; `address` where QEMU listens for the stream."""
    spec = fleet.spec(name)
    conn = fleet.connection(pool, name)
    storage = spec.shared_storage if spec is not None else ()
    if not libvirt:
        return SshHost(name, address, conn, reconnect=lambda: fleet.connection(pool, name), storage=storage)
    return LibvirtHost(name, address, conn, reconnect=lambda: fleet.connection(pool, name), storage=storage,
                       uri=(spec.libvirt_uri if spec is not None else None) or default_libvirt_uri(conn),
                       mode=spec.libvirt_migration if spec is not None else "p2p")


def default_libvirt_uri(conn: Any) -> str:
    """libvirt over SSH, as the console itself reaches the host."""
    ep = conn.endpoint
    host = f"[{ep.address}]" if ":" in ep.address else ep.address
    return f"qemu+ssh://{ep.user}@{host}:{ep.port}/system"


def links_for(plan: Any, fleet: Any, pool: Any) -> tuple[SshHost, SshHost]:
    libvirt = plan.vm.libvirt is not None
    return (link_for(fleet, pool, plan.source.name, plan.source.address, libvirt=libvirt),
            link_for(fleet, pool, plan.target.name, plan.target.address, libvirt=libvirt))


def migration_for(plan: Any, source: SshHost, target: SshHost, **kw: Any) -> Any:
    """Migration (engine/run.py) or, for a libvirt domain, LibvirtMigration: the same face."""
    if plan.vm.libvirt is not None and isinstance(source, LibvirtHost) and isinstance(target, LibvirtHost):
        from sevconsole.engine.libvirt_run import LibvirtMigration

        return LibvirtMigration(plan, source, target, **kw)
    from sevconsole.engine.run import Migration

    return Migration(plan, source, target, **kw)
