"""Leases: "I still need this" as a file with a shared flock, held for as long as the holder lives.

A lease is the file `FOLDER/<name>-<pid>-<rand>`, open and `flock(LOCK_SH)`-locked by its holder.
The kernel drops the lock when the last descriptor of that open file goes away, so a holder
killed by any signal ends its lease with no clean-up of its own: a watcher calling `live()`
can take the lock of such a file and removes it. Nothing here guesses from pids.

    with leases.take(lab_dir / "leases", "runner"):
        ...  # the lab keeper keeps the lab running meanwhile

Handing a lease to a child process: flock locks belong to the open file description, which a
child shares when it inherits the descriptor (`subprocess.Popen(..., pass_fds=(lease.fd,))`).
The child calls `adopt(fd)` and owns the lease from then on; the parent calls `detach()` (or
simply exits or dies). The parent must not `close()`: that unlinks the file, which ends the
lease for every holder. A process forked without exec inherits every descriptor too, so it
also keeps the lease alive until it exits.

Stdlib only: every layer may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

TEMP_PREFIX = "."  # leases being created; never counted, removed when stale
STALE_TEMP_S = 60.0  # a temp file this old and unlocked was left by a holder that died mid-take


@dataclass
class Lease:
    fd: int
    path: Path
    _open: bool = field(default=True, repr=False)

    def close(self) -> None:
        """Ends the lease (for every holder of the descriptor): unlink first, so a watcher never
        finds the file unlocked while it is still ours, then close."""
        if not self._open:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.detach()

    def detach(self) -> None:
        """Closes this process's descriptor only: a child that inherited it keeps the lease."""
        if self._open:
            self._open = False
            os.close(self.fd)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def take(folder: Path, name: str) -> Lease:
    """Creates and locks `folder/<name>-<pid>-<rand>`. The file is locked under a temporary
    name, then renamed into place, so no watcher ever sees a fresh lease unlocked."""
    if not name or "/" in name or name.startswith(TEMP_PREFIX):
        raise ValueError(f"a lease name must be a plain file name, not {name!r}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = folder / f"{name}-{os.getpid()}-{secrets.token_hex(4)}"
    temp = folder / f"{TEMP_PREFIX}{final.name}.tmp"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, json.dumps({"name": name, "pid": os.getpid(), "since": time.time()}).encode())
        os.rename(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        os.close(fd)
        raise
    return Lease(fd, final)


def adopt(fd: int, path: str | os.PathLike[str] | None = None) -> Lease:
    """The lease behind an inherited descriptor (see the module docstring). Without `path`, the
    file is found from the descriptor; either way it must still be the file in place."""
    if path is None:
        path = os.readlink(f"/proc/self/fd/{fd}")
    lease_path = Path(path)
    st = os.fstat(fd)
    try:
        same = os.stat(lease_path).st_ino == st.st_ino
    except FileNotFoundError:
        same = False
    if not same:
        raise ValueError(f"descriptor {fd} is not the lease {lease_path} (was the lease closed?)")
    os.set_inheritable(fd, False)  # ours now; a further hand-off passes it explicitly again
    return Lease(fd, lease_path)


def held_exclusive(path: Path) -> bool:
    """True when a process holds an exclusive flock on `path` (a keeper's "I am alive" file);
    False when it is missing or nobody does. Probes with a shared lock, so two probes never
    mistake each other for the holder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live(folder: Path) -> list[Path]:
    """The held leases in `folder`, sorted; removes the ones whose holder is gone."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    alive = []
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(TEMP_PREFIX):
            _drop_stale_temp(path)
        elif _locked_else_remove(path):
            alive.append(path)
    return sorted(alive)


def names(leases: list[Path]) -> list[str]:
    """The holder names of lease paths (`runner-123-ab12cd34` -> `runner`)."""
    return [p.name.rsplit("-", 2)[0] for p in leases]


def take_if_kept(lab_dir: Path, name: str) -> Lease | None:
    """A lease on a lab run by a keeper (its state folder has `leases/`); None for a lab run
    by hand (`sevconsole lab`), which lives as long as its terminal says."""
    folder = Path(lab_dir) / "leases"
    return take(folder, name) if folder.is_dir() else None


def _locked_else_remove(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    # Nobody holds it, and nobody can take it again (a lease is locked before it gets this name).
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)
    return False


def _drop_stale_temp(path: Path) -> None:
    """A temp file is unlocked for an instant after it is created: only old ones are debris."""
    try:
        if time.time() - path.stat().st_mtime < STALE_TEMP_S:
            return
    except FileNotFoundError:
        return
    _locked_else_remove(path)
