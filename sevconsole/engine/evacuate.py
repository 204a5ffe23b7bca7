"""Evacuate a host: probe the fleet, measure each guest's dirty rate, plan (engine/evac_plan.py),
then run the plan's migrations on the PSP-aware schedule (engine/evac_schedule.py), each in a
runner of its own (engine/runner.py: journaled, detached), re-planning around a target whose
migration fails. Immutable `EvacView` snapshots go to the caller (the command, the console).

Measured as it goes: each host's PSP rate is its first SEV migration's pre-copy page rate
(pages sent over the first pass, or the whole stream when the pass is under a second) while no
other SEV migration streams through its PSPs, the reference's 400 pages/s until then; the
set-up time of a migration (spawn to the first pre-copy snapshot) gives the schedule's lead.

A failed migration leaves its guest on the host with one runnable copy (the engine's promise);
its target is then dropped for the rest of the evacuation, the guests not started yet are
re-planned over the remaining targets, and the failed guest is tried again once elsewhere.
A runner that dies is reconciled (`recover`) before its guest is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sevconsole.engine import evac_record, evac_schedule, journal
from sevconsole.engine.checks import preflight
from sevconsole.engine.evac_plan import (
    REFERENCE_PSP_PPS,
    DirtyRate,
    EvacPlan,
    Guest,
    Move,
    Target,
    plan_evacuation,
)
from sevconsole.engine.evac_record import EvacRecord
from sevconsole.engine.evac_view import EvacView, Row, summarize
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.hosts.report import HostReport

EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_UNKNOWN = 0, 1, 2, 3
MIN_RATE_WINDOW_S = 1.0  # pre-copy time before a page rate counts as the PSP's
LEAD_BOUNDS_S = (0.5, 5.0)
RUNNABLE = ("running", "paused", None)


class EvacError(Exception):
    """The evacuation cannot start; `code` is the command's exit status."""

    def __init__(self, sentence: str, code: int) -> None:
        super().__init__(sentence)
        self.code = code


@dataclass(frozen=True)
class EvacOptions:
    host: str
    to: tuple[str, ...] = ()
    parallel: int = 4
    skip_blocked: bool = False
    downtime_ms: int = 300
    bandwidth_bps: int | None = None
    stall_warn_s: float = 10.0
    stall_timeout_s: float = 60.0
    max_attempts: int = 2  # a guest whose migration failed is tried once more, elsewhere
    calc_time_s: int = 1

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "to": list(self.to)}


@dataclass
class Prepared:
    fleet: Any
    options: EvacOptions
    record: EvacRecord
    plan: EvacPlan
    guests: dict[str, Guest]
    targets: dict[str, Target]
    adopted: dict[str, tuple[str, str, Guest]]  # vm -> (migration id, target, guest): in flight already
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # the record's moved guests
    notes: list[str] = field(default_factory=list)
    cordoned_now: bool = False  # this run cordoned the host (lifted again if nothing starts)

    @property
    def refusal(self) -> str | None:
        return self.plan.refusal(self.options.skip_blocked)


def check_names(fleet: Any, options: EvacOptions) -> None:
    names = fleet.names
    for name in (options.host, *options.to):
        if name not in names:
            raise EvacError(f"{name}: no such host in the inventory (hosts: {', '.join(names)})", EXIT_UNKNOWN)
    if options.host in options.to:
        raise EvacError(f"--to {options.host}: the host being evacuated cannot be a target", EXIT_UNKNOWN)


async def prepare(fleet: Any, options: EvacOptions, *, trust: Any = None,
                  say: Callable[[str], None] = lambda _s: None) -> Prepared:
    """Everything before the first migration: recover this host's stranded migrations, probe the
    fleet, measure dirty rates, run every preflight, plan. Blocking parts run in threads."""
    from sevconsole.engine import audit, cordon, evac_measure, recover
    from sevconsole.engine.ssh import SshHost
    from sevconsole.hosts.discovery import discover

    check_names(fleet, options)
    host, where = options.host, fleet.where()
    record = evac_record.unfinished(host, where) or evac_record.new(host, where, options.to_json())
    record.options = options.to_json()
    try:  # first: from now on no migration, of this evacuation or any other, goes to the host
        entry, cordoned_now = cordon.cordon(host, f"evacuation {record.id}", audit.operator_name())
    except cordon.CordonError as exc:
        raise EvacError(f"{host} cannot be cordoned: {exc}; nothing was started", EXIT_REFUSED) from None
    say(f"{host} cordoned (evacuation {record.id})" if cordoned_now else entry.sentence())
    if any(host in (e.source, e.target) for e in recover.pending()):
        say(f"recovering the unfinished migrations of {host} first ...")
        for r in await asyncio.to_thread(recover.recover_all, fleet):
            say(f"  {r.vm} ({r.source} -> {r.target}): {r.result}: {r.sentence}")
    in_flight = {e.vm: e for e in journal.entries()
                 if e.in_flight and e.source == host and (e.job.get("where") or {}) == where}
    say(f"probing {', '.join(fleet.names)} ...")
    pool = fleet.options.pool()
    try:
        reports = {r.name: r for r in await asyncio.to_thread(discover, list(fleet.hosts), fleet.options,
                                                                     pool=pool)}
        source = reports[host]
        if not source.reachable or source.hostname is None:
            why = "; ".join(source.errors) or "no answer"
            raise EvacError(f"{host} cannot be probed ({why}); nothing was started", EXIT_REFUSED)
        vms = _guests_on(source)
        to_plan = [vm for vm in vms if vm.name not in in_flight]
        targets = [reports[n] for n in fleet.names if n != host and (not options.to or n in options.to)]
        sev_vms = [vm for vm in to_plan if vm.sev_enabled and not vm.migration_blocker]
        dirty: dict[str, DirtyRate | str] = {}
        if sev_vms:
            say(f"measuring the dirty rate of {', '.join(vm.name for vm in sev_vms)} "
                f"({options.calc_time_s} s) ...")
            link = SshHost(host, source.address, await asyncio.to_thread(fleet.connection, pool, host))
            try:
                dirty = await evac_measure.measure(link, source, sev_vms, calc_time_s=options.calc_time_s)
            finally:
                await link.close()
    finally:
        pool.close()
    notes = [v for v in dirty.values() if isinstance(v, str)]
    guests: dict[str, Guest] = {}
    for vm in vms:
        checks = {t.name: tuple(preflight(_migration_plan(vm, source, t, options), trust)) for t in targets}
        rate = dirty.get(vm.name)
        guests[vm.name] = Guest(vm.name, vm.sev_enabled, vm.memory_mib or 0, checks,
                                rate if isinstance(rate, DirtyRate) else None, vm.migration_blocker)
    target_info = {t.name: Target(t.name, _free_mib(t)) for t in targets}
    planned = [g for name, g in guests.items() if name not in in_flight]
    plan = plan_evacuation(host, planned, list(target_info.values()), psp_rate=REFERENCE_PSP_PPS, notes=notes)
    adopted = {vm: (e.id, e.target, guests[vm]) for vm, e in in_flight.items() if vm in guests}
    on_host = {vm.name for vm in vms}
    earlier = _moved_earlier(record, on_host)
    record.plan = plan.to_json()
    return Prepared(fleet, options, record, plan, guests, target_info, adopted, earlier, notes, cordoned_now)


def abandon(prepared: Prepared, code: int) -> str | None:
    """Nothing was started (refused, not confirmed, nothing to move): the record is closed and a
    cordon this run made is lifted again. Returns a sentence about the cordon."""
    from sevconsole.engine import cordon

    prepared.record.finished, prepared.record.exit = True, code
    with contextlib.suppress(OSError):
        prepared.record.save()
    host = prepared.options.host
    if prepared.cordoned_now and (prepared.plan.moves or prepared.plan.blockers):
        with contextlib.suppress(OSError):
            cordon.uncordon(host)
            return f"{host} uncordoned again: nothing was started"
    return None if not prepared.cordoned_now else f"{host} stays cordoned (`sevconsole uncordon {host}`)"


def _moved_earlier(record: EvacRecord, on_host: set[str]) -> dict[str, dict[str, Any]]:
    """Guests of an earlier run of this evacuation that left the host: recorded as moved, or
    whose last migration's journal says it ended on its target (it finished while no
    `evacuate` was watching)."""
    out = {}
    for vm, g in record.guests.items():
        if vm in on_host:
            continue
        if g.get("status") == "moved":
            out[vm] = g
            continue
        ids = g.get("migrations") or []
        with contextlib.suppress(journal.JournalError, OSError):
            entry = journal.entry(str(ids[-1])) if ids else None
            outcome = (entry.outcome if entry is not None and entry.finished else None) or {}
            if list(outcome.get("runnable") or []) == [g.get("target")]:
                out[vm] = {**g, "status": "moved"}
    return out


def _guests_on(report: Any) -> list[Any]:
    """One runnable (or paused) copy per guest name: a SENT copy left by a migration or a
    failed incoming VM is not a guest of this host."""
    from sevconsole.hosts.fleet import pick_vm

    names = list(dict.fromkeys(vm.name for vm in report.vms))
    picked = [pick_vm([report], name) for name in names]
    return [vm for vm in picked if vm is not None and vm.status in RUNNABLE and vm.firmware_guest_state != 6]


def _free_mib(report: HostReport) -> int | None:
    return report.mem_available_mib


def _migration_plan(vm: Any, source: Any, target: Any, options: EvacOptions) -> MigrationPlan:
    return MigrationPlan(vm=vm, source=source, target=target, downtime_limit_ms=options.downtime_ms,
                         bandwidth_bps=options.bandwidth_bps, stall_warn_s=options.stall_warn_s,
                         stall_timeout_s=options.stall_timeout_s)


# -- the run


@dataclass
class _Flight:
    move: Move
    spawned_at: float
    migration_id: str | None = None
    progress: Progress | None = None
    client: Any = None
    stream_t0: float | None = None
    stream_pages0: int = 0
    solo: bool = True
    sampled: bool = False


Decide = Callable[..., evac_schedule.Decision]


class Evacuation:
    """Runs a Prepared plan; `on_view(EvacView)` gets a snapshot at every change."""

    def __init__(self, prepared: Prepared, on_view: Callable[[EvacView], None], *,
                 decide: Decide = evac_schedule.decide, spawn: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.p = prepared
        self.host = prepared.options.host
        self.on_view = on_view
        self.decide = decide
        self._spawn = spawn
        self.pending: dict[str, Move] = {m.vm: m for m in prepared.plan.moves}
        self.flights: dict[str, _Flight] = {}
        self.rows: dict[str, Row] = {}
        self.rates: dict[str, float] = {}
        self.lead_samples: list[float] = []
        self.attempts: dict[str, int] = {}
        self.committed: dict[str, int] = {}  # target -> MiB moved or moving there in this run
        self.cancel_reason: str | None = None
        self.notes: list[str] = list(prepared.notes)
        self.wake = asyncio.Event()
        self.t0 = time.monotonic()
        self.exit_code: int | None = None
        self._last: EvacView | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._init_rows()

    # rows and the record
    def _init_rows(self) -> None:
        rec = self.p.record
        for vm, g in self.p.earlier.items():
            self.rows[vm] = Row(vm, bool(g.get("sev")), "moved", g.get("target"),
                                note=f"moved earlier ({', '.join(g.get('migrations') or [])})",
                                attempts=len(g.get("migrations") or []))
            rec.guest(vm)["status"] = "moved"
        for m in self.p.plan.moves:
            self.rows[m.vm] = Row(m.vm, m.sev, "waiting", m.target, note=m.reason)
            rec.guest(m.vm).update(status="waiting", target=m.target, sev=m.sev, sentence=m.reason)
        for b in self.p.plan.blockers:
            self.rows[b.vm] = Row(b.vm, self.p.guests[b.vm].sev, "blocked", note=b.sentence)
            rec.guest(b.vm).update(status="blocked", target=None, sev=self.p.guests[b.vm].sev, sentence=b.sentence)
        for vm, (mid, target, guest) in self.p.adopted.items():
            self.rows[vm] = Row(vm, guest.sev, "migrating", target, phase="attached",
                                note="in flight before this evacuation started", migration_id=mid)
            rec.guest(vm).update(status="migrating", target=target, sev=guest.sev)
            if mid not in rec.guest(vm)["migrations"]:
                rec.guest(vm)["migrations"].append(mid)

    def _set(self, vm: str, save: bool = False, **changes: Any) -> None:
        self.rows[vm] = replace(self.rows[vm], **changes)
        if save:
            g = self.p.record.guest(vm)
            row = self.rows[vm]
            g.update(status=row.status, target=row.target, sentence=row.note)
            self._save()
        self._post()

    def _save(self) -> None:
        with contextlib.suppress(OSError):  # the journals stay the truth; a record is a convenience
            self.p.record.excluded = dict(self.excluded)
            self.p.record.save()

    @property
    def excluded(self) -> dict[str, str]:
        return self.p.record.excluded

    def view(self) -> EvacView:
        order = [m.vm for m in self.p.plan.moves] + [b.vm for b in self.p.plan.blockers]
        rows = sorted(self.rows.values(), key=lambda r: (order.index(r.vm) if r.vm in order else -1, r.vm))
        left = evac_schedule.estimate_left(self._jobs(), self._flight_views(), self.rates)
        return EvacView(self.p.record.id, self.host, tuple(rows),
                        summarize(rows, left, time.monotonic() - self.t0), tuple(self.notes),
                        done=self.exit_code is not None, exit_code=self.exit_code)

    def _post(self) -> None:
        view = self.view()
        if self._last is not None and view.rows == self._last.rows and view.done == self._last.done \
                and view.notes == self._last.notes and view.summary.moved == self._last.summary.moved:
            return
        self._last = view
        self.on_view(view)

    # schedule inputs
    def _jobs(self) -> list[evac_schedule.Job]:
        return [evac_schedule.Job(m.vm, self.host, m.target, m.sev, m.pages,
                                  None if m.dirty is None else m.dirty.high) for m in self.pending.values()]

    def _flight_views(self) -> list[evac_schedule.Flight]:
        out = []
        for f in self.flights.values():
            p, m = f.progress, f.move
            plan_dirty = None if m.dirty is None else m.dirty.high
            if p is None:
                out.append(evac_schedule.Flight(m.vm, self.host, m.target, m.sev, dirty=plan_dirty, pages=m.pages))
                continue
            measured = p.dirty_pages_per_s if p.phase is Phase.PRECOPY and p.pass_number >= 2 else None
            out.append(evac_schedule.Flight(
                m.vm, self.host, m.target, m.sev, phase=p.phase.value,
                remaining_pages=p.bytes_remaining // max(p.page_size, 1) if p.bytes_total else None,
                pages_per_s=p.pages_per_s, dirty=measured if measured is not None else plan_dirty, pages=m.pages))
        return out

    def lead_s(self) -> float:
        if not self.lead_samples:
            return evac_schedule.DEFAULT_LEAD_S
        lo, hi = LEAD_BOUNDS_S
        return min(hi, max(lo, statistics.median(self.lead_samples)))

    # the loop
    async def run(self) -> int:
        self._save()
        for vm, (mid, _target, _guest) in self.p.adopted.items():
            move = Move(vm, _target, "in flight before this evacuation started", (_target,), _guest.sev,
                        _guest.mem_mib, _guest.dirty)
            # started elsewhere: neither its set-up time nor its page rate is measured here
            flight = _Flight(move, time.monotonic(), migration_id=mid, stream_t0=time.monotonic(), solo=False)
            self.flights[vm] = flight
            self._task(self._follow(flight))
        self._post()
        try:
            while self.pending or self.flights:
                if self.cancel_reason is None:
                    self._schedule()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.5)
                self.wake.clear()
                self._post()
        finally:
            for task in list(self._tasks):
                task.cancel()
        bad = any(r.status in ("failed", "needs-operator") for r in self.rows.values())
        self.exit_code = EXIT_FAILED if bad or self.cancel_reason is not None else EXIT_DONE
        self.p.record.finished = True
        self.p.record.exit = self.exit_code
        self._save()
        self._post()
        return self.exit_code

    def cancel(self, reason: str) -> None:
        """Start nothing more; ask every runner to cancel (guests stay on the host)."""
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        for vm in list(self.pending):
            self._set(vm, save=True, status="skipped", note=f"not started: {reason}")
        self.pending.clear()
        for f in self.flights.values():
            if f.client is not None:
                self._task(f.client.cancel(reason))
        self.wake.set()

    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self) -> None:
        decision = self.decide(self._jobs(), self._flight_views(), self.rates,
                               parallel=self.p.options.parallel, lead_s=self.lead_s())
        for start in decision.start:
            move = self.pending.pop(start.vm)
            flight = _Flight(move, time.monotonic())
            self.flights[move.vm] = flight
            self.committed[move.target] = self.committed.get(move.target, 0) + move.mem_mib
            self._set(move.vm, save=True, status="starting", target=move.target, phase="spawning",
                      note=start.why, attempts=self.attempts.get(move.vm, 0) + 1)
            self._task(self._fly(flight))
        for vm, why in decision.waiting:
            if vm in self.rows and self.rows[vm].note != why:
                self._set(vm, note=why)

    async def _fly(self, flight: _Flight) -> None:
        from sevconsole.engine.runner import RunnerError, spawn

        m, o = flight.move, self.p.options
        job = {"vm": m.vm, "source": self.host, "target": m.target, "where": self.p.fleet.where(),
               "downtime_ms": o.downtime_ms, "bandwidth_bps": o.bandwidth_bps, "stall_warn_s": o.stall_warn_s,
               "stall_timeout_s": o.stall_timeout_s, "evacuation": self.p.record.id}
        try:
            flight.migration_id = await asyncio.to_thread(self._spawn or spawn, job)
        except (RunnerError, OSError, journal.JournalError) as exc:
            self._attempt_failed(flight, f"its runner did not start: {exc}", drop_target=False)
            return
        self.p.record.guest(m.vm)["migrations"].append(flight.migration_id)
        self._set(m.vm, save=True, migration_id=flight.migration_id)
        await self._follow(flight)

    async def _follow(self, flight: _Flight) -> None:
        from sevconsole.engine.attach import Ended, RunnerClient, RunnerGone, Snapshot
        from sevconsole.engine.runner import RunnerError

        assert flight.migration_id is not None
        try:
            client = await RunnerClient.connect(flight.migration_id)
        except RunnerError as exc:
            await self._runner_gone(flight, str(exc))
            return
        flight.client = client
        if self.cancel_reason is not None:
            await client.cancel(self.cancel_reason)
        try:
            async for message in client.messages():
                if isinstance(message, Snapshot):
                    self._progress(flight, message.progress)
                elif isinstance(message, Ended):
                    self._ended(flight, message.outcome.runnable, message.outcome.message,
                                message.outcome.result)
                    return
                elif isinstance(message, RunnerGone):
                    await self._runner_gone(flight, message.sentence)
                    return
            await self._runner_gone(flight, "the runner's socket closed")
        finally:
            flight.client = None
            await client.close()

    def _progress(self, flight: _Flight, p: Progress) -> None:
        flight.progress = p
        now, m = time.monotonic(), flight.move
        if flight.stream_t0 is None and p.phase in (Phase.SEND_START, Phase.PRECOPY):
            # pages flow from here on (a fast host may skip pre-copy between two snapshots)
            flight.stream_t0, flight.stream_pages0 = now, p.pages_transferred
            self.lead_samples.append(now - flight.spawned_at)
        if p.phase is Phase.PRECOPY:
            if any(f is not flight and f.progress is not None and f.progress.phase is Phase.PRECOPY and f.move.sev
                   and {self.host, f.move.target} & {self.host, m.target} for f in self.flights.values()):
                flight.solo = False
            t0 = flight.stream_t0  # set above at the latest: pre-copy streams pages
            if m.sev and p.pass_number == 1 and flight.solo and t0 is not None and now - t0 >= MIN_RATE_WINDOW_S:
                self._rate_sample(flight, (p.pages_transferred - flight.stream_pages0) / (now - t0))
        total = p.bytes_total
        pct = 100.0 * (total - p.bytes_remaining) / total if total else None
        view = next((v for v in self._flight_views() if v.vm == m.vm), None)
        eta = p.eta_s if p.eta_s is not None else (evac_schedule.time_left(view, self.rates) if view else None)
        self._set(m.vm, status="migrating", phase=p.phase.value, percent=pct,
                  pages_per_s=p.pages_per_s or None, eta_s=None if eta is None or eta == float("inf") else eta)
        self.wake.set()

    def _rate_sample(self, flight: _Flight, rate: float) -> None:
        if rate <= 0:
            return
        flight.sampled = True
        first = self.host not in self.rates
        self.rates[self.host] = rate
        self.rates.setdefault(flight.move.target, rate)
        if first:
            self.notes.append(f"{self.host}'s PSP measured at {rate:.0f} pages/s ({flight.move.vm}'s pre-copy)")

    def _ended(self, flight: _Flight, runnable: tuple[str, ...], message: str, result: str, *,
               target_at_fault: bool = True) -> None:
        m = flight.move
        p = flight.progress
        if m.sev and not flight.sampled and flight.solo and flight.stream_t0 is not None and p is not None:
            span = time.monotonic() - flight.stream_t0
            if span > 0:
                self._rate_sample(flight, (p.pages_transferred - flight.stream_pages0) / span)
        self.flights.pop(m.vm, None)
        if tuple(runnable) == (m.target,):
            self._set(m.vm, save=True, status="moved", phase="done", percent=100.0, eta_s=None,
                      pages_per_s=None, note=f"runs on {m.target}")
        elif tuple(runnable) == (self.host,):
            # a cancel (the operator's) is nobody's fault: the target stays in the plan
            self._attempt_failed(flight, f"{result}: {message}",
                                 drop_target=target_at_fault and self.cancel_reason is None)
        else:
            where = ", ".join(runnable) or "no host"
            self.committed[m.target] = self.committed.get(m.target, 0) - m.mem_mib
            self._set(m.vm, save=True, status="needs-operator", phase=result, eta_s=None,
                      note=f"{message}; runnable on: {where}: see `sevconsole migrations` and `sevconsole recover`")
        self.wake.set()

    async def _runner_gone(self, flight: _Flight, sentence: str) -> None:
        """The runner ended without telling us: read its journal, or reconcile it (recover)."""
        from sevconsole.engine import recover

        mid = flight.migration_id
        assert mid is not None
        for _ in range(50):  # a runner still holding its lock is finishing: wait for it
            entry = journal.entry(mid)
            if not entry.runner_alive:
                break
            await asyncio.sleep(0.1)
        if not entry.finished:
            results = await asyncio.to_thread(recover.recover_all, self.p.fleet)
            mine = next((r for r in results if r.id == mid), None)
            if mine is not None and mine.result == "reconciled":  # our runner died, not the target
                self._ended(flight, tuple(mine.runnable), f"{sentence}; recovered: {mine.sentence}", "recovered",
                            target_at_fault=False)
                return
            entry = journal.entry(mid)
        outcome = entry.outcome or {}
        runnable = tuple(outcome.get("runnable") or ())
        self._ended(flight, runnable, str(outcome.get("message") or sentence), str(outcome.get("result") or "gone"),
                    target_at_fault=entry.finished)

    def _attempt_failed(self, flight: _Flight, why: str, *, drop_target: bool) -> None:
        m = flight.move
        self.flights.pop(m.vm, None)
        self.committed[m.target] = self.committed.get(m.target, 0) - m.mem_mib
        self.attempts[m.vm] = self.attempts.get(m.vm, 0) + 1
        dropped = drop_target and m.target not in self.excluded
        if dropped:
            self.excluded[m.target] = f"{m.vm}'s migration to {m.target} failed ({why})"
            self.notes.append(f"{m.target} dropped from the plan: {self.excluded[m.target]}")
        retry = self.cancel_reason is None and self.attempts[m.vm] < self.p.options.max_attempts
        self._set(m.vm, save=True, status="failed", phase="", eta_s=None, pages_per_s=None, percent=None,
                  note=f"stays on {self.host}: {why}")
        if dropped or retry:
            self._replan([m.vm] if retry else [])
        self.wake.set()

    def _replan(self, again: list[str]) -> None:
        """The guests not started yet (and `again`) over the targets still in the plan."""
        names = list(self.pending) + [vm for vm in again if vm not in self.pending]
        if not names:
            return
        targets = [Target(t.name, None if t.free_mib is None else t.free_mib - self.committed.get(t.name, 0))
                   for t in self.p.targets.values() if t.name not in self.excluded]
        rate = self.rates.get(self.host, self.p.plan.psp_rate)
        plan = plan_evacuation(self.host, [self.p.guests[n] for n in names], targets, psp_rate=rate)
        self.pending = {m.vm: m for m in plan.moves}
        for m in plan.moves:
            retried = " (tried again)" if m.vm in again else ""
            self._set(m.vm, save=True, status="waiting", target=m.target, note=f"re-planned{retried}: {m.reason}")
        for b in plan.blockers:
            self._set(b.vm, save=True, status="failed", target=None,
                      note=f"stays on {self.host}: {b.sentence}")
