"""The evacuation plan (pure, no I/O): where each guest of a host may go, and where it goes.

Input: the guests on the host, each with the preflight of every candidate target (its checks
decide what the guest's policy and the fleet allow: DOMAIN, chain, API, ES, cbitpos, memory,
the target's cordon...), its measured dirty rate and QEMU's migration blocker; the targets
with their free memory; the source's PSP rate. Output: a `Move` per movable guest (target and
the reason it was chosen) and a `Blocker` per guest that cannot move, with its sentence.

Memory is packed so no target is overcommitted: guests are placed largest first, each on the
allowed target with the most memory left once it is placed (spreading guests over targets,
which also spreads the targets' PSP work); a guest no allowed target has room for is a blocker.
A re-plan (a target died mid-evacuation) calls `plan_evacuation` again with that target gone
and the memory of guests already placed taken off the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sevconsole.engine.checks import Check, CheckStatus, refused

PAGE_SIZE = 4096
PAGES_PER_MB = (1 << 20) // PAGE_SIZE  # QEMU's dirty rate is in MB/s (MiB, integer)
# AMD's measured PSP rate for SEND_UPDATE_DATA (sev-reference.md): 2.5 ms a page. Used for a
# host until one of its own migrations in this evacuation measured it.
REFERENCE_PSP_PPS = 400.0
# Checks about the guest itself: when one fails for every target, it is the guest's blocker.
GUEST_KEYS = ("nosend", "vm", "qmp", "argv", "policy", "reserved", "qemu-source")


@dataclass(frozen=True)
class DirtyRate:
    """A guest's dirty rate in pages/s as an interval: QEMU's calc-dirty-rate answers whole
    MB/s (256 pages/s steps), so 0 MB/s means 0..255 pages/s. The schedule plans with `high`."""

    low: float
    high: float
    how: str  # where it comes from, for the operator

    @classmethod
    def from_mbps(cls, mbps: int, how: str) -> DirtyRate:
        return cls(float(mbps * PAGES_PER_MB), float((mbps + 1) * PAGES_PER_MB - 1), how)

    @classmethod
    def exact(cls, pages_per_s: float, how: str) -> DirtyRate:
        return cls(float(pages_per_s), float(pages_per_s), how)

    def text(self) -> str:
        if self.low == self.high:
            return f"{self.low:.0f} pages/s"
        if self.low == 0:
            return f"< {self.high + 1:.0f} pages/s"
        return f"{self.low:.0f}-{self.high:.0f} pages/s"

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "how": self.how}


@dataclass(frozen=True)
class Guest:
    vm: str
    sev: bool
    mem_mib: int
    checks: Mapping[str, Sequence[Check]]  # by target name
    dirty: DirtyRate | None = None  # None: not measured (treated as "needs the PSP alone")
    blocker: str | None = None  # QEMU's migration blocker (VmInfo.migration_blocker)

    @property
    def pages(self) -> int:
        return self.mem_mib * PAGES_PER_MB


@dataclass(frozen=True)
class Target:
    name: str
    free_mib: int | None  # None: the host did not say (placed without a memory limit)


@dataclass(frozen=True)
class Move:
    vm: str
    target: str
    reason: str
    allowed: tuple[str, ...]
    sev: bool
    mem_mib: int
    dirty: DirtyRate | None = None
    warning: str | None = None
    refusals: tuple[tuple[str, str], ...] = ()  # (target, why not), for the plan's display

    @property
    def pages(self) -> int:
        return self.mem_mib * PAGES_PER_MB

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "target": self.target, "reason": self.reason, "allowed": list(self.allowed),
                "sev": self.sev, "mem_mib": self.mem_mib,
                "dirty": None if self.dirty is None else self.dirty.to_json(), "warning": self.warning,
                "refusals": [{"target": t, "why": w} for t, w in self.refusals]}


@dataclass(frozen=True)
class Blocker:
    vm: str
    kind: str  # blocked | nosend | no-target | memory | converge | a failing guest check's key
    sentence: str

    def to_json(self) -> dict[str, str]:
        return {"vm": self.vm, "kind": self.kind, "sentence": self.sentence}


@dataclass(frozen=True)
class EvacPlan:
    host: str
    moves: tuple[Move, ...]
    blockers: tuple[Blocker, ...]
    targets: tuple[str, ...]
    psp_rate: float = REFERENCE_PSP_PPS
    notes: tuple[str, ...] = field(default=())

    def refusal(self, skip_blocked: bool) -> str | None:
        """Why this plan does not start (exit 2), or None."""
        if self.blockers and not self.moves:
            return f"no guest on {self.host} can move; nothing was started"
        if self.blockers and not skip_blocked:
            names = ", ".join(b.vm for b in self.blockers)
            return (f"{len(self.blockers)} guest(s) cannot move ({names}); nothing was started: "
                    "fix them, or give --skip-blocked to move the others and leave them")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "moves": [m.to_json() for m in self.moves],
                "blockers": [b.to_json() for b in self.blockers], "targets": list(self.targets),
                "psp_rate": self.psp_rate, "notes": list(self.notes)}


def first_failure(checks: Sequence[Check]) -> Check | None:
    return next((c for c in checks if c.status is CheckStatus.FAIL), None)


def _blocker_without_target(guest: Guest, targets: Sequence[Target]) -> Blocker:
    if not targets:
        return Blocker(guest.vm, "no-target", f"there is no target host left for {guest.vm}")
    failing = [{c.key: c for c in guest.checks.get(t.name, ()) if c.status is CheckStatus.FAIL}
               for t in targets]
    for key in GUEST_KEYS:  # the guest's own problem: the same whatever the target
        if failing and all(key in f for f in failing):
            return Blocker(guest.vm, key, failing[0][key].sentence)
    why = "; ".join(f"{t.name}: {_why_not(guest, t.name)}" for t in targets)
    return Blocker(guest.vm, "no-target", f"no target fits {guest.vm}: {why}")


def _why_not(guest: Guest, target: str) -> str:
    fail = first_failure(guest.checks.get(target, ()))
    return fail.sentence.rstrip(".") if fail else "not checked"


def _converge(guest: Guest, host: str, psp_rate: float) -> tuple[Blocker | None, str | None]:
    """An SEV guest dirtying at least as fast as the source's PSP sends never converges."""
    if not guest.sev:
        return None, None
    if guest.dirty is None:
        return None, f"{guest.vm}'s dirty rate is unknown: it gets {host}'s PSP alone"
    if guest.dirty.low >= psp_rate:
        return Blocker(guest.vm, "converge",
                       f"{guest.vm} dirties {guest.dirty.text()} ({guest.dirty.how}), at least what {host}'s PSP "
                       f"sends ({psp_rate:.0f} pages/s): its pre-copy would never converge; lower its load "
                       "first"), None
    if guest.dirty.high >= psp_rate:
        return None, (f"{guest.vm} dirties {guest.dirty.text()}, close to {host}'s PSP rate ({psp_rate:.0f} "
                      "pages/s): it may converge slowly or not at all")
    return None, None


def plan_evacuation(host: str, guests: Sequence[Guest], targets: Sequence[Target], *,
                    psp_rate: float = REFERENCE_PSP_PPS, notes: Sequence[str] = ()) -> EvacPlan:
    """Moves and blockers for `guests`; `targets` are the hosts that may receive (the source,
    excluded targets and anything the operator left out with --to are not in it)."""
    blockers: dict[str, Blocker] = {}
    allowed: dict[str, tuple[str, ...]] = {}
    warnings: dict[str, str | None] = {}
    for g in guests:
        if g.blocker:
            blockers[g.vm] = Blocker(g.vm, "blocked", f"{g.vm} cannot move: {g.blocker}")
            continue
        ok = tuple(t.name for t in targets if t.name in g.checks and not refused(g.checks[t.name]))
        if not ok:
            blockers[g.vm] = _blocker_without_target(g, targets)
            continue
        stop, warn = _converge(g, host, psp_rate)
        if stop is not None:
            blockers[g.vm] = stop
            continue
        allowed[g.vm], warnings[g.vm] = ok, warn
    free = {t.name: t.free_mib for t in targets}
    placed: dict[str, int] = {t.name: 0 for t in targets}
    moves: dict[str, Move] = {}
    for g in sorted((g for g in guests if g.vm in allowed), key=lambda g: (-g.mem_mib, g.vm)):
        names = allowed[g.vm]
        fits = [t for t in names if free[t] is None or free[t] >= g.mem_mib]  # type: ignore[operator]
        if not fits:
            room = ", ".join(f"{t} has {free[t]} MiB left" for t in names)
            blockers[g.vm] = Blocker(g.vm, "memory", f"no allowed target has room for the {g.mem_mib} MiB of "
                                                     f"{g.vm} ({room}, counting the plan's other guests)")
            continue
        # most memory left after placing it (unknown memory counts as plenty), then fewest guests
        best = max(fits, key=lambda t: (float("inf") if free[t] is None else free[t] - g.mem_mib,  # type: ignore[operator]
                                        -placed[t], -names.index(t)))
        if free[best] is not None:
            free[best] -= g.mem_mib  # type: ignore[operator]
        placed[best] += 1
        moves[g.vm] = Move(g.vm, best, _reason(best, names, fits, free[best]), names, g.sev, g.mem_mib,
                           g.dirty, warnings[g.vm],
                           tuple((t.name, _why_not(g, t.name)) for t in targets if t.name not in names))
    order = {g.vm: i for i, g in enumerate(guests)}
    return EvacPlan(host, tuple(sorted(moves.values(), key=lambda m: order[m.vm])),
                    tuple(sorted(blockers.values(), key=lambda b: order[b.vm])),
                    tuple(t.name for t in targets), psp_rate, tuple(notes))


def _reason(best: str, allowed: Sequence[str], fits: Sequence[str], left: int | None) -> str:
    if len(allowed) == 1:
        return "the only target its policy and the fleet allow"
    full = [t for t in allowed if t not in fits]
    after = "" if left is None else f" ({left} MiB left after it)"
    why = "the only allowed target with room" if len(fits) == 1 else \
        f"most memory left of {', '.join(fits)}{after}"
    return why + (f"; {', '.join(full)} lack room" if full else "")
