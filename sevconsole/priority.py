"""Yielding the CPU to the operator's console, on kernels that group processes by session too.

`os.nice` alone is not enough on Linux with autogroup (the default on most distributions):
the scheduler first shares the CPU between sessions, then between the processes of a session
by their nice values. A process that started a session of its own (the lab's hosts, the
runners) is a group of one, and competes with the console's whole session as an equal however
nice it is. Its group's nice (/proc/PID/autogroup) is what makes it yield.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MAX_NICE = 19


def group_nice(pid: int | str = "self") -> int | None:
    """The nice of a process's autogroup; None where the kernel has no autogroup."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()  # "/autogroup-123 nice 5"
    except OSError:
        return None
    words = text.split()
    try:
        return int(words[words.index("nice") + 1])
    except (ValueError, IndexError):
        return None


def set_group_nice(nice: int, pid: int | str = "self") -> bool:
    """Set the autogroup nice of `pid`'s session; False where there is none or it is refused
    (raising it needs no privilege; lowering it does)."""
    nice = max(-20, min(MAX_NICE, nice))
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        return False
    return True


def yield_cpu(nice: int, pid: int = 0) -> None:
    """A process (this one by default, or a child of this user's) at `nice` (only ever lowered),
    and its session's group with it when it leads its own session: call it after setsid."""
    pid = pid or os.getpid()
    with contextlib.suppress(OSError):
        if nice > os.getpriority(os.PRIO_PROCESS, pid):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
    try:
        leads = os.getsid(pid) == pid
    except OSError:  # gone already
        return
    if leads:
        current_group = group_nice(pid)
        if current_group is not None and nice > current_group:
            set_group_nice(nice, pid)
