"""The embedded lab's keeper: runs the built-in lab for as long as something holds a lease on it.

    python -m sevconsole.lab.keeper STATE_DIR

`sevconsole` with no inventory (the console) and every runner migrating on that lab hold a
lease in `STATE_DIR/leases/` (see `sevconsole.leases`). The keeper is detached from any
terminal, so a console's hang-up ends only the console's lease; once no lease is held (after a
first one was seen, or after a start-up grace with none) the keeper stops the lab and exits.

Files in STATE_DIR besides the lab's own (`Lab.start`):
    keeper.lock   exclusively flock'ed by the keeper while it lives: "a keeper runs here" is a
                  lock test, never a pid guess
    keeper.json   present and exclusively flock'ed exactly while the lab is ready for use (pid,
                  hosts, lease holders); a killed keeper's stale copy is unlocked, so never trusted
    keeper.log    the keeper's stdout and stderr
    leases/       one file per holder

Shutdown race: a client takes its lease first, then waits for a locked keeper.json. The keeper
withdraws keeper.json before its last look at the leases, and publishes it again if a lease
appeared meanwhile. So a client that saw keeper.json after taking its lease is always seen by
that last look, and a client that did not waits until this keeper is gone and starts a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sevconsole import leases

LOCK, READY, LOG, LEASES = "keeper.lock", "keeper.json", "keeper.log", "leases"
OWN_FILES = {LOCK, READY, f".{READY}.tmp", LOG, LEASES}
POLL_S = 0.2
GRACE_S = 30.0  # no lease at all this long after the lab is ready: the client that wanted it died
READY_TIMEOUT_S = 120.0  # as Lab.start's own; the first start of a folder also makes its keys
OLD_HOSTS_TIMEOUT_S = 10.0
EXIT_BUSY = 3  # another keeper holds the lock: not an error for the client that started us


class KeeperError(Exception):
    """The keeper's lab is not available; the sentence says why and quotes keeper.log."""


# --- the client side (the console, via cli.py) --------------------------------------------------


def attach(folder: Path, name: str = "console", timeout: float = READY_TIMEOUT_S) -> leases.Lease:
    """A lease on the keeper's lab in `folder`, once the lab is ready; starts a keeper when none
    runs. The lease is taken before anything is looked at (see the module docstring)."""
    _make_private(folder)
    lease = leases.take(folder / LEASES, name)
    try:
        _wait_ready(folder, timeout)
    except BaseException:
        lease.close()
        raise
    return lease


def _make_private(folder: Path) -> None:
    """The lab keeps private keys here: a folder made for it is the user's alone."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)


def _wait_ready(folder: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    ours = False  # the keeper holding the lock is the one we started
    while not leases.held_exclusive(folder / READY):
        if not leases.held_exclusive(folder / LOCK):
            if ours:
                raise KeeperError(f"the lab keeper stopped before its lab was ready; {_log_tail(folder)}")
            ours = _spawn(folder)
            continue
        if time.monotonic() > deadline:
            raise KeeperError(f"the lab keeper's lab was not ready within {timeout:.0f} s; {_log_tail(folder)}")
        time.sleep(POLL_S / 2)  # polling for a condition, with a deadline


def _spawn(folder: Path) -> bool:
    """Starts a keeper; True when it now holds the lock, False when another keeper got it."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])  # importable however we were found
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    with open(folder / LOG, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sevconsole.lab.keeper", str(folder)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)
    try:
        code = proc.wait(timeout=30)  # it forks the real keeper once it holds the lock
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise KeeperError(f"the lab keeper did not start within 30 s; {_log_tail(folder)}") from None
    if code not in (0, EXIT_BUSY):
        raise KeeperError(f"the lab keeper failed to start (exit {code}); {_log_tail(folder)}")
    return code == 0


def _log_tail(folder: Path, lines: int = 5) -> str:
    try:
        tail = (folder / LOG).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        tail = []
    return f"{folder / LOG} ends: " + " / ".join(tail) if tail else f"{folder / LOG} is empty"


# --- the keeper process -------------------------------------------------------------------------


def embedded_layout() -> tuple[Any, ...]:
    """lab-1..3 as `sevconsole lab`, plus lab-4 with a realistic PSP for the guide's last demo."""
    from .layout import default_layout

    hosts = default_layout(4)
    return (*hosts[:3], replace(hosts[3], realistic_psp=True))


@dataclass
class Marker:
    """keeper.json: replaced by rename of a file already locked, so it is never seen unlocked."""

    path: Path
    fd: int | None = field(default=None, repr=False)

    def publish(self, data: dict[str, Any]) -> None:
        temp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(data, indent=2).encode())
        os.rename(temp, self.path)
        self._close()
        self.fd = fd

    def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sevconsole.lab.keeper STATE_DIR", file=sys.stderr)
        return 2
    folder = Path(args[0]).resolve()
    _make_private(folder)
    lock = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"a lab keeper already runs in {folder}", file=sys.stderr)
        return EXIT_BUSY
    _detach(folder)  # the forked child inherits the locked descriptor, so the lock never lapses
    return Keeper(folder).run()


def _detach(folder: Path) -> None:
    """Fork (the starter gets its answer and reaps nobody later), own session, stdio to the log."""
    if os.fork():
        os._exit(0)
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


@dataclass
class Keeper:
    folder: Path
    grace: float = GRACE_S
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> int:
        from .control import Lab

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.log(f"keeper {os.getpid()} starting the lab in {self.folder}")
        self._claim()
        self._forget_old_lab()
        layout = embedded_layout()
        try:
            lab = Lab.start(self.folder, len(layout), layout=layout)
        except Exception as exc:  # the lab's errors carry the sentence; the client quotes this log
            self.log(f"the lab did not start: {exc}")
            return 1
        marker = Marker(self.folder / READY)
        with lab:
            describe = {"pid": os.getpid(), "state_dir": str(self.folder),
                        "hosts": [{"name": h.name, "pid": h.pid, "port": h.port} for h in lab.hosts]}
            self.log("lab ready: " + ", ".join(f"{h.name} pid {h.pid}" for h in lab.hosts))
            self._watch(marker, describe, lab)
            marker.withdraw()
            self.log("stopping the lab")
        self.log("lab stopped; keeper exits")
        return 0

    def _watch(self, marker: Marker, describe: dict[str, Any], lab: Any) -> None:
        """Returns when asked to stop, or when no lease is held (having withdrawn the marker)."""
        ready_at, seen, shown = time.monotonic(), False, None
        dead: set[str] = set()
        while True:  # looks first: the client that started us took its lease before it did
            holders = leases.names(leases.live(self.folder / LEASES))
            seen = seen or bool(holders)
            if not holders and (seen or time.monotonic() - ready_at >= self.grace):
                marker.withdraw()  # stopping: from here a new client waits for us to go
                if not leases.live(self.folder / LEASES):
                    self.log("no lease held" if seen else f"no lease within {self.grace:.0f} s")
                    return
                shown = None  # one arrived just in time: publish again and stay
                continue
            if holders != shown:
                shown = holders
                marker.publish({**describe, "leases": holders})
                self.log("held by: " + (", ".join(holders) or "nobody yet"))
            if self.stop.wait(POLL_S):
                return
            for h in lab.hosts:
                if not h.alive and h.name not in dead:
                    dead.add(h.name)
                    self.log(f"lab host {h.name} exited (code {h.process.returncode}); see {h.log}")

    def _claim(self) -> None:
        """attach() made this folder for the lab, so its first files are ours: mark it as a lab's,
        which Lab.start wants of a folder that is not empty. Anything else in it: Lab.start refuses."""
        from . import state

        if not state.is_lab_dir(self.folder) and {e.name for e in os.scandir(self.folder)} <= OWN_FILES:
            (self.folder / state.MARKER).write_text("The built-in lab's state folder (sevconsole.lab.keeper).\n")

    def _forget_old_lab(self) -> None:
        """A killed keeper leaves lab.json; its hosts stop on their own (their stdin closed).
        Wait for them, then drop lab.json so Lab.start does not mistake a zombie for a host."""
        lab_json = self.folder / "lab.json"
        try:
            pids = [int(h["pid"]) for h in json.loads(lab_json.read_text())["hosts"]]
        except (OSError, ValueError, KeyError, TypeError):
            return
        deadline = time.monotonic() + OLD_HOSTS_TIMEOUT_S
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)  # polling for a condition, with a deadline
        if not any(_running(p) for p in pids):
            lab_json.unlink(missing_ok=True)

    def log(self, message: str) -> None:
        print(time.strftime("%Y-%m-%d %H:%M:%S ") + message, flush=True)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited host whose new parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main())
