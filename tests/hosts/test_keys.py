"""Keys as operators have them, against a real sshd: a passphrase-protected identity through the
ssh-agent or a passphrase asked once, and a changed host key shown as refused, never up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sevconsole.hosts import passphrases
from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.errors import SshAuthError
from sevconsole.hosts.hostkeys import HostKeyStore
from sevconsole.hosts.ssh import SshConnection, Timeouts, resolve
from tests.conftest import require_binary
from tests.hosts.conftest import Sshd, write_ed25519

pytestmark = [pytest.mark.needs_sshd]

FAST = Timeouts(connect=3, banner=5, handshake=5, auth=5, channel=10)
SECRET = "correct horse"


@pytest.fixture
def locked_key(sshd: Sshd, tmp_path: Path) -> Iterator[Path]:
    """A passphrase-protected identity the test sshd accepts; the process forgets passphrases after."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "id_locked"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.BestAvailableEncryption(SECRET.encode())))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with open(sshd.dir / "authorized_keys", "a") as handle:  # sshd reads it at each login
        handle.write(public.decode() + "\n")
    yield path
    passphrases.set_asker(None)
    passphrases._known.clear()


def _open(sshd: Sshd, key: Path, keys: HostKeyStore, *, agent: bool = False) -> SshConnection:
    return SshConnection.open(resolve(sshd.spec(identity=(key,))), keys, FAST, use_agent=agent)


def test_a_locked_identity_without_agent_or_terminal_is_a_sentence(sshd: Sshd, locked_key: Path,
                                                                   trusting_keys: HostKeyStore) -> None:
    with pytest.raises(SshAuthError) as info:  # not a TypeError from deep inside paramiko
        _open(sshd, locked_key, trusting_keys)
    assert f"identity {locked_key} is passphrase-protected: load it into ssh-agent" in str(info.value)


def test_a_locked_identity_is_asked_for_once(sshd: Sshd, locked_key: Path, trusting_keys: HostKeyStore) -> None:
    asked: list[Path] = []
    answers = iter(["wrong", SECRET])
    passphrases.set_asker(lambda path: asked.append(path) or next(answers))
    _open(sshd, locked_key, trusting_keys).close()
    assert asked == [locked_key, locked_key]  # a wrong passphrase is asked again
    _open(sshd, locked_key, trusting_keys).close()  # remembered for this process
    assert len(asked) == 2


def test_the_agent_is_used_before_anyone_is_asked(sshd: Sshd, locked_key: Path, trusting_keys: HostKeyStore,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, add = require_binary("ssh-agent"), require_binary("ssh-add")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([agent, "-D", "-a", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None and proc.stdout.readline()  # "SSH_AUTH_SOCK=...": it listens
        askpass = tmp_path / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{SECRET}'\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock), "SSH_ASKPASS": str(askpass),
               "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        out = subprocess.run([add, str(locked_key)], env=env, capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        asked: list[Path] = []
        passphrases.set_asker(lambda path: asked.append(path) or None)
        _open(sshd, locked_key, trusting_keys, agent=True).close()
        assert asked == []
    finally:
        proc.kill()
        proc.wait()


def test_passphrases_reach_a_runner_through_a_pipe_only(locked_key: Path) -> None:
    passphrases._known[str(locked_key)] = SECRET
    env, fds = passphrases.spawn_env()
    assert SECRET not in json.dumps(env)  # the environment names a descriptor, nothing more
    code = ("from sevconsole.hosts import passphrases; passphrases.adopt_from_env(); "
            "import json, os; print(json.dumps([passphrases._known, passphrases.ENV in os.environ]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, pass_fds=fds,
                             capture_output=True, text=True, timeout=30)
    finally:
        for fd in fds:
            os.close(fd)
    assert json.loads(out.stdout) == [{str(locked_key): SECRET}, False], out.stderr


def test_a_changed_host_key_is_refused_not_up(sshd: Sshd, tmp_path: Path) -> None:
    from sevconsole.commands.discover import render_table
    from sevconsole.tui.screens.hosts import row_cells

    other = write_ed25519(tmp_path / "other")
    known = tmp_path / "kh"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    options = DiscoveryOptions(known_hosts=known, system_known_hosts=(), amd_roots=tmp_path / "none",
                               ssh_config=tmp_path / "none", use_agent=False, timeouts=FAST)
    (report,) = discover([sshd.spec("hv-a")], options)
    assert report.host_key is not None and report.host_key.status == "changed"
    assert not report.reachable
    assert "hv-a REFUSED: host key changed" in render_table([report])
    assert str(row_cells(report)[1]) == "refused"
