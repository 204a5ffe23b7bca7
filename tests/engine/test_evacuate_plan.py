"""The evacuation plan (engine/evac_plan.py), table by table: blockers, targets, memory packing."""

from __future__ import annotations

import pytest

from sevconsole.engine.checks import Check, CheckStatus
from sevconsole.engine.evac_plan import DirtyRate, Guest, Target, plan_evacuation
from sevconsole.engine.evac_view import EvacView, Row, plan_lines, summarize, table_lines

OK = Check("memory", "Memory on target", CheckStatus.PASS, "fits.")


def fail(key: str, sentence: str) -> Check:
    return Check(key, key, CheckStatus.FAIL, sentence)


def guest(vm: str, targets: dict[str, list[Check]] | tuple[str, ...] = ("b", "c"), mem: int = 8, sev: bool = True,
          dirty: DirtyRate | None = None, blocker: str | None = None) -> Guest:
    checks = {t: [OK] for t in targets} if isinstance(targets, tuple) else targets
    return Guest(vm, sev, mem, checks, dirty if dirty is not None or not sev else DirtyRate.from_mbps(0, "test"),
                 blocker)


TARGETS = [Target("b", 1000), Target("c", 1000)]


def test_blockers_each_with_its_sentence() -> None:
    nosend = fail("nosend", "vault's policy sets NOSEND (bit 3): this guest may never leave its host.")
    plan = plan_evacuation("a", [
        guest("web"),
        guest("vault", {"b": [nosend], "c": [nosend]}),
        guest("old", blocker="the guest never enabled migration"),
        guest("picky", {"b": [fail("domain", "b's OCA differs.")], "c": [fail("cordon", "c is cordoned.")]}),
        guest("hot", dirty=DirtyRate.from_mbps(2, "calc-dirty-rate: 2 MB/s")),
    ], TARGETS)
    assert [m.vm for m in plan.moves] == ["web"]
    kinds = {b.vm: (b.kind, b.sentence) for b in plan.blockers}
    assert kinds["vault"] == ("nosend", nosend.sentence)
    assert kinds["old"] == ("blocked", "old cannot move: the guest never enabled migration")
    assert kinds["picky"][0] == "no-target"
    assert "b: b's OCA differs; c: c is cordoned" in kinds["picky"][1]
    assert kinds["hot"][0] == "converge" and "512-767 pages/s" in kinds["hot"][1]
    assert plan.refusal(skip_blocked=False) is not None and "vault" in plan.refusal(skip_blocked=False)
    assert plan.refusal(skip_blocked=True) is None


def test_only_blockers_is_refused_even_with_skip_blocked() -> None:
    plan = plan_evacuation("a", [guest("old", blocker="no")], TARGETS)
    assert plan.refusal(skip_blocked=True) == "no guest on a can move; nothing was started"
    assert plan_evacuation("a", [], TARGETS).refusal(skip_blocked=False) is None


@pytest.mark.parametrize(("mems", "free", "expected", "blocked"), [
    # spread over targets (most memory left after placing), largest guest first
    ([8, 8, 8, 8], {"b": 1000, "c": 1000}, {"g0": "b", "g1": "c", "g2": "b", "g3": "c"}, []),
    ([16, 8, 8], {"b": 20, "c": 12}, {"g0": "b", "g1": "c"}, ["g2"]),
    ([8, 8], {"b": 8, "c": 0}, {"g0": "b"}, ["g1"]),
    # a host that did not say how much is free counts as having plenty (its preflight warns)
    ([8, 8], {"b": None, "c": 100}, {"g0": "b", "g1": "b"}, []),
])
def test_memory_is_packed_so_no_target_is_overcommitted(mems: list[int], free: dict, expected: dict,
                                                         blocked: list[str]) -> None:
    guests = [guest(f"g{i}", mem=m) for i, m in enumerate(mems)]
    plan = plan_evacuation("a", guests, [Target(n, f) for n, f in free.items()])
    assert {m.vm: m.target for m in plan.moves} == expected
    assert [b.vm for b in plan.blockers] == blocked
    assert all(b.kind == "memory" and "room" in b.sentence for b in plan.blockers)
    for name, f in free.items():
        assert f is None or sum(m.mem_mib for m in plan.moves if m.target == name) <= f


def test_reasons_and_refusals_are_shown() -> None:
    domain = fail("domain", "web's policy sets DOMAIN (bit 4): c's OCA key differs.")
    plan = plan_evacuation("a", [guest("web", {"b": [OK], "c": [domain]}), guest("db"), guest("p", sev=False)],
                           TARGETS)
    moves = {m.vm: m for m in plan.moves}
    assert moves["web"].reason == "the only target its policy and the fleet allow"
    assert moves["web"].refusals == (("c", "web's policy sets DOMAIN (bit 4): c's OCA key differs"),)
    assert moves["db"].allowed == ("b", "c") and "most memory left" in moves["db"].reason
    text = "\n".join(plan_lines(plan))
    assert "web (SEV, 8 MiB, dirties < 256 pages/s) -> b" in text and "not c: web's policy" in text
    assert "p (plain, 8 MiB) ->" in text


def test_dirty_rate_close_to_the_psp_rate_is_a_warning_and_unknown_is_noted() -> None:
    plan = plan_evacuation("a", [guest("warm", dirty=DirtyRate.from_mbps(1, "1 MB/s")),
                                 Guest("unknown", True, 8, {"b": [OK]}, None)], TARGETS)
    moves = {m.vm: m for m in plan.moves}
    assert "may converge slowly" in (moves["warm"].warning or "")
    assert "alone" in (moves["unknown"].warning or "")


def test_a_re_plan_without_a_target() -> None:
    guests = [guest("x"), guest("y")]
    first = plan_evacuation("a", guests, TARGETS)
    assert {m.target for m in first.moves} == {"b", "c"}
    again = plan_evacuation("a", guests, [Target("c", 1000)])
    assert {m.vm: m.target for m in again.moves} == {"x": "c", "y": "c"}
    gone = plan_evacuation("a", guests, [])
    assert [b.sentence for b in gone.blockers] == ["there is no target host left for x",
                                                   "there is no target host left for y"]


def test_dirty_rate_intervals() -> None:
    assert DirtyRate.from_mbps(0, "q").text() == "< 256 pages/s"
    assert (DirtyRate.from_mbps(3, "q").low, DirtyRate.from_mbps(3, "q").high) == (768.0, 1023.0)
    assert DirtyRate.exact(120.4, "q").text() == "120 pages/s"


def test_fleet_table_and_totals() -> None:
    rows = [Row("web", True, "migrating", "b", "pre-copy", 42.0, 398.0, 3.0),
            Row("db", True, "waiting", "c", note="after web on a's PSP"),
            Row("old", True, "blocked", note="old cannot move"), Row("p", False, "moved", "b"),
            Row("x", True, "failed", note="stays on a")]
    summary = summarize(rows, 12.0, 30.0)
    assert (summary.moved, summary.left, summary.running, summary.blocked, summary.failed) == (1, 2, 1, 1, 1)
    lines = table_lines(EvacView("id", "a", tuple(rows), summary))
    assert lines[0].split() == ["GUEST", "KIND", "TARGET", "STATUS", "PHASE", "PROGRESS", "RATE", "ETA", "NOTE"]
    assert "42.0%" in lines[1] and "398 p/s" in lines[1] and "3s" in lines[1]
    assert lines[-1] == "a: moved 1, left 2 (1 running), blocked 1, failed 1; elapsed 30s, time left 12s"
