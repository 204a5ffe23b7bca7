"""`sevconsole discover` as an operator runs it: a real sshd and QEMU, a scratch HOME and data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.hosts.conftest import Sshd
from tests.hosts.test_ssh import openssh_fingerprint

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "SEVCONSOLE_DATA_DIR": str(tmp_path / "data"),
           "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("SSH_AUTH_SOCK", None)
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--timeout", "3", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def inventory(tmp_path: Path, sshd: Sshd) -> Path:
    path = tmp_path / "hosts.toml"
    path.write_text(f"""\
[[host]]
name = "node-1"
address = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
identity = "{sshd.client_key}"
labels = ["test"]
""")
    return path


@pytest.mark.slow
def test_unknown_key_then_accepted_then_listed(sshd: Sshd, qemu_vm, tmp_path: Path) -> None:
    vm = qemu_vm()
    inv = inventory(tmp_path, sshd)
    fp = openssh_fingerprint(sshd.host_public)
    first = run(tmp_path, "--inventory", str(inv))
    assert first.returncode == 1
    assert fp in first.stdout and f"--accept-host-key {fp}" in first.stdout and "unknown host key" in first.stdout
    accepted = run(tmp_path, "--inventory", str(inv), "--accept-host-key", fp, "--json")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    [host] = json.loads(accepted.stdout)
    assert host["name"] == "node-1" and host["reachable"] and host["errors"] == []
    assert {v["name"]: v["status"] for v in host["vms"]}[vm.name] == "running"
    assert fp not in (tmp_path / "data" / "known_hosts").read_text()  # the key is stored, not its hash
    assert (tmp_path / "data" / "known_hosts").read_text().split()[0] == f"[127.0.0.1]:{sshd.port}"
    # remembered: no flag needed any more; the table lists the VM
    table = run(tmp_path, "--inventory", str(inv))
    assert table.returncode == 0, table.stdout
    assert any(line.startswith(f"  {vm.name} ") and "running" in line for line in table.stdout.splitlines())


def test_ssh_config_hosts(sshd: Sshd, qemu_vm, tmp_path: Path) -> None:
    vm = qemu_vm()
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    (ssh_dir / "config").write_text(f"""\
Host box-a box-b
    HostName 127.0.0.1
    Port {sshd.port}
    User {sshd.user}
    IdentityFile {sshd.client_key}
Host other
    HostName 192.0.2.1
""")
    (ssh_dir / "known_hosts").write_text(sshd.known_hosts_line())  # system file, read-only
    out = run(tmp_path, "--ssh-config", "box-*", "--json", "--no-vms")
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert [h["name"] for h in data] == ["box-a", "box-b"]
    assert all(any(v["name"] == vm.name for v in h["vms"]) for h in data)
    assert not (tmp_path / "data" / "known_hosts").exists()


def test_bad_input_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[host]]\nname = "x"\nport = "22"\n')
    out = run(tmp_path, "--inventory", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"{bad}:1: address: missing (every [[host]] needs address)",
                                       f"{bad}:3: port: must be a whole number from 1 to 65535, not '22'"]
    out = run(tmp_path, "--inventory", str(bad), "--accept-host-key", "MD5:aa:bb")
    assert out.returncode == 2 and "not a host key fingerprint" in out.stderr
    out = run(tmp_path)
    assert out.returncode == 2 and "no inventory" in out.stderr
    out = run(tmp_path, "--lab", str(tmp_path / "nolab"))
    assert out.returncode == 2 and "not a folder" in out.stderr
