"""QMP to a libvirt domain for the engine: `libvirt:<uuid>` paths opened by any SshHost.

libvirt holds the domain's monitor, so each command is one helper call running `virsh
qemu-monitor-command` (hosts/libvirt.py); nothing stays open between commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sevconsole.engine.errors import LinkError
from sevconsole.hosts import libvirt
from sevconsole.hosts.errors import HostError
from sevconsole.hosts.ssh import SshConnection


class LibvirtQmpClient:
    """The part of qemu.qmp's QMPClient the engine uses (execute, disconnect), through libvirt.
    Errors are LinkErrors naming the host (QEMU's own refusal keeps its words)."""

    def __init__(self, host: str, conn: Callable[[], Awaitable[SshConnection]], uuid: str) -> None:
        self.host = host
        self._conn = conn  # the link's current transport (it reconnects a dead one)
        self.uuid = uuid

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        conn = await self._conn()
        try:
            return await asyncio.to_thread(libvirt.LibvirtQmp(conn, self.uuid).execute, command, arguments)
        except HostError as exc:
            raise LinkError(self.host, str(exc)) from exc

    async def disconnect(self) -> None:
        return None  # nothing held open: each command is one helper call

    def register_listener(self, listener: Any) -> None:
        return None  # libvirt keeps QEMU's events; the engine polls
