"""SshHost satisfies the engine's HostLink protocol over a real sshd and real QEMUs."""

from __future__ import annotations

import pytest

from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import HostLink
from sevconsole.hosts.errors import QmpLinkError
from sevconsole.hosts.link import SshHost
from sevconsole.hosts.ssh import SshPool, resolve
from tests.hosts.conftest import Sshd, pid_gone

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]


@pytest.mark.slow
async def test_ssh_host_is_a_host_link(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    host = SshHost(resolve(sshd.spec("h1")), pool)
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


async def test_errors_in_the_engine_type_when_asked(sshd: Sshd, pool: SshPool, tmp_path) -> None:
    plain = SshHost(resolve(sshd.spec("h1")), pool)
    with pytest.raises(QmpLinkError):
        await plain.open_qmp(str(tmp_path / "none.qmp"))
    wrapped = SshHost(resolve(sshd.spec("h1")), pool, error=LinkError)
    with pytest.raises(LinkError) as info:
        await wrapped.open_qmp(str(tmp_path / "none.qmp"))
    assert info.value.host == "h1" and "none.qmp" in str(info.value)
    assert isinstance(info.value.__cause__, QmpLinkError)
