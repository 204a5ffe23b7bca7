"""LibvirtMigration: a libvirt domain moved by libvirt's own live migration.

The same contract as engine/run.py's Migration (run() -> Outcome, cancel(), latest, on_progress,
on_step journal records, the audit line), driven by the same runner: only the way the guest moves
differs. libvirt starts the incoming QEMU, streams the guest and finishes or rolls back by itself;
the engine starts it (peer to peer, or with virsh as the managing client: the operator's choice
in the inventory), folds `domjobinfo` into Progress, cancels with `domjobabort`, and at the end
counts the copies that can run from both libvirts (the census), as every migration does.

A plain guest only: an SEV domain is refused by preflight with libvirt's own sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sevconsole.engine.checks import Check, refused
from sevconsole.engine.errors import LinkError
from sevconsole.engine.fold import ProgressFolder
from sevconsole.engine.libvirt_link import LibvirtHost
from sevconsole.engine.machine import Step
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import (
    Outcome,
    ProgressCallback,
    Result,
    StallCallback,
    StepCallback,
    audited,
    measured,
    refused_outcome,
    uri_host,
)
from sevconsole.hosts.libvirt import STATES

JOB_STATUS = {"unbounded": "active", "bounded": "active", "completed": "completed", "failed": "failed",
              "cancelled": "cancelled", "none": "none"}
RUNNABLE = ("running", "paused")


def job_as_query_migrate(job: dict[str, Any]) -> dict[str, Any]:
    """`domjobinfo --rawstats` in the shape of QEMU's query-migrate, for the ProgressFolder."""
    def num(key: str) -> int:
        value = job.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    info: dict[str, Any] = {"status": JOB_STATUS.get(str(job.get("job_type", "none")), "active"),
                            "ram": {"transferred": num("memory_processed"), "remaining": num("memory_remaining"),
                                    "total": num("memory_total"), "page-size": num("memory_page_size") or 4096,
                                    "normal": num("memory_normal"), "duplicate": num("memory_constant"),
                                    "dirty-sync-count": num("memory_iteration"),
                                    "dirty-pages-rate": num("memory_dirty_rate")}}
    if num("downtime"):
        info["expected-downtime"] = num("downtime")
    return info


class LibvirtMigration:
    def __init__(self, plan: MigrationPlan, source: LibvirtHost, target: LibvirtHost, *,
                 checks: Sequence[Check] = (), on_progress: ProgressCallback | None = None,
                 on_stall: StallCallback | None = None, poll_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, audit_log: Path | None | bool = True,
                 on_step: StepCallback | None = None) -> None:
        self.plan = plan
        self.source, self.target = source, target
        self.checks = tuple(checks)
        self.poll_interval_s = poll_interval_s
        self._on_progress, self._on_step = on_progress, on_step
        self._clock = clock
        self._audit_log = audit_log
        self.folder = ProgressFolder(plan, clock)
        self._cancel = asyncio.Event()
        self._cancel_reason = "cancelled by the operator"
        self.step = Step.PLANNED
        self.outcome: Outcome | None = None

    # -- the same public face as Migration
    def cancel(self, reason: str = "cancelled by the operator") -> None:
        self._cancel_reason = reason
        self._cancel.set()

    @property
    def incoming(self) -> None:
        return None  # libvirt's own incoming QEMU: never ours to stop

    @property
    def latest(self) -> Progress:
        return self.folder.snapshot()

    async def run(self) -> Outcome:
        t0 = self._clock()
        try:
            outcome = await self._run()
        except Exception as exc:  # a bug here must still end with the census of both ends
            self.folder.error(f"engine error: {type(exc).__name__}: {exc}")
            outcome = await self._settle(None, f"engine error ({type(exc).__name__}: {exc})", started=True)
        self.outcome = measured(outcome, self.folder, self._clock() - t0)
        self._post()
        return replace(audited(self.plan, self.checks, self.outcome, self._audit_log), progress=self.folder.snapshot())

    def _record(self, step: Step, **data: Any) -> None:
        self.step = step
        if self._on_step is not None:
            self._on_step(step, data)

    def _post(self) -> None:
        if self._on_progress is not None:
            with contextlib.suppress(Exception):  # a broken watcher must not strand the guest
                self._on_progress(self.folder.snapshot())

    # -- the flow
    async def _run(self) -> Outcome:
        f, plan, uuid = self.folder, self.plan, self.plan.vm.libvirt
        if refused(self.checks) or uuid is None:
            return refused_outcome(f, self.checks, plan.source.name, f"{plan.vm.name} is not a libvirt domain")
        f.phase(Phase.CONNECTING)
        self._post()
        try:
            before = await self.source.state(uuid)
        except LinkError as exc:
            f.phase(Phase.FAILED)
            f.error(str(exc))
            return Outcome(Result.FAILED, f"nothing started: {exc}", runnable=(plan.source.name,))
        state = before.get("state")
        if state not in RUNNABLE:
            f.phase(Phase.FAILED)
            why = f"{plan.vm.name} is '{state}' on {plan.source.name}, not running or paused" if state else \
                f"libvirt on {plan.source.name} has no domain {plan.vm.name} ({before.get('said')})"
            f.error(why)
            return Outcome(Result.FAILED, f"nothing started: {why}", runnable=(plan.source.name,) if state else ())
        self._was_running = state == "running"
        if self._cancel.is_set():
            f.phase(Phase.CANCELLED)
            return Outcome(Result.CANCELLED, f"{self._cancel_reason}; nothing was started", runnable=(plan.source.name,))
        move = bool(before.get("persistent")) and not plan.keep_source  # the definition moves too
        self._record(Step.PLANNED, vm=plan.vm.name, sev=False, source=plan.source.name, target=plan.target.name,
                     source_qmp=plan.vm.qmp_path, source_was_running=self._was_running, libvirt=uuid,
                     mode=self.source.mode)
        options: dict[str, Any] = {"undefine_source": move, "migrate_uri": f"tcp://{uri_host(plan.target.address)}",
                                   "downtime_ms": int(plan.downtime_limit_ms)}
        if _is_ip(plan.target.address):
            options["listen_address"] = plan.target.address
        if plan.bandwidth_bps:
            options["bandwidth_mib"] = max(1, int(plan.bandwidth_bps) >> 20)
        self._record(Step.STREAMING, dest_uri=self.target.uri, **options)
        f.phase(Phase.SEND_START)
        f.event(f"{plan.source.name}: libvirt migrates {plan.vm.name} to {plan.target.name} "
                f"({'peer to peer' if self.source.mode == 'p2p' else 'virsh as the client'}, {self.target.uri})")
        self._post()
        try:
            started = await self.source.migrate(uuid, self.target.uri, **options)
        except LinkError as exc:
            f.error(str(exc))
            return await self._settle(None, f"libvirt did not start the migration: {exc}", started=False)
        return await self._watch(uuid, str(started.get("stem")), move)

    async def _watch(self, uuid: str, stem: str, move: bool) -> Outcome:
        f, plan = self.folder, self.plan
        aborted = False
        while True:
            if self._cancel.is_set() and not aborted:
                aborted = True
                f.event(f"{plan.source.name}: domjobabort ({self._cancel_reason})")
                with contextlib.suppress(LinkError):
                    answer = await self.source.abort(uuid)
                    if not answer.get("aborted"):
                        f.event(f"{plan.source.name}: libvirt: {answer.get('said') or 'no job to abort'}")
            try:
                info = await self.source.job(uuid, stem)
            except LinkError as exc:
                f.error(str(exc))
                return await self._settle(None, f"{plan.source.name} could not be asked about the migration: {exc}",
                                          started=True, move=move)
            raw = info.get("job")
            job: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if job.get("job_type") not in (None, "none"):
                f.fold_migrate(job_as_query_migrate(job))
            rc = info.get("migrate_rc")
            if isinstance(rc, int):
                with contextlib.suppress(LinkError):
                    await self.source.job(uuid, stem, tidy=True)  # its log and status files go
                if rc == 0 and job.get("job_type") != "completed":
                    await self._final_figures(uuid)
                return await self._settle(rc, str(info.get("migrate_said") or ""), started=True, move=move)
            self._stall()
            self._post()
            if self._cancel.is_set():
                await asyncio.sleep(self.poll_interval_s)
            else:  # a cancel wakes the loop at once
                await _sleep_or(self._cancel, self.poll_interval_s)

    async def _final_figures(self, uuid: str) -> None:
        """A migration over between two polls: the figures libvirt kept of the completed job (the
        source's are gone with its domain when the definition moved; the target's incoming job has them)."""
        for link in (self.source, self.target):
            with contextlib.suppress(LinkError):
                job = (await link.job(uuid)).get("job")
                if isinstance(job, dict) and job.get("job_type") == "completed":
                    self.folder.fold_migrate(job_as_query_migrate(job))
                    return

    def _stall(self) -> None:
        idle = self._clock() - self.folder.last_progress_at
        if idle >= self.plan.stall_timeout_s and not self._cancel.is_set():
            self.cancel(f"stalled: no progress for {idle:.0f} s (stall timeout {self.plan.stall_timeout_s:g} s)")

    async def _settle(self, rc: int | None, said: str, *, started: bool, move: bool = False) -> Outcome:
        """libvirt finished or rolled back by itself: journal what happened, count the copies."""
        f, plan, uuid = self.folder, self.plan, self.plan.vm.libvirt or ""
        src = await self._state(self.source, uuid)
        dst = await self._state(self.target, uuid)
        was_running = getattr(self, "_was_running", True)
        runnable = tuple(name for name, state in ((plan.source.name, src), (plan.target.name, dst))
                         if state == "running" or (state == "paused" and not was_running))
        if rc == 0 and dst in RUNNABLE:
            self._record(Step.SEND_FINISHED, why="libvirt completed the migration")
            self._record(Step.TARGET_CONFIRMED, target_status=dst)
            if src is None:  # the source QEMU is gone and (persistent) its definition moved with it
                self._record(Step.SOURCE_RETIRED, how="libvirt ended the source QEMU"
                             + (" and undefined the domain there" if move else ""))
        elif started:
            self._record(Step.ROLLBACK_CHOSEN, why=said or "libvirt ended the migration")
        cancelled = self._cancel.is_set() and rc != 0
        problems = [] if len(runnable) == 1 else [f"{len(runnable)} runnable copies ({', '.join(runnable) or 'none'})"]
        for text in problems:
            f.error(text)
        if rc == 0 and runnable == (plan.target.name,):
            f.phase(Phase.DONE)
            kept = f"; its definition stays on {plan.source.name} (--keep-source)" if src == "shut off" else ""
            message = (f"{plan.vm.name} now runs on {plan.target.name}; libvirt stopped the source copy"
                       f"{' and moved its definition' if move else ''}{kept}")
            result = Result.DONE
        else:
            f.phase(Phase.CANCELLED if cancelled else Phase.FAILED)
            reason = self._cancel_reason if cancelled else (f"libvirt: {said}" if said else "the migration failed")
            where = f"{plan.vm.name} runs on {plan.source.name}" if src == "running" else \
                f"{plan.vm.name} is '{src}' on {plan.source.name}"
            message = f"{reason}; {where}" + (f"; but: {'; '.join(problems)}" if problems else "")
            result = Result.CANCELLED if cancelled else Result.FAILED
            if not cancelled:
                f.error(reason)
        return Outcome(result, message, runnable=runnable, source_status=src, target_status=dst)

    async def _state(self, link: LibvirtHost, uuid: str) -> str | None:
        """A QEMU-style run state of the domain on that host; None when libvirt has no such domain."""
        try:
            state = (await link.state(uuid)).get("state")
        except LinkError as exc:
            self.folder.error(str(exc))
            return "unknown"
        return None if state is None else STATES.get(str(state), str(state))


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


