"""Discovery against the lab (simulated SEV hosts over real SSH and QMP): capabilities, chains
verified with the lab root, VMs with SEV policy and firmware state, and `sevconsole discover --lab`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.errors import QmpLinkError
from sevconsole.hosts.labdir import load_lab
from sevconsole.hosts.qmp import open_qmp
from sevconsole.hosts.remote import launch_incoming, stop
from sevconsole.hosts.ssh import SshPool, resolve
from sevconsole.sev.certs import SevCert
from tests.conftest import ROOT

try:
    from sevconsole.lab.control import Lab
except ImportError as exc:  # the lab is written by a teammate; skip only if it cannot be imported
    pytest.skip(f"lab not available ({exc})", allow_module_level=True)

WEB_POLICY = 0x18000033


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab.start(tmp_path_factory.mktemp("lab"), hosts=3) as running:
        yield running


def lab_options(state_dir: Path, tmp_path: Path, **kw: object) -> DiscoveryOptions:
    state = load_lab(state_dir)
    values: dict[str, object] = {"known_hosts": state.known_hosts, "system_known_hosts": (),
                                 "lab_root": state.lab_root, "amd_roots": tmp_path / "none",
                                 "ssh_config": tmp_path / "none", "use_agent": False}
    values.update(kw)
    return DiscoveryOptions(**values)  # type: ignore[arg-type]


def test_lab_capabilities_and_chains_verify_with_the_lab_root(lab: Lab, tmp_path: Path) -> None:
    state = load_lab(lab.paths.root)
    reports = discover(state.inventory.hosts, lab_options(lab.paths.root, tmp_path))
    assert [r.name for r in reports] == ["lab-1", "lab-2", "lab-3"]
    for report in reports:
        assert report.reachable and report.lab and report.errors == (), report.errors
        assert report.sev is not None and report.sev.kernel_sev and report.sev.dev_sev
        caps = report.capabilities
        assert caps is not None and caps.chain_error is None, caps and caps.chain_error
        assert len(caps.pdh) == 2084 and len(caps.cert_chain) == 6252
        assert SevCert.from_bytes(caps.pdh).usage == 0x1003
        chain = caps.chain_report
        assert chain.ok and chain.root.is_lab and chain.root.generation == "LAB"
        assert [link.name for link in chain.links] == ["ARK self", "ARK->ASK", "ASK->CEK", "CEK->PEK",
                                                       "OCA self", "OCA->PEK", "PEK->PDH"]
        assert caps.amd_chain is not None
    one, _, three = reports
    assert one.sev.api == (1, 55) and three.sev.api == (0, 17)
    assert one.capabilities.cbitpos is not None  # from query-sev-capabilities of a VM's QEMU
    web = one.vm("web")
    assert web is not None and web.status == "running" and web.sev_enabled
    assert web.policy == WEB_POLICY and web.firmware_guest_state == 3  # RUNNING
    assert web.migration_support is True and web.memory_mib == 64
    plain = one.vm("plain")
    assert plain is not None and not plain.sev_enabled and plain.policy in (None, 0)
    assert {v.name for v in one.vms} == {"web", "vault", "plain", "legacy"}
    # the guest's consent, as QEMU with the SEV migration series reports it: its blocker stays
    legacy = one.vm("legacy")
    assert legacy is not None and legacy.sev_enabled and legacy.migration_support is True
    assert legacy.migration_blocker == "SEV: Migration is not implemented" and web.migration_blocker is None


def test_lab_root_not_given_means_the_chain_is_not_trusted(lab: Lab, tmp_path: Path) -> None:
    state = load_lab(lab.paths.root)
    [report] = discover(state.inventory.hosts[:1], lab_options(lab.paths.root, tmp_path, lab_root=None,
                                                               query_vms=False))
    caps = report.capabilities
    assert caps is not None and caps.chain_report is not None and not caps.chain_report.ok
    assert "--lab" in caps.chain_error
    assert any("no lab root was given" in e for e in report.errors)


async def test_lab_qmp_and_launch_incoming_over_ssh(lab: Lab, tmp_path: Path) -> None:
    state = load_lab(lab.paths.root)
    by = state.inventory.by_name()
    keys = lab_options(lab.paths.root, tmp_path).key_store()
    with SshPool(keys, use_agent=False) as pool:
        src = pool.get(resolve(by["lab-1"]))
        dst = pool.get(resolve(by["lab-2"]))
        async with open_qmp(src, lab.qmp_path("lab-1", "web")) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "running"
            assert (await qmp.execute("query-sev"))["policy"] == WEB_POLICY
            argv = [v for v in discover([by["lab-1"]], lab_options(lab.paths.root, tmp_path, query_vms=False))[0].vms
                    if v.name == "web"][0].argv
        incoming = launch_incoming(dst, list(argv))
        try:
            async with open_qmp(dst, incoming.qmp) as qmp:
                assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        finally:
            assert stop(dst, incoming.pid) is True


async def test_a_held_monitor_is_named_and_freed(lab: Lab, tmp_path: Path) -> None:
    """QEMU serves one QMP client at a time: while another client holds web's monitor, a link
    gets no greeting and the host's bridge says so within 2 s, naming the socket; discovery
    reports that VM only; once the holder leaves, both work again."""
    state = load_lab(lab.paths.root)
    path = lab.qmp_path("lab-1", "web")
    holder = socket.socket(socket.AF_UNIX)
    holder.settimeout(10)
    holder.connect(path)
    try:
        assert b'"QMP"' in holder.recv(4096)  # greeted: it holds the monitor now
        with SshPool(lab_options(lab.paths.root, tmp_path).key_store(), use_agent=False) as pool:
            conn = pool.get(resolve(state.inventory.by_name()["lab-1"]))
            started = time.monotonic()
            with pytest.raises(QmpLinkError, match="it is held by another client") as exc:
                async with open_qmp(conn, path):  # the default greeting timeout: the bridge answers first
                    pass
            assert time.monotonic() - started < 4 and path in str(exc.value)
        [report] = discover(state.inventory.hosts[:1], lab_options(lab.paths.root, tmp_path))
        web, others = report.vm("web"), [v for v in report.vms if v.name != "web"]
        assert web is not None and "it is held by another client" in " ".join(web.errors)
        assert others and all(not v.errors and v.status == "running" for v in others)
    finally:
        holder.close()
    [report] = discover(state.inventory.hosts[:1], lab_options(lab.paths.root, tmp_path))
    assert report.vm("web").status == "running" and not report.vm("web").errors


def test_discover_command_on_the_lab(lab: Lab, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "SEVCONSOLE_DATA_DIR": str(tmp_path / "data"),
           "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config"), "SSH_AUTH_SOCK": ""}
    out = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(lab.paths.root), "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [h["name"] for h in data] == ["lab-1", "lab-2", "lab-3"]
    assert all(h["capabilities"]["chain"]["ok"] for h in data)
    assert {v["name"]: v["policy"] for v in data[0]["vms"]}["web"] == f"0x{WEB_POLICY:08x}"
    table = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(lab.paths.root)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["HOST", "ADDRESS", "LATENCY", "SEV", "FIRMWARE", "CHAIN", "VMS"]
    assert any(line.startswith("lab-1 (lab)") and "ok (LAB)" in line and "1.55" in line for line in lines)
    web = next(line.split() for line in lines if line.startswith("  web "))
    assert web[2:8] == ["running", "64", "MiB", "yes", "0x18000033", "running"]
    vault = next(line for line in lines if line.startswith("  vault "))
    assert "no (NOSEND)" in vault
