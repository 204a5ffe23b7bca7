"""A host that answers the probe with far too much, or with JSON nested thousands deep: one
HelperError naming the host, and the console's memory untouched. The host is a real SSH server
(the lab's, in this process) whose probe answers bytes the test chooses; the client is the console's."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from typing import Any

import pytest

from sevconsole.hosts.errors import HelperError
from sevconsole.hosts.hostkeys import HostKeyStore
from sevconsole.hosts.remote import probe
from sevconsole.hosts.ssh import MAX_OUTPUT, Endpoint, SshConnection, Timeouts

try:
    from sevconsole.lab.ssh import LabSshServer
    from sevconsole.lab.state import _ed25519_files
except ImportError as exc:  # pragma: no cover - the lab ships with the package
    pytest.skip(f"lab not available ({exc})", allow_module_level=True)


class HostileServer(LabSshServer):
    """The lab's SSH server, whose probe answers `answer` with `padding` MiB of "x" at PAD."""

    answer = b""
    padding = 0  # sent a MiB at a time: no 300 MiB object anywhere in this process

    def _probe(self, chan: Any, args: list[str]) -> int:
        head, _, tail = self.answer.partition(b"PAD")
        chan.sendall(head)
        chunk = b"x" * (1024 * 1024)
        for _ in range(self.padding):
            chan.sendall(chunk)
        chan.sendall(tail)
        return 0


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileServer, SshConnection]]:
    folder = tmp_path_factory.mktemp("hostile")
    _ed25519_files(folder / "host_key", "host")
    _ed25519_files(folder / "client_key", "client")
    server = HostileServer(None, host_key=str(folder / "host_key"), client_pub=str(folder / "client_key.pub"))
    server.start()
    kind, data = (folder / "host_key.pub").read_text().split()[:2]
    known = folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {kind} {data}\n")
    endpoint = Endpoint("evil", "127.0.0.1", server.port, "lab", (folder / "client_key",))
    conn = SshConnection.open(endpoint, HostKeyStore(known, system_files=()), Timeouts(), use_agent=False)
    try:
        yield server, conn
    finally:
        conn.close()
        server.stop()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_huge_probe_answer_is_cut_off_with_a_sentence(hostile: tuple[HostileServer, SshConnection]) -> None:
    server, conn = hostile
    server.answer, server.padding = b'{"helper": 1, "vms": [], "pad": "PAD"}\n', 300
    before = _rss_mib()
    with pytest.raises(HelperError) as caught:
        probe(conn)
    server.padding = 0
    assert caught.value.host == "evil" and "evil (lab@127.0.0.1" in str(caught.value)
    assert f"more than {MAX_OUTPUT // (1024 * 1024)} MiB" in str(caught.value)
    # 300 MiB offered; the console read no more than a few times its cap
    assert _rss_mib() - before < 8 * MAX_OUTPUT / (1024 * 1024)
    server.answer = b'{"helper": 1, "vms": []}\n'
    assert probe(conn)["helper"] == 1  # the connection still serves the next command


def test_json_nested_thousands_deep_is_a_helper_error(hostile: tuple[HostileServer, SshConnection]) -> None:
    server, conn = hostile
    server.answer = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    with pytest.raises(HelperError, match="probe failed"):
        probe(conn)
