"""One machine, two names: hosts told apart by SSH host key and machine id, over real sshds."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevconsole.commands.discover import render_table
from sevconsole.engine.checks import CheckStatus, preflight
from sevconsole.engine.plan import MigrationPlan
from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.identity import same_machine
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.hosts.ssh import SshPool, Timeouts
from tests.hosts.conftest import Sshd

pytestmark = [pytest.mark.needs_sshd]


def _options(tmp_path: Path) -> DiscoveryOptions:
    return DiscoveryOptions(known_hosts=tmp_path / "kh", system_known_hosts=(), amd_roots=tmp_path / "none",
                            ssh_config=tmp_path / "none", use_agent=False, query_vms=False,
                            timeouts=Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10))


def _plan(src: HostReport, dst: HostReport) -> MigrationPlan:
    vm = VmInfo(name="web", pid=1, qmp_path="/run/web.qmp", argv=("qemu-system-x86_64", "-m", "64"),
                status="running", memory_mib=64)
    return MigrationPlan(vm=vm, source=src, target=dst)


def test_two_names_of_one_sshd_are_one_machine(sshd: Sshd, pool2: SshPool, machine_b: Sshd, tmp_path: Path) -> None:
    hv_b, hv_c, other = discover([sshd.spec("hv-b"), sshd.spec("hv-c", address="localhost"),
                                  machine_b.spec("hv-d")], _options(tmp_path), pool=pool2)
    assert hv_b.extra["host_key_fingerprint"] == hv_c.extra["host_key_fingerprint"]
    assert len(hv_b.extra["machine_id"]) == 32 and other.extra["machine_id"] != hv_b.extra["machine_id"]
    assert hv_c.extra["same_machine_as"] == "hv-b" and "same_machine_as" not in hv_b.extra
    assert "same_machine_as" not in other.extra
    note = hv_c.extra["same_machine_note"]
    assert note.startswith("hv-c and hv-b are one machine (the same SSH host key SHA256:")
    table = render_table([hv_b, hv_c, other])
    assert "hv-c = hv-b" in table and note in table
    # never each other's target; another machine is
    check = next(c for c in preflight(_plan(hv_b, hv_c)) if c.key == "hosts")
    assert check.status is CheckStatus.FAIL and "hv-b and hv-c are one machine" in check.sentence
    assert not [c for c in preflight(_plan(hv_b, other)) if c.key == "hosts"]


def test_a_machine_id_alone_makes_one_machine_unless_the_kernels_differ() -> None:
    def host(name: str, **extra: str) -> HostReport:
        return HostReport(name=name, address=name, port=22, reachable=True, extra=extra)

    mid = "3d1219c7c4c5404aaa1f6d2a48adfda4"
    assert same_machine(host("a", machine_id=mid), host("b", machine_id=mid)) == f"the same machine id {mid}"
    # a cloned image: the same id, two running kernels
    assert same_machine(host("a", machine_id=mid, boot_id="1" * 32), host("b", machine_id=mid, boot_id="2" * 32)) \
        is None
    assert same_machine(host("a", machine_id="x" * 32), host("b", machine_id="x" * 32)) is None  # not an id
    assert same_machine(host("a"), host("b")) is None
