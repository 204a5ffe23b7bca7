"""SshHost: the HostLink of a real (or lab) host reached through hosts/: QMP over an SSH bridge,
the remote helper's `launch-incoming` and `stop`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from qemu.qmp import QMPClient

from sevconsole.engine.argv_policy import ArgvRefused, require_target_argv
from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import IncomingVm, QemuGone
from sevconsole.hosts import libvirt, remote
from sevconsole.hosts.errors import HostError
from sevconsole.hosts.qmp import QmpLink, QmpSocketGone, connect_qmp
from sevconsole.hosts.ssh import SshConnection


class SshHost:
    """`reconnect` (e.g. `lambda: pool.get(endpoint)`) gives a fresh transport when the one in
    hand died, so the engine can reach the host again after an SSH drop and roll back."""

    def __init__(self, name: str, address: str, conn: SshConnection, *,
                 reconnect: Callable[[], SshConnection] | None = None, storage: Sequence[str] = ()) -> None:
        self.name = name
        self.storage = tuple(storage)  # the host's shared storage folders (inventory): where disks may be
        self.address = address  # where the target QEMU listens for the migration stream
        self.conn = conn
        self._reconnect = reconnect
        self._links: list[QmpLink] = []
        self._incoming: dict[int, str] = {}  # pid -> QMP socket of the incoming VMs started here

    async def _conn(self) -> SshConnection:
        if not self.conn.alive and self._reconnect is not None:
            try:
                self.conn = await asyncio.to_thread(self._reconnect)
            except HostError as exc:
                raise LinkError(self.name, str(exc)) from exc
        return self.conn

    async def open_qmp(self, path: str) -> QMPClient:
        uuid = libvirt.domain_of(path)
        if uuid is not None:  # libvirt holds that domain's monitor: QMP goes through virsh
            from sevconsole.engine.libvirt_qmp import LibvirtQmpClient

            return LibvirtQmpClient(self.name, self._conn, uuid)  # type: ignore[return-value]
        try:
            link = await connect_qmp(await self._conn(), path)
        except QmpSocketGone as exc:
            raise QemuGone(self.name, str(exc)) from exc
        except HostError as exc:
            raise LinkError(self.name, str(exc)) from exc
        self._links = [x for x in self._links if not x.dropped] + [link]
        return link.client

    async def launch_incoming(self, argv: Sequence[str]) -> IncomingVm:
        # The helper gets the allow-list's command line, never the source's; it adds its own
        # -qmp and -incoming defer.
        try:
            allowed = require_target_argv(argv, self.name, storage=self.storage)
        except ArgvRefused as exc:
            raise LinkError(self.name, str(exc)) from None
        try:
            vm = await asyncio.to_thread(remote.launch_incoming, await self._conn(), list(allowed.argv),
                                         storage=self.storage)
        except HostError as exc:
            raise LinkError(self.name, str(exc)) from exc
        self._incoming[vm.pid] = vm.qmp
        return IncomingVm(pid=vm.pid, qmp=vm.qmp)

    async def stop(self, pid: int) -> bool:
        # the incoming VM's socket goes along, so its files never show up later as a VM
        qmp = self._incoming.get(pid)
        try:
            stopped = await asyncio.to_thread(remote.stop, await self._conn(), pid, qmp=qmp)
        except HostError as exc:
            raise LinkError(self.name, str(exc)) from exc
        self._incoming.pop(pid, None)
        return stopped

    async def close(self) -> None:
        for link in self._links:
            with contextlib.suppress(Exception):
                await link.close()
        self._links.clear()
