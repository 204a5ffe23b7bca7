"""The which-copy-may-run rules, as a table: (step, facts, both ends) -> next step and actions."""

from __future__ import annotations

import pytest

from sevconsole.engine.machine import (
    GONE,
    Action,
    EndState,
    Facts,
    Observation,
    Step,
    decide,
    runnable_copies,
    takes_over,
)
from sevconsole.sev.status import GuestState as G

SEV = Facts(sev=True)
SEV_HELD = Facts(sev=True, can_finish_held=True)
PLAIN = Facts(sev=False)
PAUSED_SEV = Facts(sev=True, source_was_running=False)


def end(run: str | None, mig: str | None = "none", guest: G | None = None) -> EndState:
    return EndState(reachable=True, run_state=run, migration=mig, guest=guest)


UNREACHABLE = EndState()

SRC_RUNNING = end("running", "none", G.RUNNING)
SRC_STREAMING = end("running", "active", G.SUPDATE)
SRC_CANCELLED = end("running", "cancelled", G.RUNNING)
SRC_SENT = end("postmigrate", "completed", G.SENT)
SRC_PAUSED_CANCELLED = end("paused", "cancelled", G.RUNNING)
DST_RECEIVING = end("inmigrate", "active", G.RUPDATE)
DST_PAUSED_DONE = end("paused", "completed", G.RUNNING)
DST_RUNNING = end("running", "completed", G.RUNNING)
DST_HELD = end("inmigrate", "failed", G.RUPDATE)

TABLE = [
    # (name, step, facts, source, target, next step, actions)
    ("streaming is cancelled first", Step.STREAMING, SEV, SRC_STREAMING, DST_RECEIVING,
     Step.STREAMING, (Action.CANCEL_MIGRATION,)),
    ("after cancel the incoming VM is stopped", Step.STREAMING, SEV, SRC_CANCELLED, DST_RECEIVING,
     Step.ROLLBACK_CHOSEN, (Action.STOP_TARGET,)),
    ("target gone, source runs: rolled back", Step.ROLLBACK_CHOSEN, SEV, SRC_RUNNING, GONE,
     Step.ROLLED_BACK, ()),
    ("source paused by the stop-and-copy: resumed", Step.ROLLBACK_CHOSEN, SEV, SRC_PAUSED_CANCELLED, GONE,
     Step.ROLLBACK_CHOSEN, (Action.CONT_SOURCE,)),
    ("a guest paused before stays paused", Step.ROLLBACK_CHOSEN, PAUSED_SEV, SRC_PAUSED_CANCELLED, GONE,
     Step.ROLLED_BACK, ()),
    ("SENT and the target holds it paused: resume the target", Step.STREAMING, SEV, SRC_SENT,
     DST_PAUSED_DONE, Step.SEND_FINISHED, (Action.CONT_TARGET,)),
    ("SENT and the target runs: done", Step.SEND_FINISHED, SEV, SRC_SENT, DST_RUNNING, Step.DONE, ()),
    ("the last frame was lost after SENT: finish the held guest", Step.STREAMING, SEV_HELD, SRC_SENT,
     DST_HELD, Step.SEND_FINISHED, (Action.FINISH_HELD,)),
    ("held guest without the finish command: nobody can run it", Step.STREAMING, SEV, SRC_SENT, DST_HELD,
     Step.NEEDS_OPERATOR, ()),
    ("forward, target unreachable: wait for its host", Step.SEND_FINISHED, SEV, SRC_SENT, UNREACHABLE,
     Step.NEEDS_OPERATOR, ()),
    ("forward, target gone, SEV source SENT: lost, said so", Step.SEND_FINISHED, SEV, SRC_SENT, GONE,
     Step.NEEDS_OPERATOR, ()),
    ("rollback chosen is never turned forward", Step.ROLLBACK_CHOSEN, PLAIN,
     end("postmigrate", "completed"), end("paused", "completed"),
     Step.ROLLBACK_CHOSEN, (Action.STOP_TARGET,)),
    ("plain: completed but the target never took it: stop it, resume the source", Step.SEND_FINISHED, PLAIN,
     end("postmigrate", "completed"), end("inmigrate", "failed"),
     Step.ROLLBACK_CHOSEN, (Action.STOP_TARGET, Action.CONT_SOURCE)),
    ("plain: the target ran it once: never resume the stale source", Step.TARGET_CONFIRMED, PLAIN,
     end("postmigrate", "completed"), GONE, Step.NEEDS_OPERATOR, ()),
    ("plain: source completed, target paused: forward", Step.STREAMING, PLAIN,
     end("postmigrate", "completed"), end("paused", "completed"), Step.SEND_FINISHED, (Action.CONT_TARGET,)),
    ("nothing launched: the source is the copy", Step.PLANNED, SEV, SRC_RUNNING, GONE, Step.ROLLED_BACK, ()),
    ("target unreachable before any stream: it can never run", Step.TARGET_LAUNCHED, SEV, SRC_RUNNING,
     UNREACHABLE, Step.ROLLED_BACK, ()),
    ("target unreachable mid-stream: cannot confirm it stopped", Step.ROLLBACK_CHOSEN, SEV, SRC_RUNNING,
     UNREACHABLE, Step.NEEDS_OPERATOR, ()),
    ("source unreachable, target gone", Step.ROLLBACK_CHOSEN, SEV, UNREACHABLE, GONE, Step.NEEDS_OPERATOR, ()),
    ("both copies run: the operator decides", Step.SEND_FINISHED, PLAIN, end("running", "completed"),
     DST_RUNNING, Step.NEEDS_OPERATOR, ()),
    ("terminal steps stay", Step.DONE, SEV, SRC_SENT, DST_RUNNING, Step.DONE, ()),
]


@pytest.mark.parametrize(("name", "step", "facts", "src", "dst", "want_step", "want_actions"), TABLE,
                         ids=[row[0] for row in TABLE])
def test_decide(name: str, step: Step, facts: Facts, src: EndState, dst: EndState, want_step: Step,
                want_actions: tuple[Action, ...]) -> None:
    decision = decide(step, facts, Observation(src, dst))
    assert (decision.step, decision.actions) == (want_step, want_actions), decision.sentence
    if decision.step == Step.NEEDS_OPERATOR:
        # a sentence an operator can act on: what is wrong, and what to do or expect
        assert "cop" in decision.sentence or "recover again" in decision.sentence, decision.sentence


def test_every_rollback_ends_with_one_copy() -> None:
    """Follow the machine from a cancelled stream, applying its actions as a host would: it ends
    ROLLED_BACK with the source the only runnable copy."""
    src, dst, step = SRC_STREAMING, DST_RECEIVING, Step.STREAMING
    for _ in range(6):
        d = decide(step, SEV, Observation(src, dst))
        if d.step.terminal:
            break
        step = d.step
        for action in d.actions:
            if action == Action.CANCEL_MIGRATION:
                src = end("paused", "cancelled", G.RUNNING)
            elif action == Action.STOP_TARGET:
                dst = GONE
            elif action == Action.CONT_SOURCE:
                src = end("running", "cancelled", G.RUNNING)
    assert d.step == Step.ROLLED_BACK
    assert runnable_copies(SEV, Observation(src, dst), "a", "b") == ("a",)


def test_takes_over_matches_the_engine_rules() -> None:
    assert takes_over(SEV, Observation(SRC_SENT, DST_PAUSED_DONE)) == Action.CONT_TARGET
    assert takes_over(SEV, Observation(SRC_CANCELLED, DST_PAUSED_DONE)) is None  # source still runs it
    assert takes_over(SEV_HELD, Observation(SRC_SENT, DST_HELD)) == Action.FINISH_HELD
    assert takes_over(SEV_HELD, Observation(SRC_CANCELLED, DST_HELD)) is None
    assert takes_over(PLAIN, Observation(end("postmigrate", "completed"), end("paused", "completed"))) \
        == Action.CONT_TARGET


def test_steps() -> None:
    assert all(s.terminal for s in (Step.DONE, Step.ROLLED_BACK, Step.REFUSED))
    assert not Step.NEEDS_OPERATOR.terminal
    assert Step.SEND_FINISHED.forward and not Step.ROLLBACK_CHOSEN.forward
