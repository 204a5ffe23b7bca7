"""`sevconsole migrate` against hosts whose keys it has never seen: refused with the fingerprint and
the flag to accept it, then `--accept-host-key` for both, and the detached runner finds them known."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import paramiko
import pytest

from sevconsole.hosts.hostkeys import fingerprint
from tests.engine.test_durable_qemu import qemus_named
from tests.hosts.conftest import Sshd, kill_pid, pid_gone
from tests.reliability.rig import Console

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu, pytest.mark.slow, pytest.mark.timeout(120)]


def _fp(public_line: str) -> str:
    kind, data = public_line.split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(kind, base64.b64decode(data)))


def test_migrate_accepts_host_keys_the_operator_names(sshd: Sshd, machine_b: Sshd, qemu_vm, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    hosts = "".join(f'[[host]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {server.port}\n'
                    f'user = "{server.user}"\nidentity = "{server.client_key}"\n\n'
                    for name, server in (("h1", sshd), ("h2", machine_b)))
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'known_hosts = "{known}"\n\n{hosts}')
    vm = qemu_vm(f"key{uuid.uuid4().hex[:6]}")
    console = Console.make(tmp_path / "console")
    try:
        out = console.run("migrate", vm.name, "--to", "h2", "--inventory", str(inv), "--yes")
        a, b = _fp(sshd.host_public), _fp(machine_b.host_public)
        assert out.returncode == 3 and f"--accept-host-key {a}" in out.stderr, out.stderr
        assert known.read_text() == ""  # nothing trusted without the operator's word
        out = console.run("migrate", vm.name, "--to", "h2", "--inventory", str(inv), "--yes", "--json",
                          "--accept-host-key", a, "--accept-host-key", b)
        assert out.returncode == 0, out.stdout + out.stderr
        outcome = json.loads(out.stdout.strip().splitlines()[-1])
        assert outcome["outcome"]["result"] == "done" and outcome["outcome"]["runnable"] == ["h2"]
        assert len(known.read_text().splitlines()) == 2  # saved, so the runner found both known
        assert pid_gone(vm.pid, 10)  # the source QEMU was retired by the runner
    finally:
        console.close()
        for pid in qemus_named(vm.name):  # the target's QEMU is the helper's, not ours
            kill_pid(pid)
