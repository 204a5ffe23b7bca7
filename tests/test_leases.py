"""sevconsole.leases: held-for-life flock files, with real processes as holders."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sevconsole import leases

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *args: str, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # polling for a condition, with a deadline


def test_take_live_close(tmp_path: Path) -> None:
    folder = tmp_path / "leases"
    with leases.take(folder, "console") as lease:
        assert lease.path.parent == folder and lease.path.name.startswith(f"console-{os.getpid()}-")
        assert leases.live(folder) == [lease.path]  # our own shared lock counts as held
        assert leases.names(leases.live(folder)) == ["console"]
        assert [p.name for p in folder.iterdir()] == [lease.path.name]  # no temp file left
    assert not lease.path.exists()
    assert leases.live(folder) == []
    lease.close()  # idempotent


def test_names_with_dashes_and_bad_names(tmp_path: Path) -> None:
    with leases.take(tmp_path, "evacuate-rack-3") as lease:
        assert leases.names([lease.path]) == ["evacuate-rack-3"]
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            leases.take(tmp_path, bad)


def test_live_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert leases.live(tmp_path / "nowhere") == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_a_killed_holders_lease_is_removed(tmp_path: Path, sig: int) -> None:
    holder = python("import sys; from pathlib import Path; from sevconsole import leases\n"
                    "lease = leases.take(Path(sys.argv[1]), 'console'); print(lease.path, flush=True)\n"
                    "sys.stdin.read()", str(tmp_path))
    try:
        path = Path(holder.stdout.readline().strip())
        assert leases.live(tmp_path) == [path]
        os.kill(holder.pid, sig)
        holder.wait(timeout=10)
        assert path.exists()  # nobody cleaned up...
        assert leases.live(tmp_path) == [] and not path.exists()  # ...until a watcher looked
    finally:
        holder.kill()
        holder.wait()


def test_a_child_with_the_inherited_descriptor_keeps_the_lease(tmp_path: Path) -> None:
    """The parent takes a lease, hands it to a child (pass_fds), detaches and is killed."""
    parent = python(
        "import subprocess, sys; from pathlib import Path; from sevconsole import leases\n"
        "lease = leases.take(Path(sys.argv[1]), 'runner')\n"
        "child = subprocess.Popen([sys.executable, '-c', sys.argv[2], str(lease.fd)], pass_fds=[lease.fd])\n"
        "lease.detach(); print(lease.path, flush=True); sys.stdin.read()",
        str(tmp_path),
        "import sys; from sevconsole import leases\n"
        "lease = leases.adopt(int(sys.argv[1])); print('adopted', lease.path, flush=True)\n"
        "sys.stdin.read(); lease.close()")
    try:
        lines = sorted(parent.stdout.readline().strip() for _ in range(2))
        adopted, path = lines[1].split(" ", 1)[1], Path(lines[0])  # "/..." sorts before "adopted"
        assert adopted == str(path)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert leases.live(tmp_path) == [path]  # the child's descriptor still holds the lock
        parent.stdin.close()  # the child shares this stdin: EOF makes it close its lease
        wait_until(lambda: not path.exists(), 10, "the child never closed its adopted lease")
        assert leases.live(tmp_path) == []
    finally:
        parent.kill()
        parent.wait()


def test_adopt_refuses_a_descriptor_that_is_not_the_lease(tmp_path: Path) -> None:
    lease = leases.take(tmp_path, "runner")
    other = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="is not the lease"):
            leases.adopt(other, lease.path)
        copy = leases.adopt(os.dup(lease.fd))  # the path is found from the descriptor
        assert copy.path == lease.path
        copy.detach()
        assert leases.live(tmp_path) == [lease.path]  # detach leaves the lease in place
    finally:
        os.close(other)
        lease.close()


def test_a_watcher_never_sees_a_fresh_lease_unlocked(tmp_path: Path) -> None:
    """A watcher removes every unlocked lease it finds; leases taken meanwhile must survive."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            leases.live(tmp_path)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            lease = leases.take(tmp_path, "console")
            assert lease.path.exists() and lease.path in leases.live(tmp_path)
            lease.close()
    finally:
        stop.set()
        watcher.join()


def test_stale_temp_files_go_fresh_ones_stay(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".console-1-aa.tmp", tmp_path / ".console-2-bb.tmp"
    stale.write_text("{}")
    fresh.write_text("{}")
    old = time.time() - 2 * leases.STALE_TEMP_S
    os.utime(stale, (old, old))
    assert leases.live(tmp_path) == []
    assert not stale.exists() and fresh.exists()


def test_held_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "keeper.lock"
    assert not leases.held_exclusive(path)  # missing
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert not leases.held_exclusive(path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert not leases.held_exclusive(path)  # a shared holder is not "the keeper"
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert leases.held_exclusive(path)
    finally:
        os.close(fd)
    assert not leases.held_exclusive(path)


def test_take_if_kept(tmp_path: Path) -> None:
    assert leases.take_if_kept(tmp_path, "runner") is None  # a lab run by hand: no leases/
    (tmp_path / "leases").mkdir()
    lease = leases.take_if_kept(tmp_path, "runner")
    assert lease is not None and leases.names(leases.live(tmp_path / "leases")) == ["runner"]
    lease.close()
