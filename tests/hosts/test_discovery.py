"""Discovery against a real sshd and real QEMUs: VMs and their status, errors per host."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sevconsole.hosts.discovery import DiscoveryOptions, discover, iter_discover
from sevconsole.hosts.hostkeys import HostKeyStore
from sevconsole.hosts.ssh import SshPool, Timeouts
from tests.hosts.conftest import Sshd, free_port

pytestmark = [pytest.mark.needs_sshd, pytest.mark.needs_qemu]

TIMEOUTS = Timeouts(connect=2, banner=3, handshake=5, auth=5, channel=10)


def options(tmp_path: Path, **kw: object) -> DiscoveryOptions:
    values: dict[str, object] = {"known_hosts": tmp_path / "known_hosts", "system_known_hosts": (),
                                 "amd_roots": tmp_path / "no-roots", "ssh_config": tmp_path / "no-config",
                                 "timeouts": TIMEOUTS, "use_agent": False}
    values.update(kw)
    return DiscoveryOptions(**values)  # type: ignore[arg-type]


def test_discovery_finds_vms_and_their_status(sshd: Sshd, pool: SshPool, qemu_vm, tmp_path: Path) -> None:
    a, b = qemu_vm(), qemu_vm()
    [report] = discover([sshd.spec("h1")], options(tmp_path), pool=pool)
    assert report.reachable and report.errors == (), report.errors
    assert report.latency_ms is not None and report.latency_ms > 0
    assert report.hostname and report.kernel and report.cpu
    assert report.sev is not None and report.sev.dev_sev is False  # no SEV on this machine
    assert report.capabilities is None  # and no error for it: the host has no SEV at all
    for vm in (a, b):
        info = report.vm(vm.name)
        assert info is not None, [v.name for v in report.vms]
        assert (info.pid, info.qmp_path, info.status) == (vm.pid, str(vm.qmp), "running")
        assert info.memory_mib == 64 and info.sev_enabled is False and info.errors == ()
        assert "-incoming" not in info.argv and info.argv[-2:] == ("-pidfile", vm.argv[-1])


def test_qmp_globs_from_the_inventory_find_hidden_sockets(sshd: Sshd, pool: SshPool, tmp_path: Path) -> None:
    """A QEMU whose argv names its QMP socket through a passed fd (like libvirt) is found by glob."""
    import socket
    import subprocess

    from tests.conftest import require_binary
    from tests.hosts.conftest import kill_pid

    qemu = require_binary("qemu-system-x86_64")
    path = tmp_path / "hidden.qmp"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    name = f"hidden{time.monotonic_ns() % 100000}"
    proc = subprocess.Popen([qemu, "-machine", "q35,accel=tcg", "-m", "64", "-display", "none", "-nodefaults",
                             "-chardev", f"socket,id=mon,fd={listener.fileno()},server=on,wait=off",
                             "-mon", "chardev=mon,mode=control", "-name", name],
                            pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.close()
    try:
        without = discover([sshd.spec("h1")], options(tmp_path, query_vms=False), pool=pool)[0]
        assert without.vm(name) is not None and without.vm(name).qmp_path is None
        spec = sshd.spec("h1", qmp_sockets=(str(tmp_path / "*.qmp"),))
        [report] = discover([spec], options(tmp_path), pool=pool)
        info = report.vm(name)
        assert info is not None and info.qmp_path == str(path) and info.pid == proc.pid
        assert info.status == "running", info.errors
    finally:
        kill_pid(proc.pid)
        proc.wait(10)


def test_one_bad_host_never_stops_the_others(sshd: Sshd, qemu_vm, tmp_path: Path) -> None:
    vm = qemu_vm()
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + sshd.known_hosts_line(sshd.nopython_port))
    hosts = [sshd.spec("good"), sshd.spec("closed", port=free_port()),
             sshd.spec("nopy", port=sshd.nopython_port), sshd.spec("stranger", user="nosuchuser"),
             sshd.spec("unknown-key", port=sshd.socat_only_port)]
    seen: list[tuple[str, str]] = []
    caller = threading.get_ident()
    reports = discover(hosts, options(tmp_path, known_hosts=kh),
                       on_report=lambda r: seen.append((r.name, threading.get_ident() == caller)))
    by = {r.name: r for r in reports}
    assert [r.name for r in reports] == [h.name for h in hosts]
    assert sorted(n for n, _ in seen) == sorted(h.name for h in hosts) and all(same for _, same in seen)
    assert by["good"].vm(vm.name) is not None and by["good"].errors == ()
    assert not by["closed"].reachable and "refused" in by["closed"].errors[0]
    assert by["nopy"].reachable and "python3" in by["nopy"].errors[0]
    assert "nosuchuser" in by["stranger"].errors[0] and "authentication refused" in by["stranger"].errors[0]
    unknown = by["unknown-key"]
    assert unknown.host_key is not None and unknown.host_key.status == "unknown"
    assert unknown.host_key.fingerprint in unknown.errors[0]
    # the operator accepts it; the next discovery gets past the key (to this port's missing python3)
    HostKeyStore(kh, system_files=()).accept(unknown.host_key.host_id, unknown.host_key.key_type,
                                             unknown.host_key.key_base64)
    again = discover([hosts[-1]], options(tmp_path, known_hosts=kh, query_vms=False))[0]
    assert again.host_key is None and again.latency_ms is not None and "python3" in again.errors[0]


def test_discovery_is_concurrent_and_bounded(sshd: Sshd, tmp_path: Path) -> None:
    """Four silent hosts (TCP accepted, no SSH banner) cost one banner timeout together, not four;
    with max_workers=2 they take two rounds."""
    import socket

    silent = []
    for _ in range(4):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        silent.append(s)
    timeouts = Timeouts(connect=1, banner=1, handshake=1, auth=1, channel=2)
    hosts = [sshd.spec(f"s{i}", port=s.getsockname()[1]) for i, s in enumerate(silent)]
    try:
        started = time.monotonic()
        reports = list(iter_discover(hosts, options(tmp_path, timeouts=timeouts)))
        parallel = time.monotonic() - started
        started = time.monotonic()
        list(iter_discover(hosts, options(tmp_path, timeouts=timeouts, max_workers=2)))
        bounded = time.monotonic() - started
    finally:
        for s in silent:
            s.close()
    assert all(not r.reachable and "banner" in r.errors[0] for r in reports)
    single = timeouts.banner + timeouts.handshake
    assert parallel < single + 1.0
    assert bounded >= 2 * timeouts.banner and bounded < 2 * single + 1.5


def test_a_host_answering_nonsense_is_reported_not_crashed(sshd: Sshd, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line(sshd.odd_port))
    [report] = discover([sshd.spec("odd", port=sshd.odd_port)], options(tmp_path, known_hosts=kh))
    assert report.reachable and report.hostname == "7"
    assert report.sev is not None and report.sev.api is None and report.sev.kernel_sev is None
    assert report.sev.dev_sev is False and report.capabilities is None and report.errors == ()
    [vm] = report.vms  # the entry that is not an object is skipped
    assert vm.pid is None and vm.qmp_path is None and vm.argv == ()
    assert "no QMP socket" in vm.errors[0]
