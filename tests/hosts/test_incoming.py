"""The helper's launch-incoming and stop against real QEMUs over a real sshd: a start failure
reaches the operator as QEMU's own sentence, and no attempt leaves a socket or log behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sevconsole.hosts.errors import HelperError
from sevconsole.hosts.qmp import QmpSocketGone, open_qmp
from sevconsole.hosts.remote import launch_incoming, stop
from sevconsole.hosts.ssh import SshPool, resolve
from tests.hosts.conftest import Sshd, kill_pid, pid_gone

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]

BASE = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-display", "none", "-nodefaults"]


def private_folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base if os.path.isdir(base) else "/tmp") / f"sevconsole-{os.getuid()}"


def leftovers(name: str) -> list[str]:
    folder = private_folder()
    return sorted(p.name for p in folder.glob(f"{name}-incoming-*")) if folder.is_dir() else []


def test_a_qemu_that_exits_at_start_is_said_in_its_own_words(sshd: Sshd, pool: SshPool) -> None:
    # the QMP socket exists before QEMU creates its devices; this device then fails
    argv = [*BASE, "-name", "badstart", "-device", "virtio-net-pci,netdev=nosuch"]
    conn = pool.get(resolve(sshd.spec()))
    before = leftovers("badstart")
    with pytest.raises(HelperError) as info:
        launch_incoming(conn, argv)
    text = str(info.value)
    assert "exited at start" in text and "can't find value 'nosuch'" in text, text
    assert "Connection refused" not in text and text.count("can't find value") == 1
    assert leftovers("badstart") == before  # no socket or log to show up later as a VM


async def test_stop_takes_the_socket_and_log_along(sshd: Sshd, pool: SshPool) -> None:
    conn = pool.get(resolve(sshd.spec()))
    incoming = await asyncio.to_thread(launch_incoming, conn, [*BASE, "-name", "tidy"])
    try:
        # launch-incoming returns once QEMU answers: the first link gets its greeting at once
        async with open_qmp(conn, incoming.qmp, greeting_timeout=2) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        assert {Path(incoming.qmp).name, Path(incoming.log or "").name} <= set(leftovers("tidy"))
        assert stop(conn, incoming.pid, qmp=incoming.qmp) is True
        assert leftovers("tidy") == []
    finally:
        kill_pid(incoming.pid)


async def test_an_incoming_vm_that_left_by_itself_is_tidied_and_said_gone(sshd: Sshd, pool: SshPool) -> None:
    conn = pool.get(resolve(sshd.spec()))
    incoming = await asyncio.to_thread(launch_incoming, conn, [*BASE, "-name", "leaver"])
    async with open_qmp(conn, incoming.qmp) as qmp:
        await qmp.execute("quit")
    assert pid_gone(incoming.pid, 10)
    with pytest.raises(QmpSocketGone) as info:  # not "Connection refused"
        async with open_qmp(conn, incoming.qmp):
            pass
    assert "not running" in str(info.value)
    assert stop(conn, incoming.pid, qmp=incoming.qmp) is False  # nothing left to stop ...
    assert leftovers("leaver") == []  # ... but its log went too


def test_stop_never_removes_a_file_it_did_not_make(sshd: Sshd, pool: SshPool, tmp_path: Path) -> None:
    conn = pool.get(resolve(sshd.spec()))
    victim = tmp_path / "web-incoming-1-2.qmp"  # the right name, the wrong folder
    victim.write_text("keep")
    assert stop(conn, 2 ** 22 + 7, qmp=str(victim)) is False
    assert victim.read_text() == "keep"
