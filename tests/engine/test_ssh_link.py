"""The engine's SshHost satisfies HostLink over a real sshd and real QEMUs."""

from __future__ import annotations

import pytest

from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import HostLink
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.errors import QmpLinkError
from sevconsole.hosts.ssh import SshPool, resolve
from tests.hosts.conftest import Sshd, pid_gone

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]


def _host(sshd: Sshd, pool: SshPool) -> SshHost:
    endpoint = resolve(sshd.spec("h1"))
    return SshHost("h1", endpoint.address, pool.get(endpoint), reconnect=lambda: pool.get(endpoint))


@pytest.mark.slow
async def test_ssh_host_is_a_host_link(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    host = _host(sshd, pool)
    assert isinstance(host, HostLink) and host.address == "127.0.0.1"
    client = await host.open_qmp(str(vm.qmp))
    try:
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.disconnect()
    # the bridge ended with the client: the socket serves a new client at once
    client = await host.open_qmp(str(vm.qmp))
    await client.disconnect()
    incoming = await host.launch_incoming(vm.argv)
    try:
        client = await host.open_qmp(incoming.qmp)
        try:
            assert (await client.execute("query-status"))["status"] == "inmigrate"
        finally:
            await client.disconnect()
    finally:
        assert await host.stop(incoming.pid) is True
    assert pid_gone(incoming.pid, 5)
    await host.close()


async def test_link_errors_name_the_host(sshd: Sshd, pool: SshPool, tmp_path) -> None:
    host = _host(sshd, pool)
    with pytest.raises(LinkError) as info:
        await host.open_qmp(str(tmp_path / "none.qmp"))
    assert info.value.host == "h1" and "none.qmp" in str(info.value)
    assert isinstance(info.value.__cause__, QmpLinkError)
    await host.close()
