"""Passphrase-protected identity files: asked for once, remembered for this process, handed to
the runners it starts.

The ssh-agent is tried before any question (hosts/ssh.py authenticates with plain identities,
then the agent's keys, and only then unlocks a protected identity). Who asks is set once per
process: the CLI on a terminal (`tty_asker`), the console with a modal; with no asker (a runner,
a script) a protected identity is a sentence saying to load it into ssh-agent.

A runner is a process of its own with no terminal: `spawn_env()` gives the passphrases this
process learnt to the runner through an inherited pipe (never the environment or a file), and
the runner takes them with `adopt_from_env()`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko

Asker = Callable[[Path], "str | None"]  # the identity file -> its passphrase, None: not given
ENV = "SEVCONSOLE_PASSPHRASE_FD"
MAX_HANDOFF = 64 * 1024

_lock = threading.Lock()
_asker: Asker | None = None
_known: dict[str, str] = {}  # identity path -> a passphrase that opened it


def set_asker(asker: Asker | None) -> None:
    global _asker
    with _lock:
        _asker = asker


def tty_asker(path: Path) -> str | None:
    """Ask on the controlling terminal (the CLI); None when there is none."""
    if not sys.stdin.isatty():
        return None
    try:
        return getpass.getpass(f"passphrase for {path}: ")
    except (EOFError, KeyboardInterrupt, OSError):
        return None


def unlock(path: Path, notes: list[str]) -> paramiko.PKey | None:
    """The key in a passphrase-protected identity file: with a passphrase this process already
    knows, else asked (at most three times); None with a note saying why."""
    with _lock:
        known, asker = _known.get(str(path)), _asker
    if known is not None:
        key = _open(path, known)
        if key is not None:
            return key
    if asker is None:
        notes.append(f"identity {path} is passphrase-protected: load it into ssh-agent (ssh-add {path}), "
                     "or run on a terminal to be asked for its passphrase")
        return None
    for _ in range(3):
        answer = asker(path)
        if answer is None:
            notes.append(f"identity {path} is passphrase-protected and no passphrase was given")
            return None
        key = _open(path, answer)
        if key is not None:
            with _lock:
                _known[str(path)] = answer
            return key
    notes.append(f"identity {path}: the passphrase given three times does not open it")
    return None


def _open(path: Path, passphrase: str) -> paramiko.PKey | None:
    try:
        # paramiko's stubs say str; its key loaders want bytes ("password must be bytes")
        return paramiko.PKey.from_path(str(path), passphrase.encode())  # type: ignore[arg-type]
    except (paramiko.SSHException, ValueError, TypeError, OSError):
        return None  # a wrong passphrase reads as a malformed key in some formats


def spawn_env() -> tuple[dict[str, str], tuple[int, ...]]:
    """For starting a runner: extra environment and the fds to pass (empty when nothing is known).
    The caller closes the returned fd after the child started."""
    with _lock:
        data = json.dumps(_known).encode() if _known else b""
    if not data or len(data) > MAX_HANDOFF:
        return {}, ()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)  # far below the pipe's buffer: never blocks
    finally:
        os.close(write_end)
    return {ENV: str(read_end)}, (read_end,)


def adopt_from_env() -> None:
    """In a runner: take the passphrases its starter handed over, if any."""
    text = os.environ.pop(ENV, None)
    if not text or not text.isdigit():
        return
    fd = int(text)
    try:
        data = os.read(fd, MAX_HANDOFF)
    except OSError:
        return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        handed = json.loads(data)
    except ValueError:
        return
    if isinstance(handed, dict):
        with _lock:
            _known.update({str(k): v for k, v in handed.items() if isinstance(v, str)})
