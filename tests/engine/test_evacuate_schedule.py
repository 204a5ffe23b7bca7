"""The evacuation's PSP-aware schedule (engine/evac_schedule.py), table by table: no I/O."""

from __future__ import annotations

import math

import pytest

from sevconsole.engine.evac_schedule import (
    DEFAULT_LEAD_S,
    Flight,
    Job,
    decide,
    estimate_left,
    order,
    start_all,
    time_left,
)

REAL = {"src": 400.0, "a": 400.0, "b": 400.0}  # the realistic PSP on every host
FAST = {"src": 40000.0, "a": 40000.0, "b": 40000.0}  # a PSP far faster than any guest dirties
N = 2048  # an 8 MiB guest


def sev(vm: str, dirty: float | None, target: str = "a", source: str = "src", pages: int = N) -> Job:
    return Job(vm, source, target, True, pages, dirty)


def plain(vm: str, target: str = "a") -> Job:
    return Job(vm, "src", target, False, N)


def started(jobs: list[Job], flights: list[Flight] = (), rates: dict | None = None, parallel: int = 8,
            lead_s: float = DEFAULT_LEAD_S) -> list[str]:
    return [s.vm for s in decide(jobs, list(flights), rates if rates is not None else REAL, parallel=parallel,
                                 lead_s=lead_s).start]


@pytest.mark.parametrize(("jobs", "rates", "flights", "parallel", "expected"), [
    # the realistic PSP and QEMU's "0 MB/s" (up to 255 pages/s): one SEV guest at a time on the source
    ([sev("x", 255), sev("y", 255, "b"), sev("z", 255)], REAL, [], 8, ["x"]),
    # a fast PSP: all share it, bounded by --parallel
    ([sev("x", 255), sev("y", 255, "b"), sev("z", 255)], FAST, [], 8, ["x", "y", "z"]),
    ([sev("x", 255), sev("y", 255, "b"), sev("z", 255)], FAST, [], 2, ["x", "y"]),
    # the largest dirtier first, and alone
    ([sev("small", 10), sev("big", 300, "b")], REAL, [], 8, ["big"]),
    # small dirtiers share: a 4-way share of 400 is 100, half of it 50
    ([sev(f"g{i}", 50, "ab"[i % 2]) for i in range(5)], REAL, [], 8, ["g0", "g1", "g2", "g3"]),
    # unknown dirty rate: runs alone, and first
    ([sev("known", 0), sev("unknown", None, "b")], REAL, [], 8, ["unknown"]),
    ([sev("known", 0)], REAL, [Flight("unknown", "src", "b", True, dirty=None)], 8, []),
    # plain guests move alongside an SEV migration, bounded by --parallel
    ([plain("p1"), plain("p2"), sev("x", 255)], REAL, [Flight("busy", "src", "b", True, dirty=255)], 3, ["p1", "p2"]),
    ([plain("p1"), plain("p2"), plain("p3")], REAL, [], 2, ["p1", "p2"]),
    # independent hosts: different sources and targets run in parallel whatever they dirty
    ([sev("x", 300, "a", "s1"), sev("y", 300, "b", "s2")], {}, [], 8, ["x", "y"]),
    # the receiving PSP is shared too: two sources into one target
    ([sev("x", 300, "t", "s1"), sev("y", 300, "t", "s2")], {}, [], 8, ["x"]),
])
def test_decide(jobs: list[Job], rates: dict, flights: list[Flight], parallel: int, expected: list[str]) -> None:
    assert started(jobs, flights, rates, parallel) == expected


def test_a_later_guest_never_overtakes_an_earlier_one_on_the_same_psp() -> None:
    busy = Flight("busy", "src", "a", True, phase="pre-copy", remaining_pages=N, pages_per_s=400, dirty=255)
    decision = decide([sev("big", 255, "b"), sev("tiny", 0, "b"), sev("elsewhere", 0, "d", "s2")], [busy], REAL,
                      parallel=8)
    assert [s.vm for s in decision.start] == ["elsewhere"]
    why = dict(decision.waiting)
    assert "src's PSP" in why["big"] and "255 pages/s" in why["big"]
    assert why["tiny"] == "after big on src's PSP"


@pytest.mark.parametrize(("flight", "starts"), [
    # 200 pages left at 400 pages/s: 0.5 s, within the set-up lead: the next one starts now
    (Flight("ending", "src", "a", True, phase="pre-copy", remaining_pages=200, pages_per_s=400, dirty=0), True),
    # the guest dirties: 200 pages drain at 400-300 pages/s: 2 s, beyond the lead
    (Flight("ending", "src", "a", True, phase="pre-copy", remaining_pages=200, pages_per_s=400, dirty=300), False),
    (Flight("ending", "src", "a", True, phase="stop-and-copy"), True),
    (Flight("ending", "src", "a", True, phase="finishing"), True),
    # still setting up (no page moved yet): counts in full
    (Flight("ending", "src", "a", True, phase="connecting"), False),
    (Flight("ending", "src", "a", True, phase="starting"), False),
])
def test_the_next_set_up_overlaps_the_tail_of_the_previous(flight: Flight, starts: bool) -> None:
    decision = decide([sev("next", 255, "b")], [flight], REAL, parallel=8)
    assert [s.vm for s in decision.start] == (["next"] if starts else [])
    if starts:
        assert "ending" in decision.start[0].why


def test_one_guest_at_a_time_takes_the_tail_slot() -> None:
    """Only one new migration starts into an ending one's slot: the second sees the first setting up."""
    ending = Flight("ending", "src", "a", True, phase="stop-and-copy")
    assert started([sev("n1", 255, "b"), sev("n2", 255, "a")], [ending]) == ["n1"]


def test_order_and_time_left() -> None:
    jobs = [plain("p"), sev("a", 10), sev("b", None), sev("c", 10, pages=4096), sev("d", 200)]
    assert [j.vm for j in order(jobs)] == ["b", "d", "c", "a", "p"]
    f = Flight("x", "src", "a", True, phase="pre-copy", remaining_pages=1000, pages_per_s=400, dirty=200)
    assert time_left(f, REAL) == pytest.approx(5.0)
    assert time_left(Flight("x", "src", "a", True, phase="pre-copy", remaining_pages=10, pages_per_s=100,
                            dirty=200), REAL) == math.inf
    assert time_left(Flight("x", "src", "a", True), REAL) == math.inf


def test_estimate_left_is_serial_psp_work_per_source() -> None:
    flights = [Flight("x", "src", "a", True, phase="pre-copy", remaining_pages=400, pages_per_s=400, dirty=0)]
    jobs = [sev("y", 200, pages=2000), sev("z", 0, "b", pages=400), plain("p")]
    # 1 s left for x, then 2000/(400-200) + 400/400
    assert estimate_left(jobs, flights, REAL) == pytest.approx(1 + 10 + 1)
    # a guest that cannot converge: no estimate
    assert estimate_left([sev("w", 400)], [], REAL) is None
    # the middle of a measured interval instead of its top
    assert estimate_left([sev("y", 255, pages=400)], [], REAL, {"y": 0.0}) == pytest.approx(1.0)


def test_start_all_starts_everything() -> None:
    """The benchmark's comparison: every migration at once, whatever the PSP."""
    jobs = [sev("x", 255), sev("y", 300), plain("p")]
    assert [s.vm for s in start_all(jobs, [], REAL, parallel=1, lead_s=1.0).start] == ["x", "y", "p"]
