"""LocalHost: a HostLink for QEMUs on this machine (UNIX sockets, child processes).

Used by the tests and by a console that manages VMs on the machine it runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import IncomingVm, incoming_argv

START_TIMEOUT_S = 15.0


class LocalHost:
    def __init__(self, name: str = "localhost", address: str = "127.0.0.1",
                 run_dir: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.address = address
        self._run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="sevconsole-"))
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._count = 0

    async def open_qmp(self, path: str) -> QMPClient:
        client = QMPClient(f"{self.name}:{Path(path).name}")
        try:
            await asyncio.wait_for(client.connect(path), timeout=10)
        except (TimeoutError, OSError, QMPError) as exc:
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise LinkError(self.name, f"cannot open QMP socket {path}: {exc}") from exc
        return client

    async def launch_incoming(self, argv: Sequence[str]) -> IncomingVm:
        if not argv:
            raise LinkError(self.name, "the source VM's command line is unknown; cannot start its twin")
        self._count += 1
        # generated names: nothing of the source (its VM name) becomes a path here
        sock = self._run_dir / f"incoming-{os.getpid()}-{self._count}.qmp"
        log = self._run_dir / f"incoming-{self._count}.log"
        cmd = incoming_argv(argv, str(sock), self.name)  # the allow-list; raises LinkError
        with open(log, "wb") as err:
            try:
                # cwd "/": a firmware file name is never looked up in the console's folder
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                        start_new_session=True, cwd="/")
            except OSError as exc:
                raise LinkError(self.name, f"cannot start {cmd[0]}: {exc}") from exc
        self._children[proc.pid] = proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        # QEMU binds its QMP socket, then listens, during start-up: wait until it accepts (or exits).
        while not accepts(sock):
            if proc.poll() is not None:
                self._children.pop(proc.pid, None)
                text = log.read_text(errors="replace").strip()[-400:]
                raise LinkError(self.name, f"incoming QEMU exited with {proc.returncode}: {text}")
            if loop.time() > deadline:
                await self.stop(proc.pid)
                raise LinkError(self.name, f"incoming QEMU made no QMP socket in {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)
        return IncomingVm(pid=proc.pid, qmp=str(sock))

    async def stop(self, pid: int) -> bool:
        proc = self._children.pop(pid, None)
        if proc is not None:
            if proc.poll() is not None:
                return False
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            return True
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            raise LinkError(self.name, f"not allowed to stop pid {pid}: {exc}") from exc
        deadline = asyncio.get_running_loop().time() + 5
        while _alive(pid) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True

    def started(self) -> list[int]:
        """Pids of the QEMUs this link started that still run."""
        return [pid for pid, proc in self._children.items() if proc.poll() is None]

    async def close(self) -> None:
        for pid in list(self._children):
            proc = self._children[pid]
            if proc.poll() is not None:
                self._children.pop(pid)


def accepts(path: Path) -> bool:
    """Whether a UNIX socket at `path` accepts a connection now (QEMU binds, then listens)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
