"""Two real libvirt "hosts" on this machine, reached over SSH as an operator reaches them.

Each host is a libvirtd and an sshd in mount and PID namespaces of their own (libvirt_init.py is
PID 1 there): /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt
and /etc/machine-id are the host's own folders bound over the system paths, and its /proc shows
only its own processes. The file system and the network are shared, so the test reaches each
libvirtd also through its socket's real path (`qemu+unix:///system?socket=...`), which is also
how one host's libvirt reaches the other's for a migration. See the shared recipe in the project
brief (libvirt-test-hosts.md) for the settings and why each is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sevconsole.hosts.inventory import HostSpec
from tests.conftest import require_binary
from tests.hosts.conftest import free_port, write_ed25519

START_TIMEOUT = 90.0
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
GUEST_XML = """\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>{extra}
</domain>
"""
# QEMU's generic loader copies a file into guest RAM at reset: random bytes there are pages the
# migration must really send (a guest without an OS is otherwise all zero pages, sent in a blink)
LOADER = """
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={path},addr=0x1000000,force-raw=on'/>
  </qemu:commandline>"""


@dataclass
class LibvirtHost:
    name: str
    base: Path
    port: int
    host_public: str
    client_key: Path
    proc: subprocess.Popen[bytes]
    log: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.base / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How another host's libvirt (and this test) reaches this one's."""
        return f"qemu+unix:///system?socket={self.socket}"

    def spec(self, **kw: object) -> HostSpec:
        values: dict[str, object] = {"address": "127.0.0.1", "port": self.port, "user": "root",
                                     "identity": (self.client_key,), "libvirt_uri": self.uri}
        values.update(kw)
        return HostSpec(name=self.name, **values)  # type: ignore[arg-type]

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public}\n"

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        out = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{self.name}: virsh {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start_guest(self, name: str, mib: int = 64, *, random_mib: int = 0) -> str:
        """A persistent (defined, then started) plain guest; `random_mib` of its RAM hold random
        bytes (a migration that takes a while). Returns its UUID."""
        domain_uuid = str(uuid.uuid4())
        extra = ""
        if random_mib:
            blob = self.base / f"{name}.random"
            blob.write_bytes(os.urandom(random_mib << 20))
            extra = LOADER.format(path=blob)
        xml = self.base / f"{name}.xml"
        xml.write_text(GUEST_XML.format(name=name, uuid=domain_uuid, mib=mib, extra=extra,
                                        qemu=shutil.which("qemu-system-x86_64")))
        self.virsh("define", str(xml))
        self.virsh("start", name)
        return domain_uuid

    def state(self, domain: str) -> str | None:
        out = subprocess.run(["virsh", "-q", "-c", self.uri, "domstate", domain], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None

    @property
    def init_pid(self) -> int | None:
        """The host's PID 1 (libvirt_init.py) as this test sees it: unshare's child."""
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                return int(task.read_text().split()[0])
        return None

    def pids(self) -> set[int]:
        """Pids (as this test sees them) of every process in this host's PID namespace."""
        init = self.init_pid
        ns = os.readlink(f"/proc/{init}/ns/pid") if init else None
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        found.add(int(entry))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            init = self.init_pid  # unshare itself does not pass signals on
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _caps_cache(base: Path) -> Path:
    """libvirt's probe of the QEMU binary (seconds of QEMU start-ups) is kept across the session's
    hosts: each new host starts with the cache a previous one filled (libvirt re-checks it)."""
    return base.parent / "libvirt-qemu-caps"


def save_caps(host: LibvirtHost) -> None:
    cache = _caps_cache(host.base.parent)
    cache.mkdir(exist_ok=True)
    for found in (host.base / "cache" / "qemu" / "capabilities").glob("*.xml"):
        shutil.copy2(found, cache / found.name)


def _start(base: Path, name: str, client_public: str, client_key: Path) -> LibvirtHost:
    libvirtd, virsh = require_binary("libvirtd"), require_binary("virsh")
    sshd, unshare = require_binary("sshd"), require_binary("unshare")
    require_binary("qemu-system-x86_64")
    if os.geteuid() != 0:
        pytest.skip("test libvirt hosts need root (mount and PID namespaces, libvirtd's system paths)")
    base.mkdir(parents=True)
    for folder in ("run", "lib", "log", "cache"):
        (base / folder).mkdir()
    cached = _caps_cache(base.parent)
    if cached.is_dir():
        shutil.copytree(cached, base / "cache" / "qemu" / "capabilities")
    shutil.copytree("/etc/libvirt", base / "etc", symlinks=True)
    for autostart in (base / "etc").rglob("autostart/*"):
        autostart.unlink()  # no default network: the hosts share one network namespace
    (base / "etc" / "libvirtd.conf").write_text(f'host_uuid = "{uuid.uuid4()}"\n')
    (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (base / "machine-id").write_text(uuid.uuid4().hex + "\n")
    host_public = write_ed25519(base / "host_ed25519").strip()
    (base / "authorized_keys").write_text(client_public + "\n")
    port = free_port()
    (base / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base / 'host_ed25519'}
PidFile {base / 'sshd.pid'}
AuthorizedKeysFile {base / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxSessions 100
MaxStartups 100:30:200
""")
    config = base / "init.json"
    config.write_text(json.dumps({"base": str(base), "libvirtd": libvirtd, "virsh": virsh, "sshd": sshd,
                                  "sshd_config": str(base / "sshd_config")}))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    Path("/run/libvirt").mkdir(exist_ok=True)  # the mount point the namespace binds over
    init = Path(__file__).with_name("libvirt_init.py")
    # --kill-child: should this test process die, unshare dies with it and takes the namespace along
    proc = subprocess.Popen([unshare, "-m", "-p", "--fork", "--kill-child", "--mount-proc", "--propagation",
                             "private", sys.executable, str(init), str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    host = LibvirtHost(name, base, port, host_public, client_key, proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if line != "ready":
        host.stop()
        tail = (base / "host.log").read_text(errors="replace")[-2000:] if (base / "host.log").exists() else ""
        pytest.fail(f"libvirt host {name} did not start: {line or 'no answer'} {tail}")
    _wait_port(port)
    return host


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"sshd on {port} never listened"
        time.sleep(0.02)  # sshd's own readiness line goes to the host's log, not to us


@dataclass
class LibvirtPair:
    a: LibvirtHost
    b: LibvirtHost
    known_hosts: Path

    def stop(self) -> None:
        for host in (self.a, self.b):
            host.stop()


def start_pair(base: Path) -> LibvirtPair:
    client_key = base / "client_ed25519"
    base.mkdir(parents=True, exist_ok=True)
    client_public = write_ed25519(client_key)
    a = _start(base / "hv-a", "hv-a", client_public, client_key)
    try:
        b = _start(base / "hv-b", "hv-b", client_public, client_key)
    except BaseException:
        a.stop()
        raise
    known = base / "known_hosts"
    known.write_text(a.known_hosts_line() + b.known_hosts_line())
    return LibvirtPair(a, b, known)
