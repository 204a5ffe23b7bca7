"""A compromised source host cannot make the target run a program: real sshd, real helper, real
QEMU. The sshd's compromised port runs every command as asked, but rewrites its probe answer so
each VM's argv ends with `-netdev bridge,...,helper=touch DIR/PWNED;` (tests/hosts/conftest.py).
Preflight refuses naming the option, and the engine run without preflight refuses at the link:
no target QEMU starts and the file is never created."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from sevconsole.engine.checks import CheckStatus, preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.run import Migration
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts import remote
from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.errors import HelperError
from sevconsole.hosts.report import VmInfo
from sevconsole.hosts.ssh import SshPool, Timeouts, resolve
from tests.conftest import require_binary
from tests.engine.conftest import plain_reports
from tests.engine.local import LocalHost
from tests.hosts.conftest import Sshd

pytestmark = [pytest.mark.needs_qemu, pytest.mark.timeout(90)]

OPTION = "-netdev bridge with helper="


def _injected(pwned: Path) -> list[str]:
    return ["-netdev", f"bridge,id=x,br=br0,helper=touch {pwned};"]


def _incoming_of(name: str) -> list[int]:
    """Pids of QEMUs started with -incoming for the VM `name` (names are unique per test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-incoming" in argv and name.encode() in argv:
            found.append(int(entry.name))
    return found


async def _status(path: str) -> str:
    client = QMPClient("check")
    await client.connect(path)
    try:
        return str((await client.execute("query-status"))["status"])
    finally:
        await client.disconnect()


def test_the_injected_option_is_live_on_a_bare_qemu(tmp_path: Path) -> None:
    """The control: handed to QEMU as it is, the injected option runs the source's command."""
    proof = tmp_path / "PROOF"
    qemu = require_binary("qemu-system-x86_64")
    subprocess.run([qemu, "-machine", "none", "-display", "none", "-nodefaults", *_injected(proof)],
                   capture_output=True, timeout=30)
    assert proof.exists()


@pytest.mark.needs_sshd
@pytest.mark.slow
async def test_compromised_source_over_sshd_is_refused(sshd: Sshd, pool: SshPool, qemu_vm,
                                                       tmp_path: Path) -> None:
    pwned = sshd.dir / "PWNED"
    source_vm = qemu_vm(f"evil{uuid.uuid4().hex[:6]}")
    options = DiscoveryOptions(known_hosts=tmp_path / "kh", system_known_hosts=(), amd_roots=tmp_path / "none",
                               ssh_config=tmp_path / "none", use_agent=False,
                               timeouts=Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10))
    src, dst = discover([sshd.spec("evil", port=sshd.compromised_port), sshd.spec("h2")], options, pool=pool)
    vm = src.vm(source_vm.name)
    assert vm is not None and vm.status == "running"
    assert list(vm.argv[-2:]) == _injected(pwned)  # what the compromised host reports
    plan = MigrationPlan(vm=vm, source=src, target=dst)

    checks = preflight(plan)
    argv = next(c for c in checks if c.key == "argv")
    assert refused(checks) and argv.status is CheckStatus.FAIL
    assert argv.sentence.startswith(f"the source's command line has {OPTION}, which would make h2 run a "
                                    "program the source named"), argv.sentence

    # The engine alone (no preflight): the target's link refuses before anything starts there.
    links = [SshHost(r.name, "127.0.0.1", pool.get(resolve(spec)))
             for r, spec in ((src, sshd.spec("evil", port=sshd.compromised_port)), (dst, sshd.spec("h2")))]
    outcome = await Migration(plan, *links, audit_log=False, poll_interval_s=0.05).run()
    try:
        assert outcome.result == "failed", outcome
        assert OPTION in outcome.message and "h2" in outcome.message, outcome.message
        assert outcome.target_pid is None and outcome.runnable == ("evil",)
        client = await links[0].open_qmp(str(source_vm.qmp))
        try:
            assert (await client.execute("query-status"))["status"] == "running"
        finally:
            await client.disconnect()
        assert _incoming_of(source_vm.name) == []
        assert not pwned.exists()

        # The helper's own re-check, for a console that skipped the allow-list: refused on the host.
        conn = pool.get(resolve(sshd.spec("h2")))
        with pytest.raises(HelperError, match="refused helper="):
            remote.launch_incoming(conn, ["qemu-system-x86_64", "-name", source_vm.name, *_injected(pwned)])
        with pytest.raises(HelperError, match="named without a folder"):
            remote.launch_incoming(conn, list(vm.argv))  # the source's argv as it is: never taken
        assert _incoming_of(source_vm.name) == [] and not pwned.exists()
    finally:
        for link in links:
            await link.close()


async def test_compromised_argv_on_local_hosts_starts_nothing(guests, tmp_path: Path) -> None:
    pwned = tmp_path / "PWNED"
    clean = await guests.start("web")
    vm = VmInfo(**{**clean.__dict__, "argv": (*clean.argv, *_injected(pwned))})
    src_report, dst_report = plain_reports(vm)
    plan = MigrationPlan(vm=vm, source=src_report, target=dst_report)
    assert refused(preflight(plan))
    src, dst = LocalHost("src", run_dir=tmp_path), LocalHost("dst", run_dir=tmp_path)
    outcome = await Migration(plan, src, dst, audit_log=False, poll_interval_s=0.05).run()
    assert outcome.result == "failed" and OPTION in outcome.message and "dst" in outcome.message
    assert dst.started() == [] and outcome.runnable == ("src",)
    assert await _status(vm.qmp_path) == "running"
    assert not pwned.exists()
