"""Engine test fixtures: real QEMU guests under TCG on this machine, and a cuttable QMP relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sevconsole.hosts.report import HostReport, VmInfo
from tests.conftest import require_binary
from tests.engine.local import LocalHost, accepts

# the hosts tests' real sshd and TCG QEMU fixtures, shared rather than copied
from tests.hosts.conftest import machine_b, pool, pool2, qemu_vm, sshd, trusting_keys  # noqa: F401, E402

MEMORY_MIB = 64


def qemu_argv(qemu: str, name: str, qmp: Path, memory_mib: int = MEMORY_MIB,
              mem_file: Path | None = None) -> list[str]:
    argv = [qemu, "-machine", "q35,accel=tcg", "-m", str(memory_mib), "-display", "none",
            "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off", "-name", name]
    if mem_file is not None:
        # guest RAM read from a file of random bytes (private mapping): every page must be sent
        argv[2] += ",memory-backend=ram0"
        argv += ["-object", f"memory-backend-file,id=ram0,size={memory_mib}M,mem-path={mem_file},share=off"]
    return argv


@dataclass
class LocalGuests:
    """Starts source guests and reaps every QEMU it or the engine started under `run_dir`."""

    qemu: str
    run_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def start(self, name: str = "web", memory_mib: int = MEMORY_MIB,
                    random_memory: bool = False) -> VmInfo:
        qmp = self.run_dir / f"{name}.qmp"
        mem_file = None
        if random_memory:
            mem_file = self.run_dir / f"{name}.ram"
            with open(mem_file, "wb") as out:
                for _ in range(memory_mib):
                    out.write(os.urandom(1 << 20))
        argv = qemu_argv(self.qemu, name, qmp, memory_mib, mem_file)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not accepts(qmp):  # QEMU binds, then listens, during start-up
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "qemu exited"
            assert loop.time() < deadline, "QEMU made no QMP socket in 15 s"
            await asyncio.sleep(0.02)
        return VmInfo(name=name, pid=proc.pid, qmp_path=str(qmp), argv=tuple(argv), status="running",
                      memory_mib=memory_mib)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The console's data (audit log, known_hosts) under the test's own folder."""
    path = tmp_path / "data"
    monkeypatch.setenv("SEVCONSOLE_DATA_DIR", str(path))
    monkeypatch.setenv("SEVCONSOLE_CONFIG_DIR", str(tmp_path / "config"))
    return path


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[LocalGuests]:
    g = LocalGuests(require_binary("qemu-system-x86_64"), tmp_path)
    yield g
    g.close()


def plain_reports(vm: VmInfo) -> tuple[HostReport, HostReport]:
    src = HostReport(name="src", address="127.0.0.1", port=22, reachable=True, vms=(vm,))
    dst = HostReport(name="dst", address="127.0.0.1", port=22, reachable=True,
                     mem_available_mib=4096)
    return src, dst


class QmpRelay:
    """A UNIX socket that forwards to a QEMU's QMP socket; `cut()` drops every connection,
    like an SSH bridge dying; `refuse` makes new connections fail."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.refuse = False
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> QmpRelay:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        self.connections += 1
        up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[list[QmpRelay]]:
    made: list[QmpRelay] = []
    yield made
    for r in made:
        await r.close()


@pytest.fixture
async def local_hosts(tmp_path: Path) -> AsyncIterator[tuple[LocalHost, LocalHost]]:
    """Source and target links on this machine; every QEMU the target started is stopped after."""
    src = LocalHost("src", run_dir=tmp_path)
    dst = LocalHost("dst", run_dir=tmp_path)
    yield src, dst
    for link in (src, dst):
        for pid in link.started():
            await link.stop(pid)


# ---------------------------------------------------------------- the lab, over real SSH


@dataclass
class LabSession:
    """A running lab reached like any hosts: inventory, discovery over SSH, SshHost links."""

    lab: Any
    inventory: Any
    options: Any
    pool: Any
    trust: Any

    def reports(self, *names: str, need: tuple[str, ...] = ()) -> dict[str, HostReport]:
        """Discover the named hosts; again while a VM in `need` could not be queried (the lab's
        SSH server now and then closes an exec channel under load)."""
        from sevconsole.hosts.discovery import discover

        specs = [h for h in self.inventory.hosts if h.name in names]
        for _ in range(10):
            got = {r.name: r for r in discover(specs, self.options, pool=self.pool)}
            if all(r.reachable and not any(v.errors for v in r.vms if v.name in need) for r in got.values()):
                return got
        bad = {n: [v.errors for v in r.vms] for n, r in got.items()}
        raise AssertionError(f"lab discovery kept failing: {bad}")

    def link(self, report: HostReport) -> Any:
        from sevconsole.engine.ssh import SshHost
        from sevconsole.hosts.discovery import endpoint_for

        spec = self.inventory.by_name()[report.name]
        endpoint = endpoint_for(spec, self.inventory.hosts)
        return SshHost(report.name, report.address, self.pool.get(endpoint),
                       reconnect=lambda: self.pool.get(endpoint))


    async def qmp(self, report: HostReport, vm: str, command: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command to a lab VM, over SSH like the console does."""
        link = self.link(report)
        qmp_path = report.vm(vm).qmp_path  # type: ignore[union-attr]
        client = await link.open_qmp(qmp_path)
        try:
            return await client.execute(command, args)
        finally:
            await client.disconnect()
            await link.close()


def load_lab_inventory(path: Path) -> Any:
    from sevconsole.hosts.inventory import InventoryError, load_inventory, parse_inventory

    try:
        return load_inventory(path)
    except InventoryError:
        # older hosts/ builds refuse the lab's top-level keys; the [[host]] tables are enough here
        text = path.read_text()
        return parse_inventory(text[text.index("[[host]]"):], path)


def open_lab_session(state: Path, amd: Path, **lab_kw: Any) -> Iterator[LabSession]:
    from sevconsole.hosts.discovery import DiscoveryOptions
    from sevconsole.lab.control import Lab
    from sevconsole.sev.certs import AmdCert
    from sevconsole.sev.trust import TrustStore

    lab = Lab.start(state, **lab_kw)
    patch = pytest.MonkeyPatch()
    # The lab's SSH server drops exec channels opened at the same moment (about 4 in 10 VM
    # queries at discovery's default of 4); one VM at a time keeps these tests about the engine.
    patch.setattr("sevconsole.hosts.discovery.VM_CONCURRENCY", 1)
    try:
        options = DiscoveryOptions(known_hosts=lab.known_hosts, system_known_hosts=(),
                                   lab_root=lab.paths.lab_root, amd_roots=amd, use_agent=False)
        with options.pool() as pool:
            trust = TrustStore.amd().with_lab_root(AmdCert.from_bytes(lab.lab_ark.read_bytes()))
            yield LabSession(lab, load_lab_inventory(lab.inventory), options, pool, trust)
    finally:
        patch.undo()
        lab.stop()


@pytest.fixture(scope="module")
def lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSession]:
    yield from open_lab_session(tmp_path_factory.mktemp("lab"), tmp_path_factory.mktemp("amd"),
                                hosts=3, dirty_rate=300.0)
