"""ProgressFolder: folds QMP answers and events into immutable Progress snapshots.

The folder is the only mutable thing. A snapshot never changes after it is posted: Progress is
frozen, and its page array is stored read-only and replaced (never written) by the next fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from sevconsole.engine.estimate import convergence, estimated_page_map
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import FirmwareView, Phase, Progress, SevLogEntry
from sevconsole.sev.pagestate import PAGE_SIZE, decode_states

HISTORY = 240  # rate samples kept (a minute at the default cadence)
RATE_WINDOW_S = 1.0  # "rate now" spans this much: QEMU sends in bursts, a single poll gap jitters
EVENTS_KEPT = 100
SEV_LOG_KEPT = 1000
UNSEEN_STATUS = -1  # SevLogEntry.status of a command known only from the firmware's counts


class ProgressFolder:
    def __init__(self, plan: MigrationPlan, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self._clock = clock
        self._t0 = clock()
        self._progress = Progress(vm=plan.vm.name, source=plan.source.name, target=plan.target.name,
                                  phase=Phase.PREFLIGHT, started_at=time.time(),
                                  downtime_limit_ms=plan.downtime_limit_ms)
        self._last_sample: tuple[float, int] | None = None
        self._window: list[tuple[float, int]] = []  # (time, bytes) over the last RATE_WINDOW_S
        self._history: list[float] = []
        self._fw_seen: dict[str, float] = {}
        self._fw_counts: dict[str, dict[str, int]] = {}
        self._sev_log: list[SevLogEntry] = []
        self.last_progress_at = self._t0  # when bytes last moved (stall detection)

    # -- reads
    @property
    def current(self) -> Progress:
        return self._progress

    def snapshot(self) -> Progress:
        # Page arrays are never written after they are stored (each fold stores a new, read-only
        # one), so snapshots share them: no 16 MB copy per poll for a 64 GiB guest.
        p = self._progress
        return replace(p, elapsed_s=self._clock() - self._t0, extra=dict(p.extra))

    # -- writes
    def set(self, **changes: Any) -> None:
        self._progress = replace(self._progress, **changes)

    def phase(self, phase: Phase, pass_number: int | None = None) -> None:
        changes: dict[str, Any] = {"phase": phase}
        if pass_number is not None:
            changes["pass_number"] = pass_number
        self.set(**changes)

    def event(self, text: str) -> None:
        self.set(events=(*self._progress.events, text)[-EVENTS_KEPT:])

    def error(self, text: str) -> None:
        if text not in self._progress.errors:
            self.set(errors=(*self._progress.errors, text))

    def fold_migrate(self, info: Mapping[str, Any]) -> None:
        """One `query-migrate` answer of the source."""
        now = self._clock()
        p = self._progress
        ram = info.get("ram") or {}
        page_size = int(ram.get("page-size") or p.page_size or PAGE_SIZE)
        total = int(ram.get("total", p.bytes_total) or 0)
        # bytes sent only grow; a cancelled QEMU may stop reporting them
        transferred = max(p.bytes_transferred, int(ram.get("transferred", 0) or 0))
        remaining = int(ram.get("remaining", p.bytes_remaining) or 0)
        pages = int(ram.get("normal", 0) or 0) + int(ram.get("duplicate", 0) or 0)
        pages = max(p.pages_transferred, pages or transferred // page_size)
        passes = max(p.pass_number, int(ram.get("dirty-sync-count", 0) or 0))
        # QEMU's answer for a failed or cancelled migration has no `ram`: keep the last figures
        dirty_pps = float(ram.get("dirty-pages-rate", p.dirty_pages_per_s) or 0)
        rate, pps = p.rate_bps, p.pages_per_s
        recent = [w for w in self._window if now - w[0] <= RATE_WINDOW_S] or self._window[-1:]
        self._window = recent + [(now, transferred)]  # polls slower than the window: the last gap
        t_old, b_old = self._window[0]
        if now > t_old and info.get("status") not in ("completed", "failed", "cancelled"):
            rate = (transferred - b_old) / (now - t_old)
            pps = rate / page_size
            self._history = (self._history + [rate])[-HISTORY:]
        if self._last_sample is None or transferred > self._last_sample[1]:
            self.last_progress_at = now
        self._last_sample = (now, transferred)
        reported = info.get("expected-downtime")
        conv = convergence(remaining_bytes=remaining, rate_bps=rate, dirty_bps=dirty_pps * page_size,
                           downtime_limit_ms=self.plan.downtime_limit_ms,
                           reported_downtime_ms=float(reported) if reported else None,
                           passes=max(0, passes - 1))
        changes: dict[str, Any] = dict(
            page_size=page_size, total_pages=total // page_size if total else p.total_pages,
            bytes_transferred=transferred, bytes_remaining=remaining, bytes_total=total,
            pages_transferred=pages, rate_bps=rate, pages_per_s=pps,
            rate_history=tuple(self._history), dirty_pages_per_s=dirty_pps,
            expected_downtime_ms=conv.expected_downtime_ms, converging=conv.converging,
            eta_s=conv.eta_s, pass_number=passes)
        if not p.page_map_exact and total:
            states = estimated_page_map(total // page_size, remaining // page_size, passes, private=self.plan.sev)
            states.setflags(write=False)
            changes["page_states"] = states
        if info.get("status") == "active" and p.phase in (Phase.CONNECTING, Phase.SEND_START, Phase.PRECOPY):
            changes["phase"] = Phase.PRECOPY
        self.set(**changes)

    def fold_page_state(self, answer: Mapping[str, Any]) -> None:
        """The lab's exact `x-query-sev-page-state`."""
        count = int(answer["count"])
        states = decode_states(str(answer["data"]), count)  # a fresh array over fresh bytes
        states.setflags(write=False)
        self.set(page_states=states, page_map_exact=True, total_pages=count,
                 page_size=int(answer.get("page-size", PAGE_SIZE)))

    def fold_firmware(self, role: str, host: str, answer: Mapping[str, Any], *, baseline: bool = False) -> None:
        """The lab's `x-query-sev-firmware` for one end. New log lines join the folded SEV log; a
        `baseline` read (before the migration) only marks where the migration's commands start."""
        counts = {str(k): int(v) for k, v in (answer.get("counts") or {}).items()}
        view = FirmwareView(host=host, platform_state=answer.get("platform-state"),
                            guest_state=answer.get("guest-state"), handle=answer.get("handle"),
                            counts=counts, last_status=answer.get("last-status"))
        self.set(**{f"{role}_fw": view})
        log = answer.get("log") or []
        if baseline:
            self._fw_counts[host] = counts
            self._fw_seen[host] = max((float(e.get("time", 0.0)) for e in log), default=float("-inf"))
            return
        self._fold_log(host, log, counts)

    def _fold_log(self, host: str, log: list[Mapping[str, Any]], counts: dict[str, int]) -> None:
        seen_until = self._fw_seen.get(host, float("-inf"))
        fresh = [e for e in log if float(e.get("time", 0.0)) > seen_until]
        if fresh:
            self._fw_seen[host] = max(float(e.get("time", 0.0)) for e in fresh)
        new: list[SevLogEntry] = []
        # Fold runs per host (SEND_UPDATE_DATA x N), even while the other end's lines interleave.
        mine = next((i for i in range(len(self._sev_log) - 1, -1, -1) if self._sev_log[i].host == host), None)
        for e in fresh:
            cmd, status, t = str(e.get("command")), int(e.get("status", 0)), float(e.get("time", 0.0))
            last = new[-1] if new else (self._sev_log[mine] if mine is not None else None)
            if last is not None and last.command == cmd and last.status == status:
                folded = replace(last, count=last.count + 1, time=t)
                if new:
                    new[-1] = folded
                else:
                    self._sev_log[mine] = folded  # type: ignore[index]
            else:
                new.append(SevLogEntry(host=host, command=cmd, status=status, time=t))
        # The firmware keeps only its last 64 lines: commands that scrolled away between two reads
        # come back from its per-command counts. A command never seen in the log gets status
        # UNSEEN_STATUS (it ran; its status was not read).
        before = self._fw_counts.get(host)
        self._fw_counts[host] = counts
        if before is not None:
            seen: dict[str, int] = {}
            for e in fresh:
                seen[str(e.get("command"))] = seen.get(str(e.get("command")), 0) + 1
            unseen: list[SevLogEntry] = []
            first_t = min((float(e.get("time", 0.0)) for e in fresh), default=0.0)
            for cmd, total in counts.items():
                missed = total - before.get(cmd, 0) - seen.get(cmd, 0)
                if missed <= 0:
                    continue
                idx = max((i for i, x in enumerate(new) if x.command == cmd), default=None,
                          key=lambda i: new[i].count)
                if idx is not None:
                    new[idx] = replace(new[idx], count=new[idx].count + missed)
                elif not new and mine is not None and self._sev_log[mine].command == cmd:
                    self._sev_log[mine] = replace(self._sev_log[mine], count=self._sev_log[mine].count + missed)
                else:
                    unseen.append(SevLogEntry(host=host, command=cmd, status=UNSEEN_STATUS,
                                              count=missed, time=first_t))
            unseen.sort(key=lambda x: _command_order(x.command))
            new = unseen + new
        self._sev_log = (self._sev_log + new)[-SEV_LOG_KEPT:]
        self.set(sev_log=tuple(self._sev_log))


def _command_order(name: str) -> int:
    from sevconsole.sev.status import Command

    return int(Command[name]) if name in Command.__members__ else 0x100
