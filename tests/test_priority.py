"""Yielding the CPU: a process in a session of its own yields as a group too (autogroup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sevconsole import priority

CHILD = """
import json, os
os.setsid()
from sevconsole.priority import group_nice, yield_cpu
before = group_nice()
yield_cpu({nice})
print(json.dumps({{"nice": os.getpriority(os.PRIO_PROCESS, 0), "group": group_nice(), "before": before}}))
"""


def run_child(nice: int) -> dict[str, int | None]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(nice=nice)], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_a_session_leader_yields_as_a_process_and_as_a_group() -> None:
    start = os.getpriority(os.PRIO_PROCESS, 0)
    got = run_child(start + 6)
    assert got["nice"] == start + 6
    if got["before"] is None:
        pytest.skip("this kernel has no autogroup (/proc/self/autogroup): only the process nice applies")
    assert got["group"] == max(start + 6, got["before"])


def test_yield_never_raises_priority() -> None:
    start = os.getpriority(os.PRIO_PROCESS, 0)
    got = run_child(start - 1 if start > -20 else start)
    assert got["nice"] == start


def test_a_process_that_does_not_lead_its_session_leaves_the_group_alone() -> None:
    before = priority.group_nice()
    if before is None:
        pytest.skip("this kernel has no autogroup")
    code = ("from sevconsole.priority import yield_cpu, group_nice; yield_cpu(15); print(group_nice())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert int(out.stdout) == before  # the console's own session is not lowered by a child


def test_group_nice_of_a_missing_process_is_none() -> None:
    assert priority.group_nice(2**22 + 12345) is None
    assert priority.set_group_nice(5, 2**22 + 12345) is False


def test_a_parent_lowers_a_child_that_leads_its_own_session() -> None:
    """How `spawn` puts a runner behind the console from its first import on."""
    start = os.getpriority(os.PRIO_PROCESS, 0)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             start_new_session=True)
    try:
        before = priority.group_nice(child.pid)
        priority.yield_cpu(start + 5, child.pid)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == start + 5
        if before is not None:
            assert priority.group_nice(child.pid) == max(before, start + 5)
        assert os.getpriority(os.PRIO_PROCESS, 0) == start  # this process is left as it was
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
