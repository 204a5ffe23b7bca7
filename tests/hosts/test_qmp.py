"""QMP over SSH against real QEMUs (TCG), and the helper's launch-incoming and stop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from sevconsole.engine.argv_policy import require_target_argv
from sevconsole.hosts.errors import QmpCommandError, QmpLinkError
from sevconsole.hosts.qmp import open_qmp
from sevconsole.hosts.remote import launch_incoming, probe, stop
from sevconsole.hosts.ssh import SshPool, resolve
from tests.hosts.conftest import Sshd, kill_pid, pid_gone

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]


async def test_query_status_and_migrate_over_ssh(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        assert qmp.bridge.how == "helper"
        status = await qmp.execute("query-status")
        assert status["status"] == "running" and status["running"] is True
        migrate = await qmp.execute("query-migrate")
        assert isinstance(migrate, dict) and migrate.get("status", "none") == "none"
        assert (await qmp.execute("query-name"))["name"] == vm.name
        with pytest.raises(QmpCommandError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
    # closed cleanly: the socket serves the next client at once (QEMU takes one at a time)
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_two_links_share_one_transport(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    a, b = qemu_vm(), qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    async with open_qmp(conn, str(a.qmp)) as qa, open_qmp(conn, str(b.qmp)) as qb:
        names = await asyncio.gather(qa.execute("query-name"), qb.execute("query-name"))
        assert [n["name"] for n in names] == [a.name, b.name]
        assert qa.conn.transport is qb.conn.transport


async def test_socat_fallback_when_the_host_has_no_python(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec("socat-only", port=sshd.socat_only_port)))
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        assert qmp.bridge.how == "socat"
        assert (await qmp.execute("query-name"))["name"] == vm.name


async def test_no_bridge_at_all_lists_what_was_tried(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    """On the no-python port every command runs with PATH=/nonexistent: helper, socat and nc
    all fail, so the error lists what was tried."""
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec("nopy", port=sshd.nopython_port)))
    with pytest.raises(QmpLinkError) as info:
        async with open_qmp(conn, str(vm.qmp)):
            pass
    text = str(info.value)
    assert "helper not available" in text and "socat not available" in text and "nc not available" in text


async def test_missing_socket_is_a_link_error(sshd: Sshd, pool: SshPool, tmp_path: Path) -> None:
    conn = pool.get(resolve(sshd.spec()))
    with pytest.raises(QmpLinkError) as info:
        async with open_qmp(conn, str(tmp_path / "absent.qmp")):
            pass
    assert "absent.qmp" in str(info.value) and "h1" in str(info.value)


async def test_busy_socket_times_out_on_the_greeting(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    async with open_qmp(conn, str(vm.qmp)):
        started = time.monotonic()
        with pytest.raises(QmpLinkError) as info:
            async with open_qmp(conn, str(vm.qmp)):
                pass
        # the helper's bridge gives up after 2 s on its own and says why (not the console's 10 s)
        assert time.monotonic() - started < 8
    assert "no greeting within 2 s: it is held by another client, probably libvirt" in str(info.value)


async def test_dropped_link_is_a_typed_error(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        await qmp.execute("query-status")
        kill_pid(vm.pid)  # QEMU goes away under the link
        with pytest.raises(QmpLinkError) as info:
            await qmp.execute("query-status")
        assert "dropped" in str(info.value)
        assert qmp.dropped


async def test_a_link_breaking_as_the_handshake_ends_is_a_typed_error(sshd: Sshd, pool: SshPool, qemu_vm,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu.qmp asserts it is running once its session is set up; when the link breaks in that
    instant (the cut-at-random-bytes fuzzing found it) that assert is what comes out of connect."""
    from qemu.qmp import QMPClient

    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    real_connect = QMPClient.connect

    async def connect_then_hung_up(self: QMPClient, address: object, *args: object, **kw: object) -> None:
        await real_connect(self, address, *args, **kw)  # type: ignore[arg-type]
        raise AssertionError  # what its `assert self.runstate == Runstate.RUNNING` raises then

    monkeypatch.setattr(QMPClient, "connect", connect_then_hung_up)
    with pytest.raises(QmpLinkError) as info:
        await open_qmp(conn, str(vm.qmp)).__aenter__()
    assert "QMP negotiation on" in str(info.value) and "the link closed during the handshake" in str(info.value)
    monkeypatch.undo()
    # the half-made link was closed: QEMU (one client at a time) serves the next one at once
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_ssh_transport_dying_under_a_link_is_a_typed_error(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    vm = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    async with open_qmp(conn, str(vm.qmp)) as qmp:
        await qmp.execute("query-status")
        conn.transport.close()  # the network goes away, QEMU stays
        with pytest.raises(QmpLinkError) as info:
            await qmp.execute("query-migrate")
        assert "dropped during query-migrate" in str(info.value)
    # the pool notices and reconnects on the next use
    fresh = pool.get(resolve(sshd.spec()))
    assert fresh is not conn and fresh.alive
    async with open_qmp(fresh, str(vm.qmp)) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"


@pytest.mark.slow
async def test_launch_incoming_then_stop(sshd: Sshd, pool: SshPool, qemu_vm) -> None:
    source = qemu_vm()
    conn = pool.get(resolve(sshd.spec()))
    found = {v["name"]: v for v in probe(conn)["vms"]}
    assert found[source.name]["qmp"] == str(source.qmp)
    argv = require_target_argv(found[source.name]["argv"], "h1").argv  # as SshHost hands it over
    incoming = await asyncio.to_thread(launch_incoming, conn, argv)
    try:
        # the helper's own private folder, never the one the source's socket is in
        folder = Path(incoming.qmp).parent
        assert folder.name == f"sevconsole-{os.getuid()}" and folder.stat().st_mode & 0o777 == 0o700
        assert Path(incoming.qmp).name.startswith(f"{source.name}-incoming-")
        async with open_qmp(conn, incoming.qmp) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "inmigrate"
            assert (await qmp.execute("query-name"))["name"] == source.name
        assert stop(conn, incoming.pid) is True
        assert pid_gone(incoming.pid, 5)
        assert stop(conn, incoming.pid) is False  # already gone
    finally:
        kill_pid(incoming.pid)
    # the source was left alone
    async with open_qmp(conn, str(source.qmp)) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
