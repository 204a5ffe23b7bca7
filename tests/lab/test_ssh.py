"""The lab hosts' SSH servers: only the lab client key, only the remote helper's commands."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sevconsole.lab import Lab

from .conftest import HELPER, helper, run, ssh_client


def test_unknown_key_is_refused(lab3: Lab, tmp_path) -> None:
    other = tmp_path / "other_key"
    other.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(paramiko.AuthenticationException):
        ssh_client(lab3, "lab-1", key=str(other))


def test_password_and_none_auth_are_refused(lab3: Lab) -> None:
    t = paramiko.Transport(("127.0.0.1", lab3.host("lab-1").port))
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as exc:
            t.auth_password("lab", "lab")
        assert exc.value.allowed_types == ["publickey"]
    finally:
        t.close()


def test_host_key_matches_known_hosts(lab3: Lab) -> None:
    known = paramiko.HostKeys(str(lab3.known_hosts))
    for h in lab3.hosts:
        client = ssh_client(lab3, h.name)  # RejectPolicy: fails unless known_hosts has this exact key
        key = client.get_transport().get_remote_server_key()
        client.close()
        assert key.get_name() == "ssh-ed25519"
        assert known.lookup(f"[127.0.0.1]:{h.port}")["ssh-ed25519"] == key


def test_only_helper_commands_run(lab3: Lab) -> None:
    client = ssh_client(lab3, "lab-1")
    try:
        code, out, err = run(client, "id; cat /etc/passwd", helper=False)
        assert code == 127 and out == b"" and b"only the sevconsole remote helper" in err
        code, out, err = run(client, "rm -rf /tmp/x")
        assert code == 127 and b"unknown command 'rm'" in err
        code, out, err = run(client, "", helper=True)
        assert code == 127 and b"unknown command ''" in err
        with pytest.raises(paramiko.SSHException):
            client.invoke_shell()
    finally:
        client.close()


def test_probe_reports_the_lab_host(lab3: Lab) -> None:
    p1 = helper(lab3, "lab-1", "probe --qmp-glob '/run/*.qmp'")
    assert p1["helper"] == 1 and p1["lab"] is True and p1["hostname"] == "lab-1"
    assert p1["kvm_amd"] == {"sev": "Y", "sev_es": "Y"} and p1["dev_sev"] is True and p1["errors"] == []
    assert (p1["platform_status"]["api_major"], p1["platform_status"]["api_minor"]) == (1, 55)
    assert p1["platform_status"]["state"] == 2  # WORKING: guests run
    assert {v["name"] for v in p1["vms"]} == {"web", "vault", "plain", "legacy"}
    assert p1["memory"] == {"total_mib": 65536, "available_mib": 65536 - 4 * 64}
    web = next(v for v in p1["vms"] if v["name"] == "web")
    assert "sev-guest,id=sev0,policy=0x18000033,cbitpos=51,reduced-phys-bits=1" in web["argv"]
    assert web["qmp"] in web["argv"][web["argv"].index("-qmp") + 1]
    p3 = helper(lab3, "lab-3", "probe")
    assert (p3["platform_status"]["api_major"], p3["platform_status"]["api_minor"]) == (0, 17)
    assert p3["vms"] == [] and p3["platform_status"]["state"] == 1  # INIT: no guest yet
    # Same output conventions as hosts/helper.py: one JSON line with sorted keys.
    client = ssh_client(lab3, "lab-2")
    try:
        code, out, _ = run(client, "probe")
    finally:
        client.close()
    assert code == 0 and out.endswith(b"\n") and out.count(b"\n") == 1
    assert out.decode().strip() == json.dumps(json.loads(out), sort_keys=True)


def test_helper_errors_are_sentences(lab3: Lab) -> None:
    client = ssh_client(lab3, "lab-2")
    try:
        code, out, _ = run(client, "launch-incoming", b"not json")
        assert code == 1 and json.loads(out) == {"error": 'launch-incoming expects {"argv": [...]} on stdin'}
        code, out, _ = run(client, "launch-incoming", json.dumps({"argv": ["qemu-system-x86_64", "-m", "64"]}).encode())
        assert code == 1 and "-name" in json.loads(out)["error"]
        code, out, _ = run(client, "launch-incoming",
                           json.dumps({"argv": ["qemu", "-name", "x", "-m", "lots"]}).encode())
        assert code == 1 and "-m 'lots'" in json.loads(out)["error"]
        code, out, _ = run(client, "stop 99999")
        assert code == 0 and json.loads(out) == {"stopped": False, "reason": "no such process"}
        code, out, _ = run(client, "stop me")
        assert code == 1 and json.loads(out) == {"error": "stop: expected one process id"}
        code, out, _ = run(client, "qmp /etc/passwd")  # not a VM of this host: as the helper says of it
        assert code == 1 and json.loads(out) == {
            "error": "nothing listens on the QMP socket /etc/passwd: its QEMU is not running", "gone": True}
    finally:
        client.close()


def test_qmp_bridge_over_ssh(lab3: Lab) -> None:
    path = lab3.qmp_path("lab-1", "web")
    client = ssh_client(lab3, "lab-1")
    try:
        chan = client.get_transport().open_session()
        chan.settimeout(10)
        chan.exec_command(HELPER + f"qmp {path}")
        f = chan.makefile("rb")
        greeting = json.loads(f.readline())
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        chan.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-name", "id": 7}')
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline()) == {"return": {"name": "web"}, "id": 7}
        chan.shutdown_write()  # the bridge ends when either side closes
        assert chan.recv_exit_status() == 0
    finally:
        client.close()


def test_qmp_bridge_to_a_held_monitor_says_so_within_two_seconds(lab3: Lab) -> None:
    """As the helper does on a real host (hosts/helper.py): no greeting in 2 s means another client
    holds the monitor; the bridge says so and leaves, with the helper's very words."""
    path = lab3.qmp_path("lab-1", "plain")
    holder = socket.socket(socket.AF_UNIX)
    holder.settimeout(10)
    holder.connect(path)
    client = ssh_client(lab3, "lab-1")
    try:
        assert b'"QMP"' in holder.recv(4096)
        started = time.monotonic()
        code, out, _ = run(client, f"qmp {path}")
        assert 1.5 < time.monotonic() - started < 5
        assert code == 1 and json.loads(out) == {
            "error": f"the QMP socket {path} sent no greeting within 2 s: it is held by another client, "
                     "probably libvirt (QEMU serves one QMP client at a time)", "held": True}
    finally:
        client.close()
        holder.close()


def test_launch_incoming_and_stop(lab3: Lab) -> None:
    web = next(v for v in helper(lab3, "lab-1", "probe")["vms"] if v["name"] == "web")
    answer = helper(lab3, "lab-2", "launch-incoming", {"argv": web["argv"]})
    assert set(answer) >= {"pid", "qmp", "log", "argv"} and answer["argv"][-2:] == ["-incoming", "defer"]
    s = socket.socket(socket.AF_UNIX)
    s.connect(answer["qmp"])
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}{"execute":"query-status"}')
    f.flush()
    f.readline()
    assert json.loads(f.readline())["return"]["status"] == "inmigrate"
    listed = [v["name"] for v in helper(lab3, "lab-2", "probe")["vms"]]
    assert listed.count("web") == 1
    assert helper(lab3, "lab-2", f"stop {answer['pid']}") == {"stopped": True}
    assert f.readline() == b""  # its monitor closed
    s.close()
    assert "web" not in [v["name"] for v in helper(lab3, "lab-2", "probe")["vms"]]


def test_many_channels_opened_at_once_on_one_connection_all_run(lab3: Lab) -> None:
    """paramiko holds channels weakly: the server must keep each one until its command ends."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    client = ssh_client(lab3, "lab-2")
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: (gc.collect(), run(client, "probe"))[1], range(16)))
    finally:
        client.close()
    assert [code for code, _, _ in answers] == [0] * 16
    assert {json.loads(out)["hostname"] for _, out, _ in answers} == {"lab-2"}


def _banner(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        assert chunk, f"closed before its banner ({data!r})"
        data += chunk
    return data


def _closed(sock: socket.socket) -> bool:
    """True once the server closes (EOF); socket.timeout escapes when it does not in time."""
    while sock.recv(4096):
        pass
    return True


def test_idle_connections_are_closed_and_capped_while_clients_still_work(tmp_path: Path) -> None:
    from sevconsole.lab.ssh import REAP_INTERVAL_S, LabSshServer
    from sevconsole.lab.state import _ed25519_files

    _ed25519_files(tmp_path / "host_key", "host")
    _ed25519_files(tmp_path / "client_key", "client")
    grace = 2.0
    server = LabSshServer(None, host_key=str(tmp_path / "host_key"), client_pub=str(tmp_path / "client_key.pub"),
                          login_grace_s=grace, max_unauthenticated=4)
    server.start()
    silent: list[socket.socket] = []
    try:
        for _ in range(3):  # connections that never speak
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=grace + 5))
            assert _banner(silent[-1]).startswith(b"SSH-2.0-")
        # meanwhile an operator's client authenticates and runs a command
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect("127.0.0.1", port=server.port, username="lab", key_filename=str(tmp_path / "client_key"),
                       look_for_keys=False, allow_agent=False, timeout=10)
        try:
            code, _, err = run(client, "nosuch")
            assert code == 127 and b"unknown command 'nosuch'" in err
            assert server.unauthenticated == 3  # an authenticated client no longer counts
        finally:
            client.close()
        silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=grace + 5))
        _banner(silent[-1])  # the fourth fills the cap
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert extra.recv(256) == b""  # beyond the cap: closed at once, no banner
        extra.close()
        for sock in silent:  # each is closed within the grace time (recv would time out otherwise)
            sock.settimeout(grace + REAP_INTERVAL_S + 3)
            assert _closed(sock)
        assert server.unauthenticated == 0
        fresh = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert _banner(fresh).startswith(b"SSH-2.0-")  # served again
        fresh.close()
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def test_a_lab_host_closes_connections_beyond_its_cap_at_once(lab3: Lab) -> None:
    from sevconsole.lab.ssh import MAX_UNAUTHENTICATED

    port = lab3.host("lab-3").port
    # Connections of earlier tests the host has not yet seen closed may still count: so open
    # silent ones until the host closes one at once, and check that happens by the cap.
    silent: list[socket.socket] = []
    try:
        for _ in range(MAX_UNAUTHENTICATED + 8):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            first = sock.recv(256)
            if first == b"":
                sock.close()
                break
            assert first.startswith(b"SSH-2.0-"), first
            silent.append(sock)
        else:
            raise AssertionError(f"{len(silent)} silent connections held and none closed at once")
        assert 0 < len(silent) <= MAX_UNAUTHENTICATED, len(silent)
    finally:
        for sock in silent:
            sock.close()
    # the host notices the closed ones and serves clients again
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
            if again.recv(256).startswith(b"SSH-2.0-"):
                break
        assert time.monotonic() < deadline, "the lab host still refuses connections"
        time.sleep(0.05)  # polling interval while the host sees the closed sockets, not a race
    assert helper(lab3, "lab-3", "probe")["hostname"] == "lab-3"
