"""A durable plain migration of a real QEMU (TCG) over a real OpenSSH sshd: `sevconsole migrate
--inventory` starts its runner, the runner is SIGKILLed mid pre-copy, `sevconsole recover
--inventory` finishes the job; then every QEMU of that guest on this machine (found in /proc, not
through the console) is asked over its own QMP socket: exactly one runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.engine.conftest import LocalGuests
from tests.hosts.conftest import Sshd, kill_pid
from tests.reliability.rig import Console, reach

pytestmark = [pytest.mark.needs_qemu, pytest.mark.needs_sshd, pytest.mark.slow, pytest.mark.timeout(150)]

MEM_MIB = 32  # random bytes: every page crosses, about 8 s at --bandwidth 4
BANDWIDTH_MBPS = "4"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    made = Console.make(tmp_path / "console")
    yield made
    made.close()


def inventory(sshd: Sshd, tmp_path: Path, other: Sshd) -> Path:
    """Two hosts: h1 through the test sshd, h2 through a second machine's (its own host key and
    machine id: two names of one machine are never each other's target)."""
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line() + other.known_hosts_line())
    hosts = "".join(f'[[host]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {server.port}\n'
                    f'user = "{server.user}"\nidentity = "{server.client_key}"\n\n'
                    for name, server in (("h1", sshd), ("h2", other)))
    path = tmp_path / "inventory.toml"
    path.write_text(f'known_hosts = "{known}"\n\n{hosts}')
    return path


def qemus_named(name: str) -> dict[int, str]:
    """Every QEMU process on this machine whose -name is `name`: pid -> its QMP socket."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or "qemu-system" not in Path(argv[0]).name or "-name" not in argv:
            continue
        if argv[argv.index("-name") + 1].split(",")[0] != name:
            continue
        qmp = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-qmp"), "")
        found[int(entry)] = qmp.removeprefix("unix:").split(",")[0]
    return found


async def run_state(path: str) -> str:
    client = QMPClient("census")
    await asyncio.wait_for(client.connect(path), 10)
    try:
        return str((await asyncio.wait_for(client.execute("query-status"), 10))["status"])
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def test_runner_killed_mid_precopy_then_recover_leaves_one_running_qemu(
        sshd: Sshd, machine_b: Sshd, guests: LocalGuests, console: Console, tmp_path: Path) -> None:
    name = f"dur{uuid.uuid4().hex[:8]}"
    source = asyncio.run(guests.start(name, MEM_MIB, random_memory=True))
    inv = inventory(sshd, tmp_path, machine_b)
    client = console.start("migrate", name, "--to", "h2", "--inventory", str(inv), "--yes", "--json",
                           "--bandwidth", BANDWIDTH_MBPS)
    try:
        folder = console.migration()
        where = reach(client, folder, "pre-copy", 0.2)
        assert where.startswith("pre-copy/"), (where, client.stderr())  # still streaming: the kill lands mid-flight
        os.kill(console.runner_pid(folder), signal.SIGKILL)
        client.rest()
        assert client.proc.returncode == 1 and "stopped before the end" in client.stderr(), client.stderr()
        console.wait_runner_gone(folder, timeout=10)
        assert len(qemus_named(name)) == 2  # the source and the target's incoming QEMU

        out = console.run("recover", "--inventory", str(inv), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert '"result": "reconciled"' in out.stdout, out.stdout

        states = {pid: asyncio.run(run_state(qmp)) for pid, qmp in qemus_named(name).items() if qmp}
        running = [pid for pid, state in states.items() if state == "running"]
        assert len(running) == 1, states
        if running == [source.pid]:  # rolled back: the incoming QEMU was stopped, not left paused
            assert set(states) == {source.pid}, states
        else:  # the stream had completed first: the target took over, the source cannot run
            assert states[source.pid] == "postmigrate", states
    finally:
        client.close()
        for pid in qemus_named(name):
            if pid != source.pid:
                kill_pid(pid)  # the target's QEMU is the helper's, not ours
