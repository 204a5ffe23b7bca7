"""libvirt-managed hosts against two real libvirt daemons (tests/hosts/libvirt_rig.py): reached
over SSH and the helper only, QMP through `virsh qemu-monitor-command`, a held monitor said at
once with no bridge left behind, and libvirt's own live migration (peer to peer through the
runner as `sevconsole migrate` runs it; virsh as the client, cancelled) with the same preflight,
journal, census and audit as every migration."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.engine.checks import CheckStatus, preflight, refused
from sevconsole.engine.libvirt_link import LibvirtHost
from sevconsole.engine.libvirt_run import LibvirtMigration
from sevconsole.engine.machine import Step
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Progress
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.errors import QmpLinkError
from sevconsole.hosts.qmp import open_qmp
from sevconsole.hosts.remote import BOOTSTRAP
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.hosts.ssh import SshPool, Timeouts, resolve
from tests.hosts.conftest import pid_gone
from tests.hosts.libvirt_rig import LibvirtHost as RigHost
from tests.hosts.libvirt_rig import LibvirtPair, save_caps, start_pair
from tests.reliability.rig import Console

pytestmark = [pytest.mark.needs_qemu, pytest.mark.needs_sshd, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtPair]:
    started = start_pair(tmp_path_factory.mktemp("libvirt"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def pool(pair: LibvirtPair, tmp_path: Path) -> Iterator[SshPool]:
    with _options(pair, tmp_path).pool() as made:
        yield made


def _options(pair: LibvirtPair, tmp_path: Path) -> DiscoveryOptions:
    return DiscoveryOptions(known_hosts=pair.known_hosts, system_known_hosts=(), amd_roots=tmp_path / "none",
                            ssh_config=tmp_path / "none", use_agent=False,
                            timeouts=Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10, command=60))


def _link(host: RigHost, pool: SshPool, mode: str = "p2p") -> LibvirtHost:
    return LibvirtHost(host.name, "127.0.0.1", pool.get(resolve(host.spec())), uri=host.uri, mode=mode)


def no_bridges_left(host: RigHost) -> bool:
    """Every helper bridge on that host ends (each waited for through a pidfd, not guessed)."""
    return all(pid_gone(pid, 3) for pid in _bridges(host))


def _bridges(host: RigHost) -> list[int]:
    """The helper's QMP bridges running on that host (its own PID namespace), as this test sees them."""
    found = []
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if BOOTSTRAP.encode() in argv and b"qmp" in argv:
            found.append(pid)
    return found


async def test_discovery_sees_libvirt_domains_through_libvirt(pair: LibvirtPair, pool: SshPool,
                                                              tmp_path: Path) -> None:
    uuid = pair.a.start_guest("disc")
    save_caps(pair.a)
    try:
        a, b = discover([pair.a.spec(), pair.b.spec()], _options(pair, tmp_path), pool=pool)
        vm = a.vm("disc")
        assert vm is not None and not a.errors, a.errors
        assert vm.libvirt == uuid and vm.qmp_path == f"libvirt:{uuid}" and vm.status == "running"
        assert vm.memory_mib == 64 and not vm.sev_enabled and vm.pid is not None and vm.migration_blocker is None
        assert [v.name for v in a.vms].count("disc") == 1  # its QEMU is listed once, as the domain
        facts = a.libvirt
        assert facts is not None and facts["uri"] == "qemu:///system" and facts["version"].startswith("QEMU")
        # SEV as libvirt sees it, in libvirt's words
        assert facts["sev_supported"] is False and "QEMU does not support SEV guest" in facts["sev_refusal"]
        assert b.vm("disc") is None and b.extra["machine_id"] != a.extra["machine_id"]
        # QMP to a libvirt domain goes through virsh qemu-monitor-command, never the monitor socket,
        # from any link to that host (recover observes with a plain SshHost)
        client = await SshHost("hv-a", "127.0.0.1", pool.get(resolve(pair.a.spec()))).open_qmp(vm.qmp_path)
        assert (await client.execute("query-status"))["status"] == "running"
        assert (await client.execute("query-name"))["name"] == "disc"
        assert _bridges(pair.a) == []
    finally:
        pair.a.virsh("destroy", "disc")
        pair.a.virsh("undefine", "disc")


async def test_a_monitor_libvirt_holds_is_said_within_2_s_and_no_bridge_stays(pair: LibvirtPair, pool: SshPool,
                                                                              tmp_path: Path) -> None:
    pair.b.start_guest("held")
    try:
        (folder,) = (pair.b.base / "lib" / "qemu").glob("domain-*-held")
        path = f"/var/lib/libvirt/qemu/{folder.name}/monitor.sock"  # as the host itself names it
        conn = pool.get(resolve(pair.b.spec()))
        started = time.monotonic()
        with pytest.raises(QmpLinkError) as info:
            async with open_qmp(conn, path):
                pass
        # the helper's own 2 s wait answered (its sentence), long before the console's 10 s fallback
        assert time.monotonic() - started < 8
        assert "no greeting within 2 s: it is held by another client, probably libvirt" in str(info.value)
        assert no_bridges_left(pair.b)  # the bridge answered and left on its own
        # a qmp_sockets glob over libvirt's monitors: discovery goes through libvirt, not the sockets
        (b,) = discover([pair.b.spec(qmp_sockets=("/var/lib/libvirt/qemu/domain-*/monitor.sock",))],
                        _options(pair, tmp_path), pool=pool)
        assert [v.name for v in b.vms] == ["held"] and b.vms[0].qmp_path.startswith("libvirt:"), b.vms
        assert b.vms[0].status == "running" and not b.vms[0].errors and _bridges(pair.b) == []  # none started
    finally:
        pair.b.virsh("destroy", "held")
        pair.b.virsh("undefine", "held")


def _inventory(pair: LibvirtPair, tmp_path: Path, mode: str) -> Path:
    hosts = "".join(f'[[host]]\nname = "{h.name}"\naddress = "127.0.0.1"\nport = {h.port}\nuser = "root"\n'
                    f'identity = "{h.client_key}"\nlibvirt_uri = "{h.uri}"\nlibvirt_migration = "{mode}"\n\n'
                    for h in (pair.a, pair.b))
    path = tmp_path / "inventory.toml"
    path.write_text(f'known_hosts = "{pair.known_hosts}"\n\n{hosts}')
    return path


def test_migrate_runs_libvirts_peer_to_peer_migration_through_the_runner(pair: LibvirtPair,
                                                                          tmp_path: Path) -> None:
    uuid = pair.a.start_guest("web")
    console = Console.make(tmp_path / "console")
    try:
        out = console.run("migrate", "web", "--to", "hv-b", "--inventory", str(_inventory(pair, tmp_path, "p2p")),
                          "--yes", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        checks = {c["key"]: c for c in lines[0]["checks"]}
        assert checks["libvirt"]["status"] == "pass" and "argv" not in checks
        result = lines[-1]
        assert result["outcome"]["result"] == "done" and result["outcome"]["runnable"] == ["hv-b"], result
        # the census: one copy, on hv-b; libvirt moved the definition too (none left on hv-a)
        assert pair.b.state(uuid) == "running" and pair.a.state(uuid) is None
        (folder,) = [p for p in console.migrations.iterdir() if p.is_dir()]
        steps = [json.loads(line)["step"] for line in (folder / "journal.jsonl").read_text().splitlines()]
        assert steps == ["planned", "streaming", "send-finished", "target-confirmed", "source-retired", "done"]
        verify = console.run("audit", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        (line,) = [json.loads(x) for x in console.run("audit", "show", "--json").stdout.splitlines()]
        assert line["vm"] == "web" and line["outcome"] == "done" and line["runnable"] == ["hv-b"], line
    finally:
        console.close()
        pair.b.virsh("destroy", "web", check=False)
        pair.b.virsh("undefine", "web", check=False)


async def test_virsh_managed_migration_cancelled_keeps_the_guest_on_its_source(pair: LibvirtPair, pool: SshPool,
                                                                               tmp_path: Path) -> None:
    uuid = pair.b.start_guest("slow", random_mib=24)
    try:
        src, dst = discover([pair.b.spec(), pair.a.spec()], _options(pair, tmp_path), pool=pool)
        plan = MigrationPlan(vm=src.vm("slow"), source=src, target=dst, bandwidth_bps=4 << 20)
        checks = preflight(plan)
        assert not refused(checks), checks
        steps: list[tuple[Step, dict]] = []
        migration: LibvirtMigration

        def watch(p: Progress) -> None:
            if p.bytes_transferred > 1 << 20:
                migration.cancel("the operator changed their mind")

        migration = LibvirtMigration(plan, _link(pair.b, pool, "client"), _link(pair.a, pool), checks=checks,
                                     on_progress=watch, on_step=lambda s, d: steps.append((s, d)), audit_log=False)
        outcome = await migration.run()
        assert outcome.result == "cancelled" and outcome.runnable == ("hv-b",), outcome
        assert outcome.message == "the operator changed their mind; slow runs on hv-b"
        assert pair.b.state(uuid) == "running" and pair.a.state(uuid) is None
        assert [s for s, _ in steps] == [Step.PLANNED, Step.STREAMING, Step.ROLLBACK_CHOSEN]
        assert "canceled by client" in steps[-1][1]["why"]  # libvirt's own words
        assert steps[0][1]["mode"] == "client"
        assert 1 << 20 < outcome.bytes_transferred < 24 << 20
        # the detached virsh's output and exit status went with it
        assert not list(Path("/tmp").glob(f"sevconsole-{os.getuid()}/libvirt-migrate-*"))
    finally:
        pair.b.virsh("destroy", "slow", check=False)
        pair.b.virsh("undefine", "slow", check=False)


# ---------------------------------------------------------------- preflight, no daemon needed


def _libvirt_plan(**vm: object) -> MigrationPlan:
    domain = VmInfo(name="web", pid=7, qmp_path="libvirt:8d6f3c5e-35ac-4b4e-9d5a-0e4f3c9b2a11",
                    argv=("qemu-system-x86_64", "-object", '{"qom-type":"secret","file":"/var/lib/x.aes"}'),
                    status="running", memory_mib=64, libvirt="8d6f3c5e-35ac-4b4e-9d5a-0e4f3c9b2a11", **vm)  # type: ignore[arg-type]
    src = HostReport(name="hv-a", address="10.0.0.1", port=22, reachable=True, hostname="a", vms=(domain,),
                     libvirt={"uri": "qemu:///system", "version": "QEMU 7.2.0"})
    dst = HostReport(name="hv-b", address="10.0.0.2", port=22, reachable=True, hostname="b",
                     mem_available_mib=4096, libvirt={"uri": "qemu:///system", "version": "QEMU 7.2.0"})
    return MigrationPlan(vm=domain, source=src, target=dst)


def test_an_sev_domain_is_refused_in_libvirts_words() -> None:
    plan = _libvirt_plan(sev_enabled=True, policy=0x33, migration_blocker="SEV: Migration is not implemented")
    check = next(c for c in preflight(plan) if c.key == "libvirt")
    assert check.status is CheckStatus.FAIL
    assert check.sentence == ("libvirt on hv-a refuses to migrate web: Requested operation is not valid: "
                              "cannot migrate domain: SEV: Migration is not implemented.")


def test_a_libvirt_domain_goes_only_to_a_libvirt_host() -> None:
    plan = _libvirt_plan()
    checks = {c.key: c for c in preflight(plan)}
    assert checks["libvirt"].status is CheckStatus.PASS and "argv" not in checks  # libvirt builds that line
    bare = MigrationPlan(vm=plan.vm, source=plan.source, target=HostReport(
        name="hv-c", address="10.0.0.3", port=22, reachable=True, hostname="c", mem_available_mib=4096))
    check = next(c for c in preflight(bare) if c.key == "libvirt")
    assert check.status is CheckStatus.FAIL and "hv-c has no working libvirt" in check.sentence


def test_domjobinfo_reads_as_query_migrate() -> None:
    from sevconsole.engine.libvirt_run import job_as_query_migrate

    info = job_as_query_migrate({"job_type": "unbounded", "memory_processed": 5, "memory_remaining": 7,
                                 "memory_total": 12, "memory_iteration": 2, "downtime": 300, "memory_bps": "x"})
    assert info["status"] == "active" and info["ram"]["transferred"] == 5 and info["ram"]["remaining"] == 7
    assert info["ram"]["dirty-sync-count"] == 2 and info["expected-downtime"] == 300
    assert asyncio.iscoroutinefunction(LibvirtMigration.run)
