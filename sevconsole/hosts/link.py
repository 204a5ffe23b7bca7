"""SshHost: what the engine needs from a host (its `HostLink` protocol), over SSH.

    host = SshHost(endpoint, pool)                 # or SshHost.for_spec(spec, pool)
    client = await host.open_qmp("/run/vm.qmp")    # a connected, negotiated qemu.qmp QMPClient
    incoming = await host.launch_incoming(argv)    # IncomingVm(pid, qmp)
    await host.stop(incoming.pid)

Blocking SSH work runs in threads, so the event loop never waits on the network. Errors are
the hosts layer's typed errors; an engine may pass `error=` to have them raised as its own
type instead (hosts/ never imports the engine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from qemu.qmp import QMPClient

from sevconsole.hosts import remote
from sevconsole.hosts.errors import HostError
from sevconsole.hosts.inventory import HostSpec
from sevconsole.hosts.qmp import connect_qmp
from sevconsole.hosts.remote import IncomingVm
from sevconsole.hosts.ssh import Endpoint, SshConnection, SshPool, resolve


class SshHost:
    def __init__(self, endpoint: Endpoint, pool: SshPool, *, address: str | None = None,
                 error: Callable[[str, str], Exception] | None = None) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.name = endpoint.name
        # Where the migration stream reaches this host: its address as the other hosts see it.
        self.address = address or endpoint.address
        self._error = error

    @classmethod
    def for_spec(cls, spec: HostSpec, pool: SshPool, **kw: Any) -> SshHost:
        return cls(resolve(spec), pool, **kw)

    def _raise(self, exc: HostError) -> NoReturn:
        if self._error is not None:
            raise self._error(exc.host, exc.message) from exc
        raise exc

    async def _conn(self) -> SshConnection:
        return await asyncio.to_thread(self.pool.get, self.endpoint)

    async def open_qmp(self, path: str) -> QMPClient:
        """A negotiated QMPClient; `await client.disconnect()` also ends the bridge on the host."""
        try:
            link = await connect_qmp(await self._conn(), path)
        except HostError as exc:
            self._raise(exc)
        return link.client

    async def launch_incoming(self, argv: Sequence[str]) -> IncomingVm:
        try:
            conn = await self._conn()
            return await asyncio.to_thread(remote.launch_incoming, conn, list(argv))
        except HostError as exc:
            self._raise(exc)

    async def stop(self, pid: int) -> bool:
        try:
            conn = await self._conn()
            return await asyncio.to_thread(remote.stop, conn, pid)
        except HostError as exc:
            self._raise(exc)

    async def close(self) -> None:
        """Nothing to do: the pool owns the transport and closes it with the pool."""
