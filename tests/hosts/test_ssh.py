"""SSH against a real OpenSSH sshd: host keys, authentication, timeouts, a host without python3."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path

import paramiko
import pytest

from sevconsole.hosts.errors import (
    HostKeyChanged,
    HostUnreachable,
    NoPython,
    SshAuthError,
    SshTimeout,
    UnknownHostKey,
)
from sevconsole.hosts.hostkeys import HostKeyStore, fingerprint
from sevconsole.hosts.remote import probe, run_helper
from sevconsole.hosts.ssh import SshConnection, SshPool, Timeouts, resolve
from tests.hosts.conftest import Sshd, free_port, write_ed25519

pytestmark = pytest.mark.needs_sshd

FAST = Timeouts(connect=2, banner=2, handshake=3, auth=5, channel=5)


def openssh_fingerprint(public_line: str) -> str:
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def test_fingerprint_matches_openssh_form(sshd: Sshd) -> None:
    key = paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(sshd.host_public.split()[1]))
    fp = fingerprint(key)
    assert fp == openssh_fingerprint(sshd.host_public)
    assert fp.startswith("SHA256:") and not fp.endswith("=") and len(fp) == 7 + 43


def test_known_host_connects_and_runs_a_command(sshd: Sshd, pool: SshPool) -> None:
    conn = pool.get(resolve(sshd.spec()))
    assert conn.alive and conn.connect_ms > 0
    result = conn.run("echo out; echo err >&2; exit 3")
    assert (result.rc, result.stdout, result.err_text) == (3, b"out\n", "err")
    # one transport per host: the pool hands back the same connection
    assert pool.get(resolve(sshd.spec())) is conn
    assert conn.ping() > 0


def test_unknown_key_refused_with_fingerprint_then_accepted(sshd: Sshd, tmp_path: Path) -> None:
    own = tmp_path / "kh"
    keys = HostKeyStore(own, system_files=())
    endpoint = resolve(sshd.spec())
    with pytest.raises(UnknownHostKey) as info:
        SshConnection.open(endpoint, keys, FAST, use_agent=False)
    err = info.value
    expected = openssh_fingerprint(sshd.host_public)
    assert (err.fingerprint, err.key_type, err.host_id) == (expected, "ssh-ed25519", f"[127.0.0.1]:{sshd.port}")
    assert expected in str(err) and "--accept-host-key" in str(err)
    assert not own.exists()  # nothing remembered without a decision

    # A wrong fingerprint accepts nothing.
    wrong = HostKeyStore(own, system_files=(), accept={"SHA256:" + "A" * 43})
    with pytest.raises(UnknownHostKey):
        SshConnection.open(endpoint, wrong, FAST, use_agent=False)

    accepting = HostKeyStore(own, system_files=(), accept={expected})
    SshConnection.open(endpoint, accepting, FAST, use_agent=False).close()
    assert own.read_text().split() == [f"[127.0.0.1]:{sshd.port}", *sshd.host_public.split()[:2]]
    # Remembered: a fresh store with no acceptance connects.
    SshConnection.open(endpoint, HostKeyStore(own, system_files=()), FAST, use_agent=False).close()


def test_accept_api_for_the_console(sshd: Sshd, tmp_path: Path) -> None:
    keys = HostKeyStore(tmp_path / "kh", system_files=())
    endpoint = resolve(sshd.spec())
    with pytest.raises(UnknownHostKey) as info:
        SshConnection.open(endpoint, keys, FAST, use_agent=False)
    keys.accept(info.value.host_id, info.value.key_type, info.value.key_base64)
    SshConnection.open(endpoint, keys, FAST, use_agent=False).close()


def test_changed_key_refused_even_when_accepted(sshd: Sshd, tmp_path: Path) -> None:
    other = write_ed25519(tmp_path / "other")
    own = tmp_path / "kh"
    own.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    offered = openssh_fingerprint(sshd.host_public)
    keys = HostKeyStore(own, system_files=(), accept={offered})
    with pytest.raises(HostKeyChanged) as info:
        SshConnection.open(resolve(sshd.spec()), keys, FAST, use_agent=False)
    err = info.value
    assert err.fingerprint == offered and err.known_fingerprint == openssh_fingerprint(other)
    assert offered in str(err) and err.known_fingerprint in str(err) and "Refused" in str(err)
    assert own.read_text() == f"[127.0.0.1]:{sshd.port} {other}\n"  # never overwritten


def test_system_known_hosts_are_read_only(sshd: Sshd, tmp_path: Path) -> None:
    system = tmp_path / "system_known_hosts"
    system.write_text(sshd.known_hosts_line())
    own = tmp_path / "own"
    SshConnection.open(resolve(sshd.spec()), HostKeyStore(own, system_files=(system,)), FAST,
                       use_agent=False).close()
    assert not own.exists() and system.read_text() == sshd.known_hosts_line()


def test_wrong_user_is_an_authentication_error(sshd: Sshd, trusting_keys: HostKeyStore) -> None:
    with pytest.raises(SshAuthError) as info:
        SshConnection.open(resolve(sshd.spec(user="nosuchuser")), trusting_keys, FAST, use_agent=False)
    text = str(info.value)
    assert "nosuchuser" in text and "refused" in text and str(sshd.client_key) in text


def test_wrong_key_is_an_authentication_error(sshd: Sshd, trusting_keys: HostKeyStore, tmp_path: Path) -> None:
    write_ed25519(tmp_path / "stranger")
    with pytest.raises(SshAuthError) as info:
        SshConnection.open(resolve(sshd.spec(identity=(tmp_path / "stranger",))), trusting_keys, FAST,
                           use_agent=False)
    assert "stranger" in str(info.value) and "authorized_keys" in str(info.value)


def test_closed_port_fails_within_the_connect_timeout(trusting_keys: HostKeyStore, sshd: Sshd) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as info:
        SshConnection.open(resolve(sshd.spec(port=port)), trusting_keys, FAST, use_agent=False)
    assert time.monotonic() - started < FAST.connect + 1
    assert f"127.0.0.1:{port}" in str(info.value) and "refused" in str(info.value)


def test_silent_server_costs_at_most_its_banner_timeout(trusting_keys: HostKeyStore, sshd: Sshd) -> None:
    """A host that accepts TCP but never speaks SSH (hung sshd) is given up after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        timeouts = Timeouts(connect=2, banner=1, handshake=1, auth=2, channel=2)
        started = time.monotonic()
        with pytest.raises(SshTimeout) as info:
            SshConnection.open(resolve(sshd.spec(port=port)), trusting_keys, timeouts, use_agent=False)
        spent = time.monotonic() - started
    assert spent < timeouts.banner + timeouts.handshake + 1.5
    assert "banner" in str(info.value)


def test_host_without_python3_gives_a_clear_error(sshd: Sshd, pool: SshPool) -> None:
    conn = pool.get(resolve(sshd.spec("nopy", port=sshd.nopython_port)))
    with pytest.raises(NoPython) as info:
        probe(conn)
    assert "nopy" in str(info.value) and "python3" in str(info.value)


def test_helper_unknown_command_and_errors(sshd: Sshd, pool: SshPool) -> None:
    conn = pool.get(resolve(sshd.spec()))
    from sevconsole.hosts.errors import HelperError

    with pytest.raises(HelperError) as info:
        run_helper(conn, "frobnicate")
    assert "exit 127" in str(info.value) and "unknown command" in str(info.value)
    with pytest.raises(HelperError) as info:
        run_helper(conn, "stop", "1")  # pid 1 is not a QEMU: refused
    assert "not a QEMU" in str(info.value)


def test_ssh_agent_keys_are_used(sshd: Sshd, trusting_keys: HostKeyStore, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No identity file at all: the key comes from a real ssh-agent."""
    import select
    import subprocess

    from tests.conftest import require_binary

    agent_bin, add_bin = require_binary("ssh-agent"), require_binary("ssh-add")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen([agent_bin, "-D", "-a", str(sock)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([agent.stdout], [], [], 10)  # it prints its settings once listening
        assert ready and b"SSH_AUTH_SOCK" in agent.stdout.readline()
        env = {"SSH_AUTH_SOCK": str(sock), "PATH": "/usr/bin:/bin"}
        subprocess.run([add_bin, str(sshd.client_key)], env=env, check=True, capture_output=True, timeout=10)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
        endpoint = resolve(sshd.spec(identity=()))
        conn = SshConnection.open(endpoint, trusting_keys, FAST, use_agent=True)
        assert conn.run("true").rc == 0
        conn.close()
        with pytest.raises(SshAuthError) as info:
            SshConnection.open(endpoint, trusting_keys, FAST, use_agent=False)
        assert "no keys at all" in str(info.value)
    finally:
        agent.terminate()
        agent.wait(10)
