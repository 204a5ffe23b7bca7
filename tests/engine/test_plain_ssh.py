"""Plain migration of a real QEMU (TCG) through the engine over a real OpenSSH sshd: QMP through
the SSH bridge, the target QEMU started by the remote helper, the stream over loopback."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from sevconsole.engine.checks import preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import Migration
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.inventory import HostSpec
from sevconsole.hosts.ssh import SshPool, Timeouts
from tests.hosts.conftest import Sshd, kill_pid, pid_gone

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu, pytest.mark.slow, pytest.mark.timeout(90)]


def _options(tmp_path: Path) -> DiscoveryOptions:
    return DiscoveryOptions(known_hosts=tmp_path / "kh", system_known_hosts=(), amd_roots=tmp_path / "none",
                            ssh_config=tmp_path / "none", use_agent=False,
                            timeouts=Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10))


@pytest.fixture
def hosts(sshd: Sshd, machine_b: Sshd) -> dict[str, HostSpec]:
    """h1 on this machine's sshd, h2 on another machine (its own host key and machine id)."""
    return {"h1": sshd.spec("h1"), "h2": machine_b.spec("h2")}


def _plan(hosts: dict[str, HostSpec], pool: SshPool, tmp_path: Path, name: str, **kw: object) -> MigrationPlan:
    src, dst = discover([hosts["h1"], hosts["h2"]], _options(tmp_path), pool=pool)
    vm = src.vm(name)
    assert vm is not None and vm.status == "running", [v.name for v in src.vms]
    return MigrationPlan(vm=vm, source=src, target=dst, **kw)  # type: ignore[arg-type]


def _links(hosts: dict[str, HostSpec], pool: SshPool, plan: MigrationPlan) -> tuple[SshHost, SshHost]:
    from sevconsole.hosts.ssh import resolve

    return tuple(SshHost(r.name, "127.0.0.1", pool.get(resolve(hosts[r.name])))  # type: ignore[return-value]
                 for r in (plan.source, plan.target))


async def _status(link: SshHost, qmp: str) -> str:
    client = await link.open_qmp(qmp)
    try:
        return str((await client.execute("query-status"))["status"])
    finally:
        await client.disconnect()


async def test_plain_migration_over_sshd(hosts: dict[str, HostSpec], pool2: SshPool, qemu_vm, tmp_path: Path) -> None:
    source_vm = qemu_vm(f"mig{uuid.uuid4().hex[:6]}")
    plan = _plan(hosts, pool2, tmp_path, source_vm.name)
    checks = preflight(plan)
    assert not refused(checks), checks
    src, dst = _links(hosts, pool2, plan)
    seen: list[Progress] = []
    outcome = await Migration(plan, src, dst, checks=checks, on_progress=seen.append, poll_interval_s=0.05).run()
    try:
        assert outcome.result == "done", outcome
        assert outcome.runnable == ("h2",)
        assert outcome.target_status == "running" and outcome.source_status == "postmigrate"
        assert outcome.target_pid is not None and outcome.target_pid != source_vm.pid
        assert await _status(dst, outcome.target_qmp) == "running"
        assert pid_gone(source_vm.pid, 10)  # the stopped source was retired (quit)
        assert [p.bytes_transferred for p in seen] == sorted(p.bytes_transferred for p in seen)
        assert seen[-1].phase is Phase.DONE
    finally:
        if outcome.target_pid:
            kill_pid(outcome.target_pid)
        await src.close()
        await dst.close()


async def test_target_killed_over_sshd(hosts: dict[str, HostSpec], pool2: SshPool, qemu_vm, tmp_path: Path) -> None:
    source_vm = qemu_vm(f"mig{uuid.uuid4().hex[:6]}")
    plan = _plan(hosts, pool2, tmp_path, source_vm.name, bandwidth_bps=100_000)
    src, dst = _links(hosts, pool2, plan)
    killed: list[int] = []
    mig: Migration

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0 and not killed and mig.incoming:
            killed.append(mig.incoming.pid)
            os.kill(mig.incoming.pid, signal.SIGKILL)

    mig = Migration(plan, src, dst, on_progress=watch, poll_interval_s=0.05)
    outcome = await mig.run()
    source_status = await _status(src, str(source_vm.qmp))
    await src.close()
    await dst.close()
    assert killed and outcome.result == "failed", outcome
    assert outcome.runnable == ("h1",) and outcome.target_pid is None
    assert source_status == "running"
    # its socket file outlived it: the engine says the VM left, not "Connection refused"
    assert not any("Connection refused" in e for e in outcome.errors), outcome.errors
    assert outcome.progress is not None and any("has already exited" in e for e in outcome.progress.events)


async def test_clean_cancel_over_sshd_says_nothing_of_refused_sockets(hosts: dict[str, HostSpec], pool2: SshPool, qemu_vm,
                                                                       tmp_path: Path) -> None:
    source_vm = qemu_vm(f"can{uuid.uuid4().hex[:6]}")
    plan = _plan(hosts, pool2, tmp_path, source_vm.name, bandwidth_bps=100_000)
    src, dst = _links(hosts, pool2, plan)
    launched: list[str] = []
    mig: Migration

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0 and not launched and mig.incoming:
            launched.append(mig.incoming.qmp)
            mig.cancel("the operator changed their mind")

    mig = Migration(plan, src, dst, on_progress=watch, poll_interval_s=0.05)
    outcome = await mig.run()
    source_status = await _status(src, str(source_vm.qmp))
    await src.close()
    await dst.close()
    assert launched and outcome.result == "cancelled", outcome
    assert outcome.runnable == ("h1",) and source_status == "running"
    assert not any("refused" in e.lower() for e in outcome.errors), outcome.errors
    folder = Path(launched[0]).parent  # the incoming VM's socket and log went with it
    assert not list(folder.glob(f"{source_vm.name}-incoming-*"))


async def test_keep_source_leaves_a_stale_copy_that_is_never_picked(hosts: dict[str, HostSpec], pool2: SshPool, qemu_vm,
                                                                     tmp_path: Path) -> None:
    from sevconsole.hosts.fleet import pick_vm

    source_vm = qemu_vm(f"kep{uuid.uuid4().hex[:6]}")
    plan = _plan(hosts, pool2, tmp_path, source_vm.name, keep_source=True)
    src, dst = _links(hosts, pool2, plan)
    outcome = await Migration(plan, src, dst, checks=preflight(plan), poll_interval_s=0.05).run()
    try:
        assert outcome.result == "done" and "QEMU quit" not in outcome.message, outcome
        assert await _status(src, str(source_vm.qmp)) == "postmigrate"
        reports = discover([hosts["h1"], hosts["h2"]], _options(tmp_path), pool=pool2)
        copies = [(r.name, v) for r in reports for v in r.vms if v.name == source_vm.name]
        stale = [v.stale for _, v in copies if v.stale]
        # both test machines see every process of this one: the stale copy (listed by each) says where
        # the guest went, when that is another host
        assert stale and all(s.startswith(f"stale copy of VM {source_vm.name}") for s in stale), copies
        assert f"stale copy of VM {source_vm.name} (now on h1)" in stale
        assert pick_vm(reports, source_vm.name).pid == outcome.target_pid
        assert pick_vm([r for r in reports if r.name == "h1"], source_vm.name).stale is None
    finally:
        if outcome.target_pid:
            kill_pid(outcome.target_pid)
        await src.close()
        await dst.close()
