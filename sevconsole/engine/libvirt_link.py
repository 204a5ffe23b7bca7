"""LibvirtHost: the link to a libvirt-managed host, over SSH and the helper like every host.

libvirt holds each domain's QMP monitor and starts a migration's incoming QEMU itself, so this
link never bridges to a monitor socket and never launches a QEMU: `open_qmp("libvirt:<uuid>")`
gives a client whose commands go through `virsh qemu-monitor-command`, and the migration is
libvirt's own (`migrate`, `job`, `abort`, `state` run the helper's libvirt commands). Every SshHost
opens a `libvirt:<uuid>` QMP path through libvirt (engine/libvirt_qmp.py), so recover and any other
observer read a libvirt domain the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import IncomingVm
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.errors import HostError
from sevconsole.hosts.remote import run_helper
from sevconsole.hosts.ssh import SshConnection

MODES = ("p2p", "client")  # libvirt's peer-to-peer migration, or one managed by virsh as the client


class LibvirtHost(SshHost):
    def __init__(self, name: str, address: str, conn: SshConnection, *, uri: str, mode: str = "p2p",
                 reconnect: Callable[[], SshConnection] | None = None, storage: Sequence[str] = ()) -> None:
        super().__init__(name, address, conn, reconnect=reconnect, storage=storage)
        self.uri = uri  # how another host's libvirt reaches this one's (a migration's destination)
        self.mode = mode if mode in MODES else "p2p"

    async def launch_incoming(self, argv: Sequence[str]) -> IncomingVm:
        raise LinkError(self.name, "libvirt starts the incoming VM of a libvirt domain itself; this link "
                        "migrates libvirt domains through libvirt's own migration")

    async def _helper(self, command: str, *args: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        import json

        conn = await self._conn()
        stdin = json.dumps(request).encode() if request is not None else None
        try:
            return await asyncio.to_thread(run_helper, conn, command, *args, stdin=stdin)
        except HostError as exc:
            raise LinkError(self.name, str(exc)) from exc

    async def migrate(self, uuid: str, dest_uri: str, **options: Any) -> dict[str, Any]:
        """Start libvirt's live migration of `uuid` to `dest_uri`, detached on this host; the
        answer's `stem` finds its outcome later (`job`)."""
        return await self._helper("libvirt-migrate", request={"domain": uuid, "dest_uri": dest_uri,
                                                              "p2p": self.mode == "p2p", **options})

    async def job(self, uuid: str, stem: str | None = None, *, tidy: bool = False) -> dict[str, Any]:
        return await self._helper("libvirt-job", uuid, request={"stem": stem, "tidy": tidy})

    async def abort(self, uuid: str) -> dict[str, Any]:
        return await self._helper("libvirt-abort", uuid)

    async def state(self, uuid: str) -> dict[str, Any]:
        """{"state": libvirt's domain state or None when it has no such domain, "persistent": bool}."""
        return await self._helper("libvirt-state", uuid)
