"""Disks on shared storage: the allow-list carries raw images under the target's declared folders
only, the helper re-checks each path on the host, and preflight says which image a target lacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sevconsole.engine.argv_policy import Refusal, TargetArgv, target_argv
from sevconsole.engine.checks import CheckStatus, preflight
from sevconsole.engine.plan import MigrationPlan
from sevconsole.hosts import helper
from sevconsole.hosts.diskpaths import disk_paths
from sevconsole.hosts.report import HostReport, VmInfo

QEMU = "qemu-system-x86_64"
BASE = [QEMU, "-machine", "q35,accel=tcg", "-m", "64", "-display", "none", "-nodefaults", "-name", "web"]
SHARED = ("/srv/vms",)


def _refusal(argv: list[str], storage: tuple[str, ...] = SHARED) -> str:
    verdict = target_argv([*BASE, *argv], storage=storage)
    assert isinstance(verdict, Refusal), verdict
    return verdict.sentence("hv-b")


def test_raw_images_under_the_targets_shared_storage_pass() -> None:
    argv = [*BASE, "-drive", "file=/srv/vms/web.raw,format=raw,if=none,id=d0,cache=none",
            "-device", "virtio-blk-pci,drive=d0,bootindex=1",
            "-blockdev", '{"driver":"file","filename":"/srv/vms/data.raw","node-name":"f1"}',
            "-blockdev", "driver=raw,file=f1,node-name=d1", "-device", "scsi-hd,drive=d1"]
    out = target_argv(argv, storage=SHARED)
    assert isinstance(out, TargetArgv), out
    assert list(out.argv[1:]) == argv[1:]
    assert disk_paths(argv) == ("/srv/vms/web.raw", "/srv/vms/data.raw")


@pytest.mark.parametrize("argv, words", [
    (["-drive", "file=/var/lib/images/web.raw,format=raw"], ("/var/lib/images/web.raw", "outside its shared storage",
                                                             "/srv/vms")),
    (["-drive", "file=/srv/vms/../../etc/shadow,format=raw"], ("outside its shared storage",)),
    (["-drive", "file=/srv/vmsx/web.raw,format=raw"], ("outside its shared storage",)),
    (["-drive", "file=/srv/vms/web.raw"], ("without format=raw", "guess the image format")),
    (["-drive", "file=/srv/vms/web.qcow2,format=qcow2"], ("a value sevconsole does not carry",)),
    (["-drive", "file=/srv/vms/web.raw,format=raw,driver=qcow2"], ("with driver=",)),
    (["-drive", "file=/srv/vms/web.raw,format=raw,backing.file.filename=/etc/shadow"], ("backing.file.filename",)),
    (["-blockdev", '{"driver":"qcow2","file":"f0","node-name":"q"}'], ("names its backing file",)),
    (["-blockdev", '{"driver":"file","filename":"/etc/shadow","node-name":"f"}'], ("/etc/shadow", "outside")),
    (["-blockdev", "driver=nbd,server.type=inet,server.host=10.0.0.1"], ("-blockdev driver=nbd",)),
    (["-drive", "if=virtio,format=raw"], ("names no image file",)),
])
def test_disks_elsewhere_or_of_another_kind_are_refused(argv: list[str], words: tuple[str, ...]) -> None:
    sentence = _refusal(argv)
    assert all(w in sentence for w in words), sentence


def test_without_shared_storage_a_disk_is_refused_with_the_way_to_declare_it() -> None:
    sentence = _refusal(["-drive", "file=/srv/vms/web.raw,format=raw"], storage=())
    assert "disk image" in sentence and "shared_storage of hv-b" in sentence


def test_the_helper_recheck_lets_disks_through_only_with_storage(tmp_path: Path) -> None:
    image = tmp_path / "shared" / "web.raw"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    argv = [*BASE, "-drive", f"file={image},format=raw,if=virtio"]
    with pytest.raises(helper.HelperFailure, match="refused -drive"):
        helper.check_target_argv(argv)
    helper.check_target_argv(argv, [str(image.parent)])  # there, and a regular file
    image.unlink()
    with pytest.raises(helper.HelperFailure, match="does not exist on this host"):
        helper.check_target_argv(argv, [str(image.parent)])
    # a link on the shared storage that leads out of it is never followed
    os.symlink("/etc/passwd", image)
    with pytest.raises(helper.HelperFailure, match="leads out of this host's shared storage"):
        helper.check_target_argv(argv, [str(image.parent)])
    # the other keys still meet the NEVER lists
    bad = [*BASE, "-drive", f"file={image},format=raw,if=virtio,logfile=/etc/x"]
    with pytest.raises(helper.HelperFailure, match="refused logfile="):
        helper.check_target_argv(bad, [str(image.parent)])


def _plan(files: dict[str, str] | None) -> MigrationPlan:
    argv = (*BASE, "-qmp", "unix:/run/web.qmp,server=on,wait=off",
            "-drive", "file=/srv/vms/web.raw,format=raw,if=virtio",
            "-drive", "file=/srv/vms/swap.raw,format=raw,if=virtio")
    vm = VmInfo(name="web", pid=10, qmp_path="/run/web.qmp", argv=argv, status="running", memory_mib=64)
    src = HostReport(name="hv-a", address="10.0.0.1", port=22, reachable=True, hostname="a", vms=(vm,))
    dst = HostReport(name="hv-b", address="10.0.0.2", port=22, reachable=True, hostname="b", mem_available_mib=4096,
                     shared_storage=tuple(SHARED), storage_files=files or {})
    return MigrationPlan(vm=vm, source=src, target=dst)


def test_preflight_names_each_image_the_target_lacks() -> None:
    checks = {c.key: c for c in preflight(_plan({"/srv/vms/web.raw": "present",
                                                 "/srv/vms/swap.raw": "does not exist on this host"}))}
    disk = checks["disks"]
    assert disk.status is CheckStatus.FAIL
    assert "/srv/vms/swap.raw does not exist" in disk.sentence and "web.raw" not in disk.sentence
    assert "argv" not in checks  # the command line itself is carried unchanged


def test_preflight_disks_seen_or_not_asked() -> None:
    seen = {c.key: c for c in preflight(_plan({"/srv/vms/web.raw": "present", "/srv/vms/swap.raw": "present"}))}
    assert seen["disks"].status is CheckStatus.PASS
    unasked = {c.key: c for c in preflight(_plan(None))}
    assert unasked["disks"].status is CheckStatus.WARN and "/srv/vms/web.raw" in unasked["disks"].sentence


# ---------------------------------------------------------------- real QEMU over a real sshd


def _start_with_disk(tmp_path: Path, name: str, image: Path) -> tuple[int, Path, list[str]]:
    import subprocess

    from tests.conftest import require_binary

    qemu = require_binary("qemu-system-x86_64")
    qmp, pidfile = tmp_path / f"{name}.qmp", tmp_path / f"{name}.pid"
    argv = [qemu, "-machine", "q35,accel=tcg", "-m", "64", "-display", "none", "-nodefaults", "-name", name,
            "-drive", f"file={image},format=raw,if=virtio", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-daemonize", "-pidfile", str(pidfile)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return int(pidfile.read_text()), qmp, argv


@pytest.mark.needs_sshd
@pytest.mark.needs_qemu
@pytest.mark.timeout(90)
async def test_a_guest_with_a_disk_on_shared_storage_migrates_and_a_missing_one_is_named(
        sshd, machine_b, pool2, tmp_path: Path) -> None:
    import asyncio
    import uuid

    from sevconsole.engine.argv_policy import require_target_argv
    from sevconsole.engine.checks import refused
    from sevconsole.engine.run import Migration
    from sevconsole.engine.ssh import SshHost
    from sevconsole.hosts.discovery import DiscoveryOptions, discover
    from sevconsole.hosts.errors import HelperError
    from sevconsole.hosts.remote import launch_incoming
    from sevconsole.hosts.ssh import Timeouts, resolve
    from tests.hosts.conftest import kill_pid

    shared = tmp_path / "shared"
    shared.mkdir()
    image = shared / "web.raw"
    image.write_bytes(b"\0" * (1 << 20))
    name = f"dsk{uuid.uuid4().hex[:6]}"
    pid, _, argv = _start_with_disk(tmp_path, name, image)
    options = DiscoveryOptions(known_hosts=tmp_path / "kh", system_known_hosts=(), amd_roots=tmp_path / "none",
                               ssh_config=tmp_path / "none", use_agent=False,
                               timeouts=Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10))
    pool = pool2
    target_spec = machine_b.spec("h2", shared_storage=(str(shared),))
    src, dst = discover([sshd.spec("h1"), target_spec], options, pool=pool)
    assert dst.storage_files == {str(image): "present"}  # discovery asked the target
    vm = src.vm(name)
    assert vm is not None
    checks = preflight(MigrationPlan(vm=vm, source=src, target=dst))
    assert not refused(checks), checks
    assert {c.key: c.status for c in checks}["disks"] is CheckStatus.PASS
    conn = pool.get(resolve(target_spec))
    # a target without the image: the helper names it before any QEMU starts
    allowed = list(require_target_argv(argv, storage=(str(shared),)).argv)
    allowed[allowed.index("-drive") + 1] = f"file={shared / 'other.raw'},format=raw,if=virtio"
    with pytest.raises(HelperError, match="other.raw does not exist on this host"):
        await asyncio.to_thread(launch_incoming, conn, allowed, storage=(str(shared),))
    outcome = None
    source = SshHost("h1", "127.0.0.1", pool.get(resolve(sshd.spec("h1"))))
    target = SshHost("h2", "127.0.0.1", conn, storage=(str(shared),))
    try:
        outcome = await Migration(MigrationPlan(vm=vm, source=src, target=dst), source, target, checks=checks,
                                  poll_interval_s=0.05, audit_log=False).run()
        assert outcome.result == "done", outcome
        client = await target.open_qmp(str(outcome.target_qmp))
        try:
            block = await client.execute("query-block")
        finally:
            await client.disconnect()
        assert any(b.get("inserted", {}).get("file") == str(image) for b in block), block
    finally:
        kill_pid(pid)
        if outcome is not None and outcome.target_pid:
            kill_pid(outcome.target_pid)
        await source.close()
        await target.close()

