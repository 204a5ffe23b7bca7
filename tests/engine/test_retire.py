"""Retiring the source after a confirmed migration: the journal's source-retired step is forward
only, and a stale copy is never chosen as a source."""

from __future__ import annotations

from sevconsole.engine.machine import GONE, Action, EndState, Facts, Observation, Step, decide
from sevconsole.hosts.fleet import pick_vm
from sevconsole.hosts.report import HostReport, VmInfo

PLAIN = Facts(sev=False)
POSTMIGRATE = EndState(reachable=True, run_state="postmigrate", migration="completed")
TARGET_RUNNING = EndState(reachable=True, run_state="running", migration="completed")


def test_a_runner_that_died_after_source_retired_is_done_once_the_source_is_gone() -> None:
    assert decide(Step.SOURCE_RETIRED, PLAIN, Observation(GONE, TARGET_RUNNING)).step is Step.DONE
    assert decide(Step.SOURCE_RETIRED, PLAIN, Observation(POSTMIGRATE, TARGET_RUNNING)).step is Step.DONE


def test_a_retired_plain_source_is_never_resumed_even_when_the_target_is_lost() -> None:
    # the target ran the guest since (confirmed, then source-retired): the source's pages are stale
    decision = decide(Step.SOURCE_RETIRED, PLAIN, Observation(POSTMIGRATE, GONE))
    assert Action.CONT_SOURCE not in decision.actions and decision.step is Step.NEEDS_OPERATOR


def test_pick_vm_never_takes_a_stale_copy() -> None:
    stale = VmInfo(name="web", pid=1, qmp_path="/a", status="postmigrate", stale="stale copy of VM web (now on b)")
    live = VmInfo(name="web", pid=2, qmp_path="/b", status="running")
    a = HostReport(name="a", address="10.0.0.1", port=22, reachable=True, vms=(stale,))
    b = HostReport(name="b", address="10.0.0.2", port=22, reachable=True, vms=(live,))
    assert pick_vm([a], "web") is None
    assert pick_vm([a, b], "web") is live
