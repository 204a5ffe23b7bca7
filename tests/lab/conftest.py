"""Fixtures for the lab: real host processes on loopback, reached over real SSH (paramiko) and QMP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from sevconsole.lab import Lab

# Exactly how the console invokes the remote helper (docs/internals.md); the lab ignores BLOB.
HELPER = "python3 -c 'import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))' BLOB "


@pytest.fixture
def lab2(tmp_path: Path) -> Iterator[Lab]:
    """lab-1 and lab-2 of the default lab, fresh for each test."""
    with Lab.start(tmp_path / "lab", hosts=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The default three-host lab, shared by the read-only tests of a module."""
    with Lab.start(tmp_path_factory.mktemp("lab3"), hosts=3) as lab:
        yield lab


def ssh_client(lab: Lab, host: str, key: str | None = None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=lab.host(host).port, username="lab",
                   key_filename=key or str(lab.client_key), look_for_keys=False, allow_agent=False, timeout=10)
    return client


def run(client: paramiko.SSHClient, command: str, stdin: bytes | None = None,
        helper: bool = True) -> tuple[int, bytes, bytes]:
    chan = client.get_transport().open_session()
    chan.settimeout(30)
    chan.exec_command((HELPER if helper else "") + command)
    if stdin is not None:
        chan.sendall(stdin)
    chan.shutdown_write()
    out, err = bytearray(), bytearray()
    while True:
        data = chan.recv(65536)
        if not data:
            break
        out += data
    while True:
        data = chan.recv_stderr(65536)
        if not data:
            break
        err += data
    return chan.recv_exit_status(), bytes(out), bytes(err)


def helper(lab: Lab, host: str, command: str, stdin: dict | None = None) -> dict:
    """Runs a helper command on a lab host and returns its JSON answer (exit 0 expected)."""
    client = ssh_client(lab, host)
    try:
        code, out, err = run(client, command, None if stdin is None else json.dumps(stdin).encode())
    finally:
        client.close()
    assert code == 0, (code, out, err)
    return json.loads(out)
