"""The embedded lab's keeper: the lab lives exactly as long as a lease is held on it.

Real processes throughout: the keeper (started by the console's own helper, cli._embedded_lab),
its lab hosts, consoles as child processes killed by signals, runners holding inherited leases.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sevconsole import leases
from sevconsole.cli import _embedded_lab
from sevconsole.lab import keeper

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 3.0  # the keeper looks every 0.2 s and a lab stops in about 0.2 s; room for load

# A console as far as the lab is concerned: the real helper, held until stdin closes.
CONSOLE = """
import sys
from sevconsole.cli import _embedded_lab
with _embedded_lab() as folder:
    print(folder, flush=True)
    sys.stdin.read()
"""

# A runner's spawner: takes a lease, hands it to a child (pass_fds), then waits to be killed.
# The child shares this process's stdin and closes its lease at EOF.
SPAWNER = """
import subprocess, sys
from pathlib import Path
from sevconsole import leases
lease = leases.take(Path(sys.argv[1]) / "leases", "runner")
child = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(lease.fd)], pass_fds=[lease.fd])
print("spawned", child.pid, flush=True)
sys.stdin.read()
"""
RUNNER = """
import sys
from sevconsole import leases
lease = leases.adopt(int(sys.argv[1]))
print("adopted", lease.path, flush=True)
sys.stdin.read()
lease.close()
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The embedded lab's folder under a private SEVCONSOLE_STATE_DIR; no keeper outlives a test."""
    monkeypatch.setenv("SEVCONSOLE_STATE_DIR", str(tmp_path / "state"))
    folder = tmp_path / "state" / "lab"
    yield folder
    info = _info_or_none(folder)
    if info is not None and leases.held_exclusive(folder / keeper.LOCK):
        os.kill(info["pid"], signal.SIGTERM)


def _info_or_none(folder: Path) -> dict | None:
    try:
        return json.loads((folder / keeper.READY).read_text())
    except (OSError, ValueError):
        return None


def info(folder: Path) -> dict:
    found = _info_or_none(folder)
    assert found is not None, f"no keeper.json in {folder}"
    return found


def lab_pids(folder: Path) -> list[int]:
    described = info(folder)
    return [described["pid"], *(h["pid"] for h in described["hosts"])]


def wait_until(condition, timeout: float, what) -> float:  # type: ignore[no-untyped-def]
    """Polls `condition` until true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, what() if callable(what) else what
        time.sleep(0.05)  # polling for a condition, with a deadline
    return time.monotonic() - start


def assert_stops(folder: Path, pids: list[int]) -> float:
    took = wait_until(lambda: not any(keeper._running(p) for p in pids), STOP_WITHIN_S,
                      lambda: f"still running: {[p for p in pids if keeper._running(p)]}; "
                              f"{keeper._log_tail(folder)}")
    assert not leases.held_exclusive(folder / keeper.LOCK)
    assert not (folder / keeper.READY).exists() and not (folder / "lab.json").exists()
    assert leases.live(folder / keeper.LEASES) == []
    return took


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the process printed nothing in time"
    line = proc.stdout.readline()
    assert line, f"the process exited (code {proc.wait()}) before printing its line"
    return line.strip()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_console_starts_the_lab_and_its_release_stops_it(state: Path) -> None:
    with _embedded_lab() as folder:
        assert folder == state and stat.S_IMODE(folder.stat().st_mode) == 0o700  # holds private keys
        assert info(folder)["leases"] == ["console"]
        pids = lab_pids(folder)
        found = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(folder),
                                "--json", "--no-vms"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert found.returncode == 0, found.stderr
        hosts = json.loads(found.stdout)
        assert [h["name"] for h in hosts] == ["lab-1", "lab-2", "lab-3", "lab-4"]
        assert all(h["reachable"] for h in hosts)
        assert all(keeper._running(p) for p in pids)
    assert assert_stops(folder, pids) < STOP_WITHIN_S


def test_an_inherited_lease_keeps_the_lab_after_its_spawner_is_killed(state: Path) -> None:
    with _embedded_lab() as folder:
        spawner = python(SPAWNER, str(folder), RUNNER)
        try:
            lines = dict(read_line(spawner).split(" ", 1) for _ in range(2))
            runner_pid, lease_path = int(lines["spawned"]), Path(lines["adopted"])
            pids = lab_pids(folder)
            os.kill(spawner.pid, signal.SIGKILL)
            spawner.wait(timeout=10)
        except BaseException:
            stop(spawner)
            raise
    try:
        # The console's lease is gone and the keeper has seen it: only the runner's remains.
        wait_until(lambda: (_info_or_none(folder) or {}).get("leases") == ["runner"], 10,
                   lambda: f"keeper.json: {_info_or_none(folder)}; {keeper._log_tail(folder)}")
        assert leases.live(folder / keeper.LEASES) == [lease_path]
        assert all(keeper._running(p) for p in pids) and keeper._running(runner_pid)
        spawner.stdin.close()  # the runner shares this pipe: at EOF it ends its lease and exits
        assert_stops(folder, pids)
        wait_until(lambda: not keeper._running(runner_pid), 10, "the runner did not exit")
    finally:
        if keeper._running(runner_pid):
            os.kill(runner_pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_a_console_killed_by_a_signal_lets_the_lab_stop(state: Path, sig: int) -> None:
    console = python(CONSOLE)
    try:
        folder = Path(read_line(console))
        assert folder == state and info(folder)["leases"] == ["console"]
        pids = lab_pids(folder)
        os.kill(console.pid, sig)
        assert console.wait(timeout=10) == -sig
    finally:
        stop(console)
    assert_stops(folder, pids)


def test_a_reopened_console_shares_the_running_lab(state: Path) -> None:
    first = python(CONSOLE)
    try:
        folder = Path(read_line(first))
        pids = lab_pids(folder)
        with _embedded_lab() as again:
            assert again == folder and lab_pids(folder) == pids
            wait_until(lambda: (_info_or_none(folder) or {}).get("leases") == ["console", "console"], 10,
                       lambda: f"keeper.json: {_info_or_none(folder)}")
            # a second keeper started by hand finds the first and leaves
            busy = subprocess.run([sys.executable, "-m", "sevconsole.lab.keeper", str(folder)],
                                  capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert busy.returncode == keeper.EXIT_BUSY and "already runs" in busy.stderr
            os.kill(first.pid, signal.SIGKILL)  # the first console goes; the lab stays for us
            first.wait(timeout=10)
            wait_until(lambda: (_info_or_none(folder) or {}).get("leases") == ["console"], 10,
                       lambda: f"keeper.json: {_info_or_none(folder)}")
            assert lab_pids(folder) == pids and all(keeper._running(p) for p in pids)
        assert_stops(folder, pids)
    finally:
        stop(first)
    # Opened again after it stopped: a new keeper and lab in the same folder.
    with _embedded_lab() as folder:
        assert set(lab_pids(folder)).isdisjoint(pids)
        assert info(folder)["leases"] == ["console"]
    log = (folder / keeper.LOG).read_text()
    assert log.count("starting the lab") == 2, log


def test_a_lab_that_cannot_start_is_a_sentence_with_the_log(state: Path) -> None:
    state.mkdir(parents=True, mode=0o700)
    (state / "notes.txt").write_text("not the lab's")  # Lab.start refuses a folder that is not a lab's
    with pytest.raises(keeper.KeeperError) as failed, _embedded_lab():
        pass
    message = str(failed.value)
    assert "stopped before its lab was ready" in message and "the lab did not start" in message
    assert leases.live(state / keeper.LEASES) == []  # the console's lease went with it
    assert not leases.held_exclusive(state / keeper.LOCK)


def test_a_lease_taken_while_the_keeper_withdraws_keeps_the_lab(tmp_path: Path) -> None:
    """The shutdown race, forced: a client's lease lands right after the keeper withdrew
    keeper.json. The keeper's last look sees it, publishes again and stays; it stops only
    once that lease ends. (The keeper's watch loop alone, on a lab with no hosts.)"""
    late: list[leases.Lease] = []

    class LateMarker(keeper.Marker):
        def withdraw(self) -> None:
            super().withdraw()
            if not late:
                late.append(leases.take(tmp_path / keeper.LEASES, "console"))

    marker = LateMarker(tmp_path / keeper.READY)
    watch = threading.Thread(target=keeper.Keeper(tmp_path, grace=0.0)._watch,
                             args=(marker, {"pid": os.getpid()}, SimpleNamespace(hosts=[])))
    watch.start()
    try:
        wait_until(lambda: (_info_or_none(tmp_path) or {}).get("leases") == ["console"], 10,
                   "the keeper did not publish keeper.json again for the late lease")
        assert late and leases.held_exclusive(tmp_path / keeper.READY) and watch.is_alive()
    finally:
        for lease in late:
            lease.close()
    watch.join(timeout=5)
    assert not watch.is_alive() and not (tmp_path / keeper.READY).exists()


def test_with_no_lease_at_all_the_keeper_stops_after_its_grace(tmp_path: Path) -> None:
    k = keeper.Keeper(tmp_path, grace=0.3)
    start = time.monotonic()
    k._watch(keeper.Marker(tmp_path / keeper.READY), {"pid": os.getpid()}, SimpleNamespace(hosts=[]))
    assert 0.3 <= time.monotonic() - start < 3
    assert not (tmp_path / keeper.READY).exists()


def test_after_a_killed_keeper_a_console_starts_a_new_lab(state: Path) -> None:
    """A SIGKILLed keeper leaves keeper.json and lab.json behind, unlocked: never trusted."""
    with _embedded_lab() as folder:
        old = lab_pids(folder)
        os.kill(old[0], signal.SIGKILL)
        wait_until(lambda: not leases.held_exclusive(folder / keeper.LOCK), 10, "the keeper lives on")
        assert (folder / keeper.READY).exists() and (folder / "lab.json").exists()
        with _embedded_lab() as again:
            new = lab_pids(again)
            assert set(new).isdisjoint(old) and all(keeper._running(p) for p in new)
            assert not any(keeper._running(p) for p in old[1:])  # its hosts saw their stdin close
            wait_until(lambda: (_info_or_none(folder) or {}).get("leases") == ["console", "console"], 10,
                       lambda: f"keeper.json: {_info_or_none(folder)}")  # the first lease counts too
    assert_stops(folder, new)
