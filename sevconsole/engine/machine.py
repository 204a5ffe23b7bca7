"""Which copy of a guest may run: the engine's decisions as a pure state machine.

`decide(step, facts, observation) -> Decision` holds every "which copy may run" rule: the live
run (engine/run.py) asks it when a migration ends in a way it did not plan, and reconciliation
(engine/recover.py) asks it after a runner died. No I/O here; the table tests cover each rule.

The journal records the `Step`s: a step is recorded before the actions it leads to, so a runner
that dies at any point leaves a journal that says which way the guest was going.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sevconsole.sev.status import GuestState

ACTIVE = ("setup", "active", "device", "pre-switchover", "postcopy-active", "cancelling", "wait-unplug")


class Step(StrEnum):
    PLANNED = "planned"  # the plan is fixed; nothing touched yet
    TARGET_LAUNCHED = "target-launched"  # an incoming VM exists on the target (pid, qmp)
    STREAMING = "streaming"  # `migrate` was issued on the source
    SEND_FINISHED = "send-finished"  # the source reported the end of the stream: forward only
    ROLLBACK_CHOSEN = "rollback-chosen"  # back only: the target's copy must never run
    TARGET_CONFIRMED = "target-confirmed"  # the target runs the guest (or holds it paused, as it was)
    SOURCE_RETIRED = "source-retired"  # the source's copy can never run again
    DONE = "done"  # terminal: the guest is on the target alone
    ROLLED_BACK = "rolled-back"  # terminal: the guest is on the source alone
    REFUSED = "refused"  # terminal: nothing was started
    NEEDS_OPERATOR = "needs-operator"  # not terminal: reconciliation could not decide (sentence)

    @property
    def terminal(self) -> bool:
        return self in (Step.DONE, Step.ROLLED_BACK, Step.REFUSED)

    @property
    def forward(self) -> bool:
        """Past the point of no return: the guest must end on the target."""
        return self in (Step.SEND_FINISHED, Step.TARGET_CONFIRMED, Step.SOURCE_RETIRED, Step.DONE)


class Action(StrEnum):
    CANCEL_MIGRATION = "cancel-migration"  # migrate_cancel on the source, then wait for its end
    FINISH_HELD = "finish-held"  # the target holds every page but lost the last frame: finish it
    CONT_TARGET = "cont-target"
    STOP_TARGET = "stop-target"  # quit the incoming VM and stop its process
    CONT_SOURCE = "cont-source"


@dataclass(frozen=True)
class Facts:
    """What the plan fixed: an SEV guest or a plain one, and whether it ran before."""

    sev: bool
    source_was_running: bool = True
    can_finish_held: bool = False  # the target offers the lab's x-sev-receive-finish


@dataclass(frozen=True)
class EndState:
    """One end as observed. `reachable`: its QMP answered. `gone`: its process is known not to
    exist (for the target: never launched, or stopped). Unreachable and not gone: unknown."""

    reachable: bool = False
    run_state: str | None = None  # QEMU query-status
    migration: str | None = None  # QEMU query-migrate status ("none" before any)
    guest: GuestState | None = None  # firmware guest state, when the host shows it
    gone: bool = False

    @property
    def unknown(self) -> bool:
        return not self.reachable and not self.gone


GONE = EndState(gone=True)


@dataclass(frozen=True)
class Observation:
    source: EndState
    target: EndState


@dataclass(frozen=True)
class Decision:
    step: Step
    actions: tuple[Action, ...] = ()
    sentence: str = ""


def source_runnable(facts: Facts, src: EndState) -> bool:
    """The source's copy runs, or is paused as the operator left it."""
    if not src.reachable or (facts.sev and src.guest == GuestState.SENT):
        return False
    return src.run_state == "running" or (src.run_state == "paused" and not facts.source_was_running)


def target_runnable(facts: Facts, dst: EndState) -> bool:
    if not dst.reachable:
        return False
    if facts.sev and dst.guest is not None and dst.guest != GuestState.RUNNING:
        return False
    return dst.run_state == "running" or (dst.run_state == "paused" and not facts.source_was_running)


def source_resumable(facts: Facts, src: EndState) -> bool:
    """`cont` would run the source's copy: it still holds the guest (SEV: not SENT)."""
    if not src.reachable or src.run_state not in ("paused", "postmigrate"):
        return False
    if facts.sev:  # a firmware state we cannot see: only a paused guest is taken as resumable
        return src.run_state == "paused" if src.guest is None else src.guest != GuestState.SENT
    return True


def source_cannot_run(facts: Facts, src: EndState) -> bool:
    """Positive word that the source can never run this guest again."""
    if facts.sev:
        return src.reachable and src.guest == GuestState.SENT
    return src.reachable and src.run_state == "postmigrate"


def target_holds(dst: EndState) -> bool:
    """The incoming VM received the whole stream (its side completed), so it can run the guest."""
    return dst.reachable and (dst.migration == "completed" or (
        dst.run_state in ("running", "paused") and dst.migration in (None, "none", "completed")))


def runnable_copies(facts: Facts, obs: Observation, source: str, target: str) -> tuple[str, ...]:
    out = []
    if source_runnable(facts, obs.source):
        out.append(source)
    if target_runnable(facts, obs.target):
        out.append(target)
    return tuple(out)


def takes_over(facts: Facts, obs: Observation) -> Action | None:
    """Whether the target must keep the guest although the run is ending another way (cancel,
    failure, lost link): None (roll back), CONT_TARGET (it holds the whole guest) or FINISH_HELD
    (it holds every page but the last frame was lost after the source was SENT)."""
    src, dst = obs.source, obs.target
    if target_holds(dst):
        if facts.sev:
            done = src.guest == GuestState.SENT or (not src.reachable and src.guest is None) or (
                src.run_state != "running" and src.guest != GuestState.RUNNING)
        else:
            done = src.run_state != "running"
        return Action.CONT_TARGET if done else None
    if dst.reachable and dst.migration == "failed" and facts.can_finish_held and source_cannot_run(facts, src):
        return Action.FINISH_HELD
    return None


def decide(step: Step, facts: Facts, obs: Observation) -> Decision:
    """The next step and the actions that get there, from the last recorded step and what both
    ends say now. A terminal step means exactly one copy can run and nothing is left to do."""
    src = obs.source
    if step.terminal:
        return Decision(step)
    # 1. a stream still flowing is stopped first (unless the guest already went forward)
    if src.reachable and src.migration in ACTIVE and not step.forward:
        return Decision(step, (Action.CANCEL_MIGRATION,), "the migration is still streaming: cancel it")
    # SEND_FINISH is the point of no return: a SENT source can never run again, whatever was chosen
    sent = facts.sev and src.reachable and src.guest == GuestState.SENT
    forward = step.forward or sent or (step != Step.ROLLBACK_CHOSEN and takes_over(facts, obs) is not None)
    if forward:
        return _forward(step, facts, obs)
    return _back(step, facts, obs)


def _forward(step: Step, facts: Facts, obs: Observation) -> Decision:
    src, dst = obs.source, obs.target
    if target_runnable(facts, dst):
        if source_runnable(facts, src):
            return Decision(Step.NEEDS_OPERATOR, (), "both copies can run: the source's must be stopped "
                            "by hand after checking which one is current")
        return Decision(Step.DONE, (), "the guest runs on the target alone")
    if takes_over(facts, obs) == Action.FINISH_HELD:
        return Decision(Step.SEND_FINISHED, (Action.FINISH_HELD,), "the target holds every page and the "
                        "source was SENT: finish the guest on the target")
    if target_holds(dst) and dst.run_state != "running" and (
            not facts.sev or dst.guest in (None, GuestState.RUNNING)):
        return Decision(Step.SEND_FINISHED, (Action.CONT_TARGET,), "the target holds the guest, paused: "
                        "resume it")
    # the target does not hold the guest
    if not facts.sev and source_resumable(facts, src) and \
            step not in (Step.TARGET_CONFIRMED, Step.SOURCE_RETIRED):
        # a plain source still holds every page after "completed"; the target never ran it
        stop = (Action.STOP_TARGET,) if not dst.gone else ()
        return Decision(Step.ROLLBACK_CHOSEN, (*stop, Action.CONT_SOURCE),
                        "the target never took the guest; the plain source still holds it: resume it")
    if dst.unknown:
        return Decision(Step.NEEDS_OPERATOR, (), "the target cannot be reached and the source can no "
                        "longer run the guest: bring the target host back, then run recover again")
    left = "was SENT" if facts.sev else "handed the guest over (the target ran it since)"
    return Decision(Step.NEEDS_OPERATOR, (), f"the source {left} but the target does not hold the guest: "
                    "no copy can run; the guest is lost unless the target's host comes back")


def _back(step: Step, facts: Facts, obs: Observation) -> Decision:
    src, dst = obs.source, obs.target
    if not dst.gone:
        if dst.unknown:
            if source_runnable(facts, src) and step in (Step.PLANNED, Step.TARGET_LAUNCHED):
                # an incoming VM that never got a stream can never run: the source is the copy
                return Decision(Step.ROLLED_BACK, (), "the guest runs on the source; the target's "
                                "incoming VM, if any, never received the stream")
            return Decision(Step.NEEDS_OPERATOR, (), "the target cannot be reached, so its incoming VM "
                            "cannot be confirmed stopped: bring its host back, then run recover again")
        return Decision(Step.ROLLBACK_CHOSEN, (Action.STOP_TARGET,), "roll back: stop the incoming VM")
    if source_runnable(facts, src):
        return Decision(Step.ROLLED_BACK, (), "the guest runs on the source alone")
    if source_resumable(facts, src) and facts.source_was_running:
        return Decision(Step.ROLLBACK_CHOSEN, (Action.CONT_SOURCE,), "the source still holds the guest, "
                        "paused: resume it")
    if not facts.source_was_running and src.reachable and src.run_state in ("paused", "postmigrate") and \
            not (facts.sev and src.guest == GuestState.SENT):
        return Decision(Step.ROLLED_BACK, (), "the guest stays on the source, paused as it was "
                        "(`cont` resumes it)")
    if not src.reachable:
        return Decision(Step.NEEDS_OPERATOR, (), "the source cannot be reached: bring its host back, "
                        "then run recover again")
    return Decision(Step.NEEDS_OPERATOR, (), f"the source's copy is '{src.run_state}' "
                    f"(firmware {src.guest.name if src.guest is not None else 'unknown'}) and the target's "
                    "is gone: no copy can run")
