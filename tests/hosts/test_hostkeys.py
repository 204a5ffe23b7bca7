"""known_hosts files with bad lines: each one is skipped with a warning naming file and line, the
others still count; discovery on the lab goes on with a broken ~/.ssh/known_hosts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sevconsole.hosts.errors import HostKeyChanged, UnknownHostKey
from sevconsole.hosts.hostkeys import HostKeyStore
from tests.conftest import ROOT

try:
    from sevconsole.lab.control import Lab
except ImportError as exc:  # pragma: no cover - the lab ships with the package
    pytest.skip(f"lab not available ({exc})", allow_module_level=True)

# Lines seen in real files or made by hand: each used to stop discovery or blank the whole file.
BAD_LINES = [
    "|1|abc|def ssh-ed25519 {good}",  # hashed name with a salt that is not base64
    "|1|AAAA|AAAA ssh-ed25519 {good}",  # hashed name of the wrong size (paramiko asserts)
    "badhost ssh-ed25519 !!!not-base64!!!",
    "badhost ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBAAAAA==",  # no point
    "badhost ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB",  # an RSA key without its modulus
    "@revoked * ssh-ed25519 {good}",
    "onlytwo ssh-ed25519",
]


def _key() -> paramiko.PKey:
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(raw))


def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_each_bad_line_is_skipped_with_file_and_line_named(tmp_path: Path) -> None:
    known, other, hashed = _key(), _key(), _key()
    good = known.get_base64()
    lines = ["# a comment", ""] + [b.format(good=good) for b in BAD_LINES]
    lines += [f"[10.0.0.1]:2222 ssh-ed25519 {good}", f"{_hashed('10.0.0.2')} ssh-ed25519 {hashed.get_base64()}"]
    system = tmp_path / "known_hosts"
    system.write_text("\n".join(lines) + "\n")
    store = HostKeyStore(tmp_path / "own", system_files=(system,))
    named = {w.split(": ")[0] for w in store.warnings}
    assert named == {f"{system}:{n}" for n in range(3, 3 + len(BAD_LINES))}, store.warnings
    assert all(w.endswith("line skipped") for w in store.warnings)
    # the good lines after the bad ones still count: known, changed and hashed names all work
    store.check("h", "10.0.0.1", 2222, known)
    with pytest.raises(HostKeyChanged):
        store.check("h", "10.0.0.1", 2222, other)
    store.check("h2", "10.0.0.2", 22, hashed)
    with pytest.raises(UnknownHostKey):
        store.check("h3", "10.0.0.3", 22, known)


def test_binary_and_odd_files_know_nothing_and_say_why(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(bytes(range(256)) * 8)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    store = HostKeyStore(tmp_path / "own", system_files=(binary, fifo, Path("/dev/zero"), tmp_path / "absent"))
    assert any("FIFO" in w for w in store.warnings) and any("device" in w for w in store.warnings)
    assert not any("absent" in w for w in store.warnings)  # a missing file is normal
    with pytest.raises(UnknownHostKey):
        store.check("h", "10.0.0.1", 22, _key())


def test_accepted_keys_append_after_bad_lines_and_are_read_back(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.write_text("garbage\nbroken ssh-ed25519 !!!\n")
    key = _key()
    store = HostKeyStore(own, system_files=(), accept=())
    store.accept("[127.0.0.1]:2200", key.get_name(), key.get_base64())
    again = HostKeyStore(own, system_files=())
    again.check("h", "127.0.0.1", 2200, key)
    assert [w.split(": ")[0] for w in again.warnings] == [f"{own}:1", f"{own}:2"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab.start(tmp_path_factory.mktemp("lab"), hosts=1) as running:
        yield running


def test_discover_goes_on_with_a_broken_known_hosts(lab: Lab, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    broken = home / ".ssh" / "known_hosts"
    broken.write_text("|1|AAAA|AAAA ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGjR1N7Yl5c0Wq8Yf0c0c6m2z1v7m8Z6w9Gx0Q2v0pZk\n")
    env = {**os.environ, "HOME": str(home), "SEVCONSOLE_DATA_DIR": str(tmp_path / "data"),
           "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config"), "SSH_AUTH_SOCK": ""}
    out = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(lab.paths.root)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and f"{broken}:1:" in out.stderr
    assert "lab-1" in out.stdout
