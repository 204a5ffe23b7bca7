"""Real parts for the hosts tests: an OpenSSH sshd on loopback and TCG QEMUs with QMP sockets.

sshd runs in the foreground (-D -e) as a child of the test session with its own config, host
key and authorized client key. It listens on three ports: on the second one a ForceCommand
runs every command with PATH=/nonexistent, which is how a host without python3 looks; on the
third, PATH holds socat only (no python3), for the QMP bridge's fallback; on the fourth, every
command prints a probe answer of the wrong shape; the fifth is a compromised host: it runs every
command as asked, but its probe answer gives each VM's argv an injected option (COMPROMISED).
Readiness is read from sshd's own log ("Server listening"), never guessed with a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sevconsole.hosts.hostkeys import HostKeyStore
from sevconsole.hosts.inventory import HostSpec
from sevconsole.hosts.ssh import SshPool, Timeouts
from tests.conftest import require_binary

START_TIMEOUT = 15.0
# Right version, wrong types everywhere else.
# The fifth port's ForceCommand: the helper runs for real; a probe's JSON is then rewritten so
# every VM's command line carries INJECTED (which makes a QEMU run `touch DIR/PWNED`).
COMPROMISED = """\
import json, os, shlex, subprocess, sys
command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
words = shlex.split(command)
if len(words) < 5 or words[4] != "probe":
    os.execv("/bin/sh", ["/bin/sh", "-c", command])
out = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE).stdout
answer = json.loads(out)
for vm in answer.get("vms", []):
    vm["argv"] += INJECTED
sys.stdout.write(json.dumps(answer))
"""
ODD_PROBE = ('{"helper": 1, "hostname": 7, "kvm_amd": "Y", "platform_status": [1, 2], "dev_sev": "yes", '
             '"pdh": "%%%", "errors": "not a list", "vms": [{"pid": "12", "qmp": 5, "argv": "x"}, 3]}')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ed25519(path: Path) -> str:
    """Write an OpenSSH private key (mode 0600) and return the public line."""
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    path.with_suffix(".pub").write_text(public + "\n")
    return public


@dataclass
class Sshd:
    dir: Path
    port: int
    nopython_port: int
    socat_only_port: int
    odd_port: int  # every command prints ODD_PROBE: a host answering the protocol badly
    compromised_port: int  # a host whose probe injects options into its VMs' argv (COMPROMISED)
    client_key: Path
    host_public: str  # "ssh-ed25519 AAAA..."
    proc: subprocess.Popen[bytes]
    log: list[str] = field(default_factory=list)

    @property
    def user(self) -> str:
        import getpass

        return getpass.getuser()

    def spec(self, name: str = "h1", **kw: object) -> HostSpec:
        values: dict[str, object] = {"address": "127.0.0.1", "port": self.port, "user": self.user,
                                     "identity": (self.client_key,)}
        values.update(kw)
        return HostSpec(name=name, **values)  # type: ignore[arg-type]

    def known_hosts_line(self, port: int | None = None) -> str:
        return f"[127.0.0.1]:{port or self.port} {self.host_public}\n"


def _start_sshd(base: Path) -> Sshd:
    sshd = require_binary("sshd")
    base.mkdir(parents=True, exist_ok=True)
    host_public = write_ed25519(base / "host_ed25519")
    client_public = write_ed25519(base / "client_ed25519")
    (base / "authorized_keys").write_text(client_public + "\n")
    port, nopy, socat_only, odd, evil = free_port(), free_port(), free_port(), free_port(), free_port()
    injected = ["-netdev", f"bridge,id=x,br=br0,helper=touch {base / 'PWNED'};"]
    (base / "compromised.py").write_text(f"INJECTED = {injected!r}\n" + COMPROMISED)
    only = base / "socat-only-bin"  # a PATH holding socat and nothing else: no python3
    only.mkdir(exist_ok=True)
    socat = require_binary("socat")
    if not (only / "socat").exists():
        (only / "socat").symlink_to(socat)
    config = base / "sshd_config"
    config.write_text(f"""\
Port {port}
Port {nopy}
Port {socat_only}
Port {odd}
Port {evil}
ListenAddress 127.0.0.1
HostKey {base / 'host_ed25519'}
PidFile {base / 'sshd.pid'}
AuthorizedKeysFile {base / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
MaxSessions 100
MaxStartups 100:30:200
LogLevel INFO
Match LocalPort {nopy}
    ForceCommand env PATH=/nonexistent /bin/sh -c "$SSH_ORIGINAL_COMMAND"
Match LocalPort {socat_only}
    ForceCommand env PATH={only} /bin/sh -c "$SSH_ORIGINAL_COMMAND"
Match LocalPort {odd}
    ForceCommand echo '{ODD_PROBE}'
Match LocalPort {evil}
    ForceCommand {sys.executable} {base / 'compromised.py'}
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = Sshd(base, port, nopy, socat_only, odd, evil, base / "client_ed25519", host_public.strip(), proc)
    listening: set[str] = set()
    deadline = time.monotonic() + START_TIMEOUT
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    pending = b""
    while len(listening) < 5:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            proc.kill()
            pytest.fail(f"sshd did not start listening within {START_TIMEOUT} s: {server.log}")
        chunk = os.read(fd, 4096)  # raw reads: a buffered readline could hide lines from select
        if not chunk:
            pytest.fail(f"sshd exited at start (code {proc.wait()}): {server.log}")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            server.log.append(line)
            if "Server listening on" in line:
                listening.add(line.split(" port ")[-1].strip(" ."))

    def drain() -> None:  # keep reading so sshd never blocks on a full pipe
        while chunk := os.read(fd, 4096):
            server.log.extend(chunk.decode(errors="replace").splitlines())
            del server.log[:-200]

    threading.Thread(target=drain, daemon=True).start()
    return server


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = _start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture
def trusting_keys(sshd: Sshd, tmp_path: Path) -> HostKeyStore:
    """A key store that already knows the test sshd (both ports), and no system files."""
    own = tmp_path / "known_hosts"
    own.write_text("".join(sshd.known_hosts_line(p) for p in (sshd.port, sshd.nopython_port,
                                                               sshd.socat_only_port, sshd.odd_port,
                                                               sshd.compromised_port)))
    return HostKeyStore(own, system_files=())


@pytest.fixture
def pool(trusting_keys: HostKeyStore) -> Iterator[SshPool]:
    with SshPool(trusting_keys, Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10),
                 use_agent=False) as p:
        yield p


# ---------------------------------------------------------------- a second machine


def _read_until_listening(proc: subprocess.Popen[bytes], log: list[str], what: str) -> None:
    """Block until sshd says it listens (its own log line), failing with its output otherwise."""
    assert proc.stderr is not None
    fd, pending = proc.stderr.fileno(), b""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            proc.kill()
            pytest.fail(f"{what} did not start listening within {START_TIMEOUT} s: {log}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"{what} exited at start (code {proc.wait()}): {log}")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        log.extend(line.decode(errors="replace") for line in lines)
        if any("Server listening on" in line for line in log):
            break

    def drain() -> None:
        while chunk := os.read(fd, 4096):
            log.extend(chunk.decode(errors="replace").splitlines())
            del log[:-200]

    threading.Thread(target=drain, daemon=True).start()


def start_other_machine(base: Path, first: Sshd) -> Sshd:
    """Another "machine" on this one: its own sshd and host key, in a mount namespace of its own
    whose /etc/machine-id differs (hosts/identity.py tells machines apart by both). The file
    system, processes and network are shared, as they are for the first sshd."""
    sshd = require_binary("sshd")
    unshare = require_binary("unshare")
    if os.geteuid() != 0:
        pytest.skip("a second test machine needs root (a mount namespace with its own /etc/machine-id)")
    base.mkdir(parents=True, exist_ok=True)
    host_public = write_ed25519(base / "host_ed25519")
    (base / "machine-id").write_text(uuid.uuid4().hex + "\n")
    port = free_port()
    config = base / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base / 'host_ed25519'}
PidFile {base / 'sshd.pid'}
AuthorizedKeysFile {first.dir / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
MaxSessions 100
MaxStartups 100:30:200
LogLevel INFO
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    script = f"mount --bind {base / 'machine-id'} /etc/machine-id && exec {sshd} -D -e -f {config}"
    proc = subprocess.Popen([unshare, "-m", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    other = Sshd(base, port, port, port, port, port, first.client_key, host_public.strip(), proc)
    _read_until_listening(proc, other.log, "the second machine's sshd")
    return other


@pytest.fixture(scope="session")
def machine_b(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A second machine's sshd (see start_other_machine); `machine_b.spec("h2")` is that host."""
    other = start_other_machine(tmp_path_factory.mktemp("machine-b"), sshd)
    yield other
    other.proc.send_signal(signal.SIGTERM)
    try:
        other.proc.wait(10)
    except subprocess.TimeoutExpired:
        other.proc.kill()
        other.proc.wait()


@pytest.fixture
def pool2(sshd: Sshd, machine_b: Sshd, tmp_path: Path) -> Iterator[SshPool]:
    """A pool that knows both machines' host keys (the first one also as localhost)."""
    own = tmp_path / "known_hosts2"
    own.write_text(sshd.known_hosts_line() + machine_b.known_hosts_line()
                   + f"[localhost]:{sshd.port} {sshd.host_public}\n")
    with SshPool(HostKeyStore(own, system_files=()), Timeouts(connect=3, banner=5, handshake=5, auth=5,
                                                                channel=10), use_agent=False) as p:
        yield p


# ---------------------------------------------------------------- QEMU


@dataclass
class Vm:
    name: str
    pid: int
    qmp: Path
    argv: list[str]


def pid_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit, through a pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not pid_gone(pid, 10):
        os.kill(pid, signal.SIGKILL)
        pid_gone(pid, 5)


@pytest.fixture
def qemu_vm(tmp_path: Path) -> Iterator[object]:
    """Factory: start a TCG QEMU with a QMP socket; -daemonize returns once the socket is open."""
    qemu = require_binary("qemu-system-x86_64")
    started: list[Vm] = []

    def start(name: str | None = None) -> Vm:
        name = name or f"t{uuid.uuid4().hex[:8]}"
        qmp = tmp_path / f"{name}.qmp"
        pidfile = tmp_path / f"{name}.pid"
        argv = [qemu, "-machine", "q35,accel=tcg", "-m", "64", "-display", "none", "-nodefaults",
                "-qmp", f"unix:{qmp},server=on,wait=off", "-name", name,
                "-daemonize", "-pidfile", str(pidfile)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT)
        assert out.returncode == 0, out.stderr
        vm = Vm(name, int(pidfile.read_text()), qmp, argv)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        kill_pid(vm.pid)
