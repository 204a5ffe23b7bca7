"""When each migration of an evacuation starts (pure, no I/O; table-tested).

The model. Each host has one PSP that runs one SEV command at a time: it encrypts every page
the host sends (SEND_UPDATE_DATA) and decrypts every page it receives (RECEIVE_UPDATE_DATA),
at `r` pages/s (the lab's realistic PSP and AMD's measurement: 2.5 ms a page, 400 pages/s).
SEV migrations that share a PSP, as source or as target, share its `r`. A guest dirtying `d`
pages/s, given a share `s`, converges only while d < s; each pass re-sends what the last one
let it dirty, so it sends about N / (1 - d/s) pages in all. Sharing a PSP never saves PSP
work (N/(s-d) grows as s shrinks), so the schedule shares only where it costs little:

- An SEV migration starts only when, with it, every SEV migration on each of its two PSPs
  dirties at most MARGIN (half) of its share; so a guest dirtying more than half the PSP's
  rate gets the PSP alone, and the largest dirtiers, started first, get it alone. A guest whose
  dirty rate is unknown is planned as dirtying "a lot": it runs alone.
- SEV migrations wait their turn per PSP in that order (largest dirty rate first, then the
  largest guest): a later one never overtakes an earlier one on the same PSP.
- A migration near its end (its remaining pages drain within `lead_s`, or it is past pre-copy)
  no longer counts on its PSP: the next one starts then, so its set-up (a runner, two probes,
  launching the incoming VM, SEND_START) overlaps the tail of the previous one and the PSP is
  not left idle between guests. `lead_s` is measured as the evacuation goes (set-up times).
- Migrations with disjoint PSPs run in parallel; plain guests (no SEV: no PSP work) move
  alongside. Everything is bounded by `parallel` migrations at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sevconsole.engine.evac_plan import REFERENCE_PSP_PPS

MARGIN = 0.5  # a PSP sharer may dirty at most this fraction of its share
DEFAULT_LEAD_S = 1.5  # set-up time of a migration until one is measured
TAIL_PHASES = ("stop-and-copy", "finishing")


@dataclass(frozen=True)
class Job:
    """A migration not started yet."""

    vm: str
    source: str
    target: str
    sev: bool
    pages: int
    dirty: float | None = None  # pages/s the schedule plans with (the measurement's upper end)

    def psps(self) -> tuple[str, str]:
        return self.source, self.target


@dataclass(frozen=True)
class Flight:
    """A migration started: `phase` is the engine's (Progress.phase) or "starting" before its
    runner's first snapshot; the rest comes from its latest Progress."""

    vm: str
    source: str
    target: str
    sev: bool
    phase: str = "starting"
    remaining_pages: int | None = None
    pages_per_s: float = 0.0
    dirty: float | None = None  # measured in pre-copy (query-migrate), else the plan's
    pages: int = 0  # the guest's size, for estimates before the first snapshot


@dataclass(frozen=True)
class Start:
    vm: str
    why: str


@dataclass(frozen=True)
class Decision:
    start: tuple[Start, ...]
    waiting: tuple[tuple[str, str], ...]  # (vm, why it waits)


def rate_of(rates: Mapping[str, float], host: str) -> float:
    return rates.get(host) or REFERENCE_PSP_PPS


def time_left(f: Flight, rates: Mapping[str, float]) -> float:
    """Seconds until the flight's pages are drained (0 past pre-copy, inf when unknown)."""
    if f.phase in TAIL_PHASES:
        return 0.0
    if f.phase != "pre-copy" or f.remaining_pages is None:
        return math.inf
    speed = f.pages_per_s if f.pages_per_s > 0 else rate_of(rates, f.source)
    drain = speed - (f.dirty or 0.0)
    return f.remaining_pages / drain if drain > 0 else math.inf


def order(jobs: Sequence[Job]) -> list[Job]:
    """SEV first, largest dirty rate first (unknown counts as largest), then the largest guest;
    plain guests after, in plan order."""
    sev = sorted((j for j in jobs if j.sev),
                 key=lambda j: (-(math.inf if j.dirty is None else j.dirty), -j.pages, j.vm))
    return sev + [j for j in jobs if not j.sev]


def decide(jobs: Sequence[Job], flights: Sequence[Flight], rates: Mapping[str, float], *,
           parallel: int, lead_s: float = DEFAULT_LEAD_S) -> Decision:
    """Which of `jobs` to start now, given the migrations in flight."""
    active = list(flights)
    start: list[Start] = []
    waiting: list[tuple[str, str]] = []
    queued: dict[str, str] = {}  # PSP host -> the earlier SEV guest waiting for it
    for job in order(jobs):
        if len(active) >= parallel:
            waiting.append((job.vm, f"{parallel} migration(s) already run (--parallel {parallel})"))
            continue
        if not job.sev:
            start.append(Start(job.vm, "plain guest: no PSP work, moves alongside"))
            active.append(Flight(job.vm, job.source, job.target, False, pages=job.pages))
            continue
        ahead = next((f"after {queued[p]} on {p}'s PSP" for p in job.psps() if p in queued), None)
        why = ahead or _psp_conflict(job, active, rates, lead_s)
        if why is not None:
            waiting.append((job.vm, why))
            for p in job.psps():
                queued.setdefault(p, job.vm)
            continue
        start.append(Start(job.vm, _start_reason(job, active, rates, lead_s)))
        active.append(Flight(job.vm, job.source, job.target, True, dirty=job.dirty, pages=job.pages))
    return Decision(tuple(start), tuple(waiting))


def _sharers(p: str, active: Sequence[Flight], rates: Mapping[str, float], lead_s: float) -> list[Flight]:
    return [f for f in active if f.sev and p in (f.source, f.target) and time_left(f, rates) > lead_s]


def _psp_conflict(job: Job, active: Sequence[Flight], rates: Mapping[str, float], lead_s: float) -> str | None:
    """Why `job` cannot join the migrations on its PSPs now, or None."""
    for p in job.psps():
        sharers = _sharers(p, active, rates, lead_s)
        if not sharers:
            continue
        share = rate_of(rates, p) / (len(sharers) + 1)
        for who, dirty in [(job.vm, job.dirty)] + [(f.vm, f.dirty) for f in sharers]:
            if dirty is None:
                return f"waits for {p}'s PSP alone ({who}'s dirty rate is unknown)"
            if dirty > MARGIN * share:
                mine = "it dirties" if who == job.vm else f"{who} dirties"
                return (f"waits for {p}'s PSP: {mine} up to {dirty:.0f} pages/s, over half of a "
                        f"{len(sharers) + 1}-way share (~{_tens(share)} of ~{_tens(rate_of(rates, p))} pages/s)")
    return None


def _tens(rate: float) -> str:
    """A measured rate in a sentence: to the ten, so the sentence does not flicker."""
    return f"{round(rate, -1):.0f}"


def _start_reason(job: Job, active: Sequence[Flight], rates: Mapping[str, float], lead_s: float) -> str:
    shared = sorted({f.vm for p in job.psps() for f in _sharers(p, active, rates, lead_s)})
    if shared:
        return f"shares the PSPs with {', '.join(shared)}: every guest stays under half its share"
    ending = sorted({f.vm for f in active if f.sev and set(job.psps()) & {f.source, f.target}})
    if ending:
        return f"{', '.join(ending)} is ending: its set-up overlaps their last pages"
    return f"{job.source}'s and {job.target}'s PSPs are free"


def estimate_left(jobs: Sequence[Job], flights: Sequence[Flight], rates: Mapping[str, float],
                  mid_dirty: Mapping[str, float] | None = None) -> float | None:
    """Seconds the evacuation still needs, from PSP work alone: per source host, the flights'
    time left plus each waiting SEV guest's N/(r-d) (serially, the schedule's worst case);
    the longest host. None when a guest would not converge at its host's rate."""
    per_host: dict[str, float] = {}

    def add(host: str, pages: float, dirty: float) -> None:
        drain = rate_of(rates, host) - dirty
        per_host[host] = per_host.get(host, 0.0) + (pages / drain if drain > 0 else math.inf)

    mid = mid_dirty or {}
    for f in flights:
        if not f.sev:
            continue
        if f.phase in TAIL_PHASES or (f.phase == "pre-copy" and f.remaining_pages is not None):
            per_host[f.source] = per_host.get(f.source, 0.0) + time_left(f, rates)
        else:  # still setting up: all its pages are ahead
            add(f.source, f.pages, mid.get(f.vm, f.dirty or 0.0))
    for j in jobs:
        if j.sev:
            add(j.source, j.pages, mid.get(j.vm, j.dirty or 0.0))
    worst = max(per_host.values(), default=0.0)
    return None if worst == math.inf else worst


def start_all(jobs: Sequence[Job], flights: Sequence[Flight], rates: Mapping[str, float], *,
              parallel: int, lead_s: float = DEFAULT_LEAD_S) -> Decision:
    """Every migration at once, whatever the PSPs: the naive schedule, for comparison
    (benchmarks/evacuate.py); never used by `evacuate`."""
    return Decision(tuple(Start(j.vm, "every migration at once") for j in jobs), ())
