"""Starting and stopping a lab: processes, state folder, inventory, known_hosts, the lab root, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sevconsole.lab import Lab
from sevconsole.lab.host import LAB_NICE
from sevconsole.lab.layout import DB_POLICY, WEB_POLICY, default_layout
from sevconsole.priority import group_nice
from sevconsole.sev.certs import AmdCert, is_lab_key_id
from sevconsole.sev.policy import GuestPolicy

from .conftest import helper
from .migration_helpers import connect, wait_disconnected, wait_status

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_start_writes_state_and_stop_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lab = Lab.start(state, hosts=4)
    try:
        inv = tomllib.loads(lab.inventory.read_text())
        names = [h["name"] for h in inv["host"]]
        assert names == ["lab-1", "lab-2", "lab-3", "lab-4"]
        for entry, h in zip(inv["host"], lab.hosts, strict=True):
            assert entry["address"] == "127.0.0.1" and entry["port"] == h.port and entry["lab"] is True
            assert Path(entry["identity"]) == lab.client_key and entry["user"]
            assert any(Path(p).match(entry["qmp_sockets"][0]) for p in h.qmp.values()) or not h.qmp
        lines = lab.known_hosts.read_text().splitlines()
        assert [ln.split()[0] for ln in lines] == [f"[127.0.0.1]:{h.port}" for h in lab.hosts]
        assert all(ln.split()[1] == "ssh-ed25519" for ln in lines)
        assert oct(lab.client_key.stat().st_mode & 0o777) == "0o600"
        ark = AmdCert.from_bytes(lab.lab_ark.read_bytes(), "lab ark")
        assert is_lab_key_id(ark.key_id)
        assert {v for v in lab.host("lab-4").qmp} == {"db-4"}
        pids = [h.pid for h in lab.hosts]
        # each host stands for another machine: it yields the CPU, as a process and as a session
        assert all(os.getpriority(os.PRIO_PROCESS, pid) >= LAB_NICE for pid in pids)
        groups = [group_nice(pid) for pid in pids]
        assert all(g is None or g >= LAB_NICE for g in groups), groups
        sockets = [p for h in lab.hosts for p in h.qmp.values()]
        assert all(Path(p).is_socket() for p in sockets)
        assert json.loads((state / "lab.json").read_text())["hosts"][0]["name"] == "lab-1"
    finally:
        lab.stop()
    assert all(gone(pid) for pid in pids)
    assert not any(Path(p).exists() for p in sockets)
    assert not (state / "lab.json").exists()
    # The lab root is made once per state folder: a second start keeps it.
    before = lab.lab_ark.read_bytes()
    with Lab.start(state, hosts=1) as again:
        assert again.lab_ark.read_bytes() == before


def test_default_layout_names_and_policies() -> None:
    hosts = {h.name: h for h in default_layout(3)}
    assert [v.name for v in hosts["lab-1"].vms] == ["web", "vault", "plain", "legacy"]
    assert [v.name for v in hosts["lab-2"].vms] == ["db"] and hosts["lab-3"].vms == ()
    web = GuestPolicy.from_u32(WEB_POLICY)
    assert web.flag_names() == "NODBG|NOKS|DOMAIN|SEV" and (web.api_major, web.api_minor) == (0, 24)
    assert hosts["lab-1"].api >= (web.api_major, web.api_minor) and hosts["lab-2"].api >= (0, 24)
    assert hosts["lab-3"].api < (web.api_major, web.api_minor)
    assert hosts["lab-1"].oca_domain == hosts["lab-2"].oca_domain != hosts["lab-3"].oca_domain
    assert "NOSEND" in GuestPolicy.from_u32(hosts["lab-1"].vms[1].policy).flag_names()
    assert not hosts["lab-1"].vms[2].sev
    legacy = hosts["lab-1"].vms[3]  # an SEV guest that never enabled migration itself
    assert legacy.sev and not legacy.migration_ready and legacy.policy == DB_POLICY
    assert all(v.migration_ready for h in hosts.values() for v in h.vms if v.name != "legacy")
    assert len(default_layout(2, vms_per_host=3)[1].vms) == 3
    with pytest.raises(ValueError, match="--hosts"):
        default_layout(0)


def test_lab_hosts_stop_when_the_lab_process_dies(tmp_path: Path) -> None:
    """A lab whose parent is killed outright leaves no host running: they watch their stdin."""
    code = (
        "import sys, json; from sevconsole.lab import Lab\n"
        f"lab = Lab.start({str(tmp_path / 's')!r}, hosts=2)\n"
        "print(json.dumps([h.pid for h in lab.hosts]), flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    pids = json.loads(proc.stdout.readline())
    proc.kill()
    proc.wait()
    for pid in pids:  # each host sees EOF on stdin and exits; wait for that, bounded
        for _ in range(200):
            if gone(pid):
                break
            signal.sigtimedwait([], 0.05)  # not our child: its exit can only be polled
        assert gone(pid), f"lab host {pid} outlived its lab"


@pytest.mark.slow
def test_cli_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "cli"
    proc = subprocess.Popen([sys.executable, "-m", "sevconsole", "lab", "--hosts", "2", "--state-dir", str(state),
                             "--mem", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "Ctrl-C stops the lab" in line:
            break
    text = "".join(out)
    assert "lab-1" in text and "lab-2" in text and "inventory:" in text and "LAB root" in text
    pids = [h["pid"] for h in json.loads((state / "lab.json").read_text())["hosts"]]
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "lab stopped." in rest
    assert all(gone(pid) for pid in pids)
    assert not list(state.glob("run/**/*.qmp"))


def test_cli_refuses_bad_numbers(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sevconsole", "lab", "--hosts", "0", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "--hosts" in r.stderr


def _lab_cli(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sevconsole", "lab", "--hosts", "1", "--state-dir", str(state)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_refuses_a_folder_that_is_not_a_lab(tmp_path: Path) -> None:
    ssh = tmp_path / ".ssh"  # what --state-dir ~/.ssh would have overwritten
    ssh.mkdir(mode=0o700)
    (ssh / "known_hosts").write_text("github.com ssh-ed25519 AAAA\n")
    r = _lab_cli(ssh)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(r.stderr.splitlines()) == 1 and "not empty and is not a lab's" in r.stderr
    assert sorted(p.name for p in ssh.iterdir()) == ["known_hosts"]
    assert (ssh / "known_hosts").read_text() == "github.com ssh-ed25519 AAAA\n"


def test_cli_refuses_a_folder_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = _lab_cli(shared)
    assert r.returncode == 2 and "writable by group or others" in r.stderr and "chmod go-w" in r.stderr
    assert list(shared.iterdir()) == []


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_cli_refuses_someone_elses_folder(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    r = _lab_cli(theirs)
    assert r.returncode == 2 and "belongs to uid 65534" in r.stderr
    assert list(theirs.iterdir()) == []


def test_state_folder_rules(tmp_path: Path) -> None:
    from sevconsole.lab.state import MARKER, StateDirError, check_state_dir, prepare

    check_state_dir(tmp_path / "new")  # missing: made 0700 by prepare
    paths = prepare(tmp_path / "new" / "deeper", ["lab-1"], {"a"})
    assert paths.root.stat().st_mode & 0o777 == 0o700 and (paths.root / MARKER).is_file()
    check_state_dir(paths.root)  # a lab's folder is reused
    (paths.root / MARKER).unlink()  # a lab made before the marker existed is still a lab
    prepare(paths.root, ["lab-1"], {"a"})
    assert (paths.root / MARKER).is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StateDirError, match="not a folder"):
        check_state_dir(afile)


async def _incoming(lab: Lab):
    web = next(v for v in helper(lab, "lab-1", "probe")["vms"] if v["name"] == "web")
    answer = helper(lab, "lab-2", "launch-incoming", {"argv": web["argv"]})
    client = await connect(answer["qmp"])
    from qemu.qmp import EventListener

    events = EventListener(("MIGRATION",))
    client.register_listener(events)
    await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await client.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = int((await client.execute("query-migrate"))["socket-address"][0]["port"])
    return client, events, port


@pytest.mark.parametrize("payload", ids=["http", "short-hello", "huge-frame", "empty-hello"], argvalues=[
    b"GET / HTTP/1.0\r\n\r\n" * 100,  # not a lab stream at all
    b"SEVLAB\x00\x01" + b"\x01\x00\x00\x00\x05{\"vm\"",  # a HELLO cut short
    b"SEVLAB\x00\x01" + b"\x01\xff\xff\xff\xff",  # a frame claiming 4 GiB
    b"SEVLAB\x00\x01" + b"\x01\x00\x00\x00\x02{}",  # HELLO without its fields
])
async def test_garbage_to_the_listener_fails_that_migration_only(lab2: Lab, payload: bytes) -> None:
    client, events, port = await _incoming(lab2)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(65536)  # the target says why, then closes
        assert reply[:1] == b"\x83" and len(reply) > 5  # an ERROR frame with a sentence
        status, _ = await wait_status(events, ("failed",))
        assert status == "failed"
        await wait_disconnected(client)
    finally:
        with contextlib.suppress(EOFError, OSError):  # the monitor is gone: disconnect reports why
            await client.disconnect()
    # The host keeps serving: SSH, the other VMs' monitors, and a new incoming migration.
    db = await connect(lab2.qmp_path("lab-2", "db"))
    assert (await db.execute("query-status"))["status"] == "running"
    await db.disconnect()
    again, _, _ = await _incoming(lab2)
    assert (await again.execute("query-status"))["status"] == "inmigrate"
    await again.disconnect()


def test_a_second_lab_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    from sevconsole.lab import LabError

    with Lab.start(tmp_path / "s", hosts=1), pytest.raises(LabError, match="already running"):
        Lab.start(tmp_path / "s", hosts=1)
    with Lab.start(tmp_path / "s", hosts=1) as again:  # once stopped, the folder is free again
        assert again.host("lab-1").alive
