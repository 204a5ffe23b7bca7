"""Migration: one run of the engine, from the incoming VM to a verified end.

Source and target are reached through HostLink objects (engine/links.py). The run loop issues
QMP commands, watches with events and polls at a steady cadence (one poll at a time), folds what
it sees into Progress snapshots, and at the end checks the invariant: exactly one runnable copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from sevconsole.engine import audit
from sevconsole.engine.checks import Check, refused
from sevconsole.engine.endpoint import QMP_TIMEOUT_S, Endpoint
from sevconsole.engine.errors import EngineError, LinkError
from sevconsole.engine.fold import ProgressFolder
from sevconsole.engine.links import HostLink, IncomingVm, QemuGone
from sevconsole.engine.machine import Action, EndState, Facts, Observation, Step, takes_over
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.sev.status import GuestState

SEV_PARAMS = ("sev-pdh", "sev-plat-cert", "sev-amd-cert")
SEV_INFO_COMMANDS = ("migrate-set-sev-info", "migrate-sev-set-info")  # the series spells it both ways
LAB_PAGE_STATE = "x-query-sev-page-state"
LAB_FIRMWARE = "x-query-sev-firmware"
LAB_SET = "x-lab-set"  # lab knobs
HELD_FINISH = "x-sev-receive-finish"  # lab: finish an incoming guest held after a lost last frame
LAB_DIGEST = "x-query-guest-digest"
TERMINAL = ("completed", "failed", "cancelled")
SETTLED = ("postmigrate", "paused", "running", "shutdown", "guest-panicked", "internal-error")
RECONNECT_S = 3.0
TARGET_LOAD_S = 30.0  # how long a target may take to load the end of the stream

ProgressCallback = Callable[[Progress], None]
StallCallback = Callable[[Progress], "bool | Awaitable[bool]"]
StepCallback = Callable[[Step, dict[str, Any]], None]  # the journal: must be durable when it returns


class Result(StrEnum):
    """How a run ended; a StrEnum, so it compares equal to (and serialises as) its old string."""
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUSED = "refused"


@dataclass(frozen=True)
class Outcome:
    result: Result  # a plain string of the same value is narrowed to it (__post_init__)
    message: str
    runnable: tuple[str, ...] = ()  # hosts where the guest can run at the end
    source_status: str | None = None
    target_status: str | None = None
    source_guest_state: int | None = None  # firmware numbering (SENT = 6)
    target_guest_state: int | None = None
    digest_source: str | None = None
    digest_target: str | None = None
    bytes_transferred: int = 0
    duration_s: float = 0.0
    errors: tuple[str, ...] = ()
    target_pid: int | None = None  # the incoming QEMU on the target, when it still runs
    target_qmp: str | None = None
    progress: Progress | None = field(default=None, compare=False, repr=False)
    audit: str | None = field(default=None, compare=False)  # the line written to the audit log
    migration_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.result, Result):
            object.__setattr__(self, "result", Result(self.result))

    @property
    def one_copy(self) -> bool:
        """The invariant: exactly one runnable copy of the guest."""
        return len(self.runnable) == 1

    @property
    def digest_match(self) -> bool | None:
        if self.digest_source is None or self.digest_target is None:
            return None
        return self.digest_source == self.digest_target

    def to_wire(self) -> dict[str, Any]:
        """Every field but the progress snapshot, JSON-safe (the runner's socket, the journal)."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "progress"}
        data["runnable"] = list(self.runnable)
        data["errors"] = list(self.errors)
        return data

    @classmethod
    def from_wire(cls, data: Any) -> Outcome:
        if not isinstance(data, dict) or not isinstance(data.get("result"), str):
            raise ValueError("an outcome that is not a JSON object with a result")
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "progress"}
        values["runnable"] = tuple(str(x) for x in values.get("runnable", ()))
        values["errors"] = tuple(str(x) for x in values.get("errors", ()))
        values["message"] = str(values.get("message", ""))
        try:
            values["result"] = Result(values["result"])
        except ValueError:
            raise ValueError(f"an outcome with an unknown result {values['result']!r}") from None
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "message": self.message, "runnable": list(self.runnable),
                "one_copy": self.one_copy, "source_status": self.source_status,
                "target_status": self.target_status, "source_guest_state": self.source_guest_state,
                "target_guest_state": self.target_guest_state, "digest_match": self.digest_match,
                "bytes_transferred": self.bytes_transferred, "duration_s": round(self.duration_s, 3),
                "errors": list(self.errors)}


class _LinkLost(EngineError):
    pass


class _Refuse(LinkError):
    """A reason found at connect time not to start (not a broken link)."""


class _End(Exception):
    """Leaves the watch loop with the QEMU status that ended it."""

    def __init__(self, status: str, reason: str = "") -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason


class Migration:
    """Run with `await Migration(plan, source_link, target_link, checks=...).run()`.

    `on_progress` gets every snapshot; `on_stall` is asked (sync or async) whether to cancel when
    no byte moved for `plan.stall_timeout_s` (None: cancel). `cancel()` may be called any time.
    """

    def __init__(self, plan: MigrationPlan, source: HostLink, target: HostLink, *,
                 checks: Sequence[Check] = (), on_progress: ProgressCallback | None = None,
                 on_stall: StallCallback | None = None, poll_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 audit_log: Path | None | bool = True, on_step: StepCallback | None = None) -> None:
        self.plan = plan
        self._audit_log = audit_log  # True: the console's log (paths.audit_log_file()); False: none
        self.source = source
        self.target = target
        self.checks = tuple(checks)
        self.poll_interval_s = poll_interval_s
        self._on_progress = on_progress
        self._on_stall = on_stall
        self._clock = clock
        self.folder = ProgressFolder(plan, clock)
        self._cancel = asyncio.Event()
        self._cancel_reason = "cancelled by the operator"
        self._wake = asyncio.Event()
        self.src = Endpoint(plan.source.name, source, clock=clock)
        self.dst = Endpoint(plan.target.name, target, clock=clock)
        self._incoming: IncomingVm | None = None
        self._mig_status = "none"  # the source's last query-migrate status
        self._cancel_sent = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stall_warned = False
        self._source_initial: str | None = None
        self._src_status: str | None = None
        self.outcome: Outcome | None = None
        self._on_step = on_step
        self.step = Step.PLANNED

    # -- public
    def cancel(self, reason: str = "cancelled by the operator") -> None:
        self._cancel_reason = reason
        self._cancel.set()
        self._wake.set()

    @property
    def incoming(self) -> IncomingVm | None:
        """The target's incoming QEMU while it exists (None before launch and after a rollback)."""
        return self._incoming

    @property
    def latest(self) -> Progress:
        return self.folder.snapshot()

    async def run(self) -> Outcome:
        t0 = self._clock()
        try:
            try:
                outcome = await self._run()
            except Exception as exc:  # a bug here must still end with the guest in one place
                self.folder.error(f"engine error: {type(exc).__name__}: {exc}")
                outcome = await self._rollback(Result.FAILED, f"engine error ({type(exc).__name__}: {exc})")
        finally:
            for task in self._tasks:
                task.cancel()
            # the pumps' own ends (their CancelledError) are results here; ours would still raise
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.src.drop()
            await self.dst.drop()
        if self._incoming is not None:
            outcome = _with(outcome, target_pid=self._incoming.pid, target_qmp=self._incoming.qmp)
        self.outcome = measured(outcome, self.folder, self._clock() - t0)
        self._post()
        return _with(audited(self.plan, self.checks, self.outcome, self._audit_log), progress=self.folder.snapshot())

    def _record(self, step: Step, **data: Any) -> None:
        """A decision on which copy may run, made durable (journal) before it is acted on."""
        self.step = step
        if self._on_step is not None:
            self._on_step(step, data)

    # -- the flow
    async def _run(self) -> Outcome:
        f = self.folder
        if refused(self.checks):
            return refused_outcome(f, self.checks, self.plan.source.name)
        f.phase(Phase.CONNECTING)
        self._post()
        try:
            await self._connect_source()
        except (EngineError, QMPError, OSError) as exc:
            f.phase(Phase.FAILED)
            f.error(str(exc))
            return Outcome(Result.FAILED, f"nothing started: {exc}", runnable=(self.plan.source.name,))
        self._record(Step.PLANNED, vm=self.plan.vm.name, sev=self.plan.sev, source=self.plan.source.name,
                     target=self.plan.target.name, source_qmp=self.plan.vm.qmp_path,
                     source_was_running=self._source_initial == "running")
        try:
            port = await self._prepare_target()
            await self._configure_source()
        except (TimeoutError, EngineError, QMPError, OSError) as exc:  # _rollback reports it, once
            return await self._rollback(Result.FAILED, f"setup failed: {_sentence(exc)}")
        if self._cancel.is_set():
            return await self._rollback(Result.CANCELLED, self._cancel_reason)
        await self._lab_extras(baseline=True)  # the SEV log starts here, not at the guest's launch
        f.phase(Phase.SEND_START)
        self._post()
        self._record(Step.STREAMING)
        try:
            await self.src.execute("migrate", {"uri": f"tcp:{uri_host(self.target.address)}:{port}"})
        except (EngineError, QMPError, OSError) as exc:
            f.error(_sentence(exc))
            return await self._rollback(Result.FAILED, f"migrate refused: {_sentence(exc)}")
        try:
            end = await self._watch()
        except _LinkLost as exc:
            return await self._source_lost(str(exc))
        except LinkError as exc:  # the source answered a watch command with an error
            f.error(str(exc))
            return await self._rollback(Result.FAILED, str(exc))
        if end.status == "completed":
            self._record(Step.SEND_FINISHED, why="the source completed the stream")
            return await self._finish()
        if end.status == "cancelled" and self._cancel.is_set():
            return await self._rollback(Result.CANCELLED, self._cancel_reason)
        return await self._rollback(Result.FAILED, end.reason or f"migration {end.status}")

    async def _connect_source(self) -> None:
        vm = self.plan.vm
        if not vm.qmp_path:
            raise LinkError(self.source.name, f"{vm.name} has no QMP socket")
        await self.src.open(vm.qmp_path)
        status = await self.src.execute("query-status")
        self._source_initial = self._src_status = str(status.get("status"))
        if self._source_initial not in ("running", "paused"):
            raise LinkError(self.source.name, f"{vm.name} is '{self._source_initial}', not running or paused")
        if not vm.sev_enabled and "query-sev" in self.src.commands:
            answer: dict[str, Any] = {}
            with contextlib.suppress(LinkError):  # QEMU without SEV support answers with an error
                answer = await self.src.execute("query-sev")
            if answer.get("enabled"):
                raise _Refuse(self.source.name, f"{vm.name} is an SEV guest but the plan was made for "
                              "a plain one; an SEV guest is never migrated in plain. Probe again.")
        if vm.sev_enabled and not await self._sev_migration_method(self.src):
            raise LinkError(self.source.name, "QEMU offers neither the sev-pdh migration parameters nor "
                            "migrate-set-sev-info: SEV: Migration is not implemented")
        self._listen(self.src, ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"))

    async def _prepare_target(self) -> int:
        f = self.folder
        argv = tuple(self.plan.vm.argv)
        # -S: the target stays paused after the last page until its digest is compared (a host
        # helper that drops -S just lets it run, and then the digest may drift). A source that
        # itself arrived by migration may carry -S already; _finish resumes a paused target either way.
        if LAB_DIGEST in self.src.commands and "-S" not in argv:
            argv += ("-S",)
        self._incoming = await self.target.launch_incoming(argv)
        self._record(Step.TARGET_LAUNCHED, target_pid=self._incoming.pid, target_qmp=self._incoming.qmp)
        f.event(f"{self.target.name}: incoming VM started (pid {self._incoming.pid})")
        self._post()
        await self.dst.open(self._incoming.qmp)
        if self.plan.sev:
            if not await self._sev_migration_method(self.dst):
                raise LinkError(self.target.name, "its QEMU lacks the SEV migration commands: "
                                "SEV: Migration is not implemented")
            await self._check_target_pdh()
        self._listen(self.dst, ("MIGRATION", "RESUME", "STOP"))
        await self._enable_events(self.dst)
        await self.dst.execute("migrate-incoming", {"uri": f"tcp:{uri_host(self.target.address)}:0"})
        info = await self.dst.execute("query-migrate")
        for addr in info.get("socket-address") or []:
            if addr.get("type") == "inet" and addr.get("port"):
                return int(addr["port"])
        raise LinkError(self.target.name, "the incoming QEMU did not say which port it listens on")

    async def _check_target_pdh(self) -> None:
        """The PDH the source will encrypt to must be the one preflight verified."""
        caps = self.plan.target.capabilities
        if caps is None or "query-sev-capabilities" not in self.dst.commands:
            return
        try:
            live = await self.dst.execute("query-sev-capabilities")
        except LinkError:
            return
        pdh = live.get("pdh")
        if pdh and base64.b64decode(pdh) != caps.pdh:
            raise LinkError(self.target.name, "its PDH changed since the preflight verified it; "
                            "probe the host again before migrating")

    async def _configure_source(self) -> None:
        plan = self.plan
        params: dict[str, Any] = {"downtime-limit": int(plan.downtime_limit_ms)}
        if plan.bandwidth_bps is not None:
            params["max-bandwidth"] = max(1, int(plan.bandwidth_bps))
        await self.src.execute("migrate-set-parameters", params)
        with contextlib.suppress(LinkError):  # QEMU keeps parameters per VM: show the cap in effect
            effective = await self.src.execute("query-migrate-parameters")
            self.folder.set(extra={**self.folder.current.extra,
                                   "max_bandwidth_bps": effective.get("max-bandwidth")})
        await self._enable_events(self.src)
        if LAB_SET in self.src.commands:
            # a lab source records the guest digest while stopped for the last copy, so the
            # result can compare both ends (a real QEMU offers no digest at all)
            with contextlib.suppress(LinkError):
                await self.src.execute(LAB_SET, {"digest-on-send": True})
        if not plan.sev:
            return
        caps = plan.target.capabilities
        if caps is None:
            raise LinkError(plan.target.name, "no PDH and certificate chain to give the source")
        def b64(data: bytes | None) -> str:
            return base64.b64encode(data or b"").decode("ascii")

        method = await self._sev_migration_method(self.src)
        if method == "parameters":
            await self.src.execute("migrate-set-parameters", {
                "sev-pdh": b64(caps.pdh), "sev-plat-cert": b64(caps.cert_chain),
                "sev-amd-cert": b64(caps.amd_chain)})
        elif method is not None:
            await self.src.execute(method, {
                "pdh": b64(caps.pdh), "plat-cert": b64(caps.cert_chain), "amd-cert": b64(caps.amd_chain)})
        self.folder.event(f"{plan.source.name}: given {plan.target.name}'s PDH and chains ({method})")

    async def _enable_events(self, end: Endpoint) -> None:
        """QEMU sends MIGRATION/MIGRATION_PASS events only with the `events` capability on."""
        if not end.offers("migrate-set-capabilities"):
            return
        with contextlib.suppress(LinkError):  # an old or partial QEMU: the polls still see everything
            await end.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})

    async def _sev_migration_method(self, end: Endpoint) -> str | None:
        """"parameters" (sev-pdh & co. in query-migrate-parameters), the older command's name, or None."""
        try:
            params = await end.execute("query-migrate-parameters")
        except LinkError:
            params = {}
        if SEV_PARAMS[0] in params:
            return "parameters"
        return next((c for c in SEV_INFO_COMMANDS if end.offers(c)), None)

    # -- watching
    async def _watch(self) -> _End:
        f = self.folder
        loop_next = self._clock()
        while True:
            if self._cancel.is_set() and not self._cancel_sent:
                self._cancel_sent = True
                f.event(f"{self.plan.source.name}: migrate_cancel ({self._cancel_reason})")
                await self._src_call("migrate_cancel")
            info = await self._src_call("query-migrate")
            status = self._mig_status = str(info.get("status", "none"))
            f.fold_migrate(info)
            await self._lab_extras()
            self._phase_from(status)
            if status in TERMINAL:
                self._post()
                return _End(status, str(info.get("error-desc") or ""))
            await self._stall_check()
            self._post()
            loop_next += self.poll_interval_s
            now = self._clock()
            if loop_next < now:  # a slow poll: keep the cadence, never two at once
                loop_next = now
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=loop_next - now)

    def _phase_from(self, status: str) -> None:
        f = self.folder
        p = f.current
        if status in ("device", "pre-switchover") or (status == "active" and self._src_status == "paused"
                                                       and self._source_initial == "running"):
            f.phase(Phase.STOP_AND_COPY)
        elif status == "active" and p.phase in (Phase.SEND_START, Phase.CONNECTING):
            f.phase(Phase.PRECOPY)
        elif status == "completed":
            f.phase(Phase.FINISHING)

    async def _stall_check(self) -> None:
        f = self.folder
        idle = self._clock() - f.last_progress_at
        plan = self.plan
        if idle >= plan.stall_warn_s:
            # a warning, not an error: the migration may still pick up again
            if not self._stall_warned:
                f.event(f"stalled: no byte moved for {idle:.0f} s (warning after {plan.stall_warn_s:g} s)")
            self._stall_warned = True
            f.set(extra={**f.current.extra, "stalled": True, "stalled_for_s": round(idle, 1)})
        elif self._stall_warned:
            self._stall_warned = False
            f.set(extra={**f.current.extra, "stalled": False, "stalled_for_s": 0.0})
            f.event("progress resumed after a stall")
        if idle >= plan.stall_timeout_s and not self._cancel.is_set():
            cancel = True
            if self._on_stall is not None:
                try:
                    answer = self._on_stall(f.snapshot())
                    cancel = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
                except Exception as exc:  # nobody to ask: do what the CLI does, cancel
                    f.event(f"stall callback failed ({type(exc).__name__}: {exc}); cancelling")
            if cancel:
                self.cancel(f"stalled: no progress for {idle:.0f} s (stall timeout "
                            f"{plan.stall_timeout_s:g} s)")
            else:
                f.last_progress_at = self._clock()  # the operator chose to wait: start over

    async def _lab_extras(self, baseline: bool = False) -> None:
        f = self.folder
        if LAB_PAGE_STATE in self.src.commands:
            with contextlib.suppress(LinkError, KeyError, ValueError):
                f.fold_page_state(await self.src.execute(LAB_PAGE_STATE))
        for role, end in (("source", self.src), ("target", self.dst)):
            if end.offers(LAB_FIRMWARE) and end.connected:
                with contextlib.suppress(LinkError, KeyError, ValueError, TypeError):
                    f.fold_firmware(role, end.host, await end.execute(LAB_FIRMWARE),
                                    baseline=baseline)

    def _listen(self, end: Endpoint, names: tuple[str, ...]) -> None:
        if end.client is None:
            return
        listener = EventListener(names)
        end.client.register_listener(listener)
        host, is_source = end.host, end is self.src

        async def pump() -> None:
            async for ev in listener:
                name = str(ev["event"])
                raw = ev.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                detail = data.get("status") or data.get("pass") or ""
                self.folder.event(f"{host}: {name} {detail}".rstrip())
                if is_source and name == "STOP":
                    self._src_status = "paused"
                elif is_source and name == "RESUME":
                    self._src_status = "running"
                if name == "MIGRATION_PASS" and isinstance(data.get("pass"), int):
                    self.folder.set(pass_number=max(self.folder.current.pass_number, data["pass"]))
                self._wake.set()

        self._tasks.append(asyncio.create_task(pump()))

    # -- ends
    async def _finish(self, note: str | None = None) -> Outcome:
        """The stream reached its end: the guest must now live on the target alone. `note` says
        why we got here another way (the source reported a failure after the target took over)."""
        f = self.folder
        f.phase(Phase.FINISHING)
        if note:
            f.error(note)
        self._post()
        src_state = dst_state = None
        # QEMU leaves a target paused when the source was paused, -S holds it paused for the digest,
        # and a helper may keep a source's -S: a paused target is resumed below when it should run
        want = ("running", "paused")
        dst_status = await self._target_settled(want)
        if dst_status not in want and note is None:
            # QEMU's source says "completed" once its last bytes are in socket buffers; a target
            # that then fails to load them never runs. A plain source still holds the whole guest
            # (postmigrate): the rollback stops the target for certain, then resumes the source.
            return await self._rollback(Result.FAILED, f"{self.plan.target.name}: the incoming VM did not take "
                                        f"the guest after the source completed (it is '{dst_status}')")
        # QEMU says "completed" a moment before the source leaves finish-migrate
        src_status = await self.src.wait_status(SETTLED, timeout=QMP_TIMEOUT_S)
        digest_src = await self._digest(self.src)
        digest_dst = await self._digest(self.dst)
        if dst_status == "paused" and self._source_initial != "paused" and \
                (digest_src is None or digest_src == digest_dst):
            with contextlib.suppress(LinkError):
                await self.dst.execute("cont")
                f.event(f"{self.plan.target.name}: guest verified and resumed (cont)")
            dst_status = await self.dst.wait_status(("running",), timeout=QMP_TIMEOUT_S)
        if dst_status == "running" or (dst_status == "paused" and self._source_initial == "paused"):
            self._record(Step.TARGET_CONFIRMED, target_status=dst_status)
        if LAB_FIRMWARE in self.src.commands or LAB_FIRMWARE in self.dst.commands:
            await self._lab_extras()
            src_state = _guest_state(f.current.source_fw) if self.src.connected else None
            dst_state = _guest_state(f.current.target_fw)
        runnable = self._runnable(src_status, src_state, dst_status, dst_state)
        problems = []
        if dst_status != "running" and not (dst_status == "paused" and self._source_initial == "paused"):
            problems.append(f"{self.plan.target.name}: guest is '{dst_status}', not running")
        if src_status is None:
            problems.append(f"{self.plan.source.name}: unreachable, so its copy could not be confirmed "
                            "stopped")
        if self.plan.sev and src_state is not None and src_state != GuestState.SENT:
            problems.append(f"{self.plan.source.name}: firmware guest state {src_state}, not SENT")
        if not self.plan.sev and src_status == "running":
            problems.append(f"{self.plan.source.name}: guest still running after completion")
        if digest_src and digest_dst and digest_src != digest_dst:
            problems.append(f"guest digest differs: {self.plan.source.name} {digest_src[:16]}, "
                            f"{self.plan.target.name} {digest_dst[:16]}")
        if len(runnable) != 1:
            problems.append(f"{len(runnable)} runnable copies ({', '.join(runnable) or 'none'})")
        for text in problems:
            f.error(text)
        ok = not problems
        retired = ok and not self.plan.keep_source and await self._retire_source()
        f.phase(Phase.DONE if ok else Phase.FAILED)
        kind = "SENT" if self.plan.sev else "stopped"
        where = f"{self.plan.vm.name} now runs on {self.plan.target.name}"
        if dst_status == "paused":
            where = f"{self.plan.vm.name} is now on {self.plan.target.name} (paused, as it was)"
        msg = (f"{where}; the source copy is {kind}" + (" and its QEMU quit" if retired else "") if ok
               else f"migration completed, but: {'; '.join(problems)}")
        return Outcome(Result.DONE if ok else Result.FAILED, msg, runnable=runnable, source_status=src_status,
                       target_status=dst_status, source_guest_state=src_state, target_guest_state=dst_state,
                       digest_source=digest_src, digest_target=digest_dst)

    async def _retire_source(self) -> bool:
        """The target runs the guest alone: the source QEMU (plain: postmigrate, SEV: SENT) is quit,
        so no stale copy is left to be picked, listed or resumed. Journaled before the quit."""
        vm = self.plan.vm
        self._record(Step.SOURCE_RETIRED, source_pid=vm.pid, source_qmp=vm.qmp_path)
        await self.src.quit()
        if vm.pid is not None:  # a QEMU that ignored quit; the helper stops only a QEMU
            with contextlib.suppress(LinkError):
                await self.source.stop(vm.pid)
        self.folder.event(f"{self.plan.source.name}: the source QEMU of {vm.name} was retired (quit)")
        return True

    async def _target_settled(self, want: tuple[str, ...]) -> str | None:
        """The target's run state once it has the guest (in `want`), has failed, or is gone; a target
        still loading the end of the stream (inmigrate, active) is given TARGET_LOAD_S."""
        deadline = self._clock() + TARGET_LOAD_S
        while True:
            status = await self.dst.status()
            if status is None and await self._reopen_target():
                status = await self.dst.status()
            if status in want or status is None:
                return status
            if status != "inmigrate":
                # postmigrate/paused the target would not leave by itself: give QEMU a moment
                status = await self.dst.wait_status(want, timeout=QMP_TIMEOUT_S)
                return status
            try:
                info = await self.dst.execute("query-migrate")
            except LinkError:
                info = {}
            if info.get("status") in ("failed", "cancelled") or self._clock() > deadline:
                return status
            await asyncio.sleep(0.05)

    async def _reopen_target(self) -> bool:
        """A fresh QMP link to the incoming VM after the old one broke."""
        if self._incoming is None:
            return False
        try:
            await self.dst.reopen()
        except QemuGone:  # it left by itself (QEMU exits when its incoming migration ends badly)
            self.folder.event(f"{self.plan.target.name}: the incoming VM has already exited")
            return False
        except LinkError as exc:
            self.folder.error(str(exc))
            return False
        self.folder.event(f"{self.plan.target.name}: QMP link re-opened")
        return True

    async def _target_took_over(self) -> bool:
        """Whether the incoming VM already holds the whole guest (its side of the stream completed)
        while the source cannot run it any more (SEV: SENT; plain: not running). Then stopping the
        target would lose the guest; the end is a finish, not a rollback."""
        if self._incoming is None:
            return False
        info: dict[str, Any] = {}
        answered = False
        for _ in range(2):
            try:
                info = await self.dst.execute("query-migrate")
                answered = True
                break
            except LinkError:
                if not await self._reopen_target():
                    return False
        src_status = await self.src.status()
        src_state = None
        if LAB_FIRMWARE in self.src.commands and self.src.connected:
            await self._lab_extras()
            src_state = _guest_state(self.folder.current.source_fw)
        facts = Facts(sev=self.plan.sev, source_was_running=self._source_initial == "running",
                      can_finish_held=HELD_FINISH in self.dst.commands)
        obs = Observation(
            EndState(reachable=src_status is not None, run_state=src_status, guest=_known_state(src_state)),
            EndState(reachable=answered, migration=str(info.get("status", "none"))))
        verdict = takes_over(facts, obs)
        if verdict is None:
            return False
        self._record(Step.SEND_FINISHED, why="the target holds the guest and the source cannot run it")
        if verdict == Action.FINISH_HELD:
            # The link died between READY and FINISHED: the target holds every page and the
            # source can no longer run the guest, so the target must (else the guest is lost).
            try:
                await self.dst.execute(HELD_FINISH)
            except LinkError as exc:
                self.folder.error(f"{self.plan.target.name}: the held guest could not be finished: {exc}")
                return False
            self.folder.event(f"{self.plan.target.name}: held guest finished ({HELD_FINISH}), "
                              f"since {self.plan.source.name} can no longer run it")
        return True

    async def _rollback(self, result: Result, reason: str) -> Outcome:
        """Cancel or failure: the source guest runs again and the target's incoming VM is gone."""
        f = self.folder
        if result == Result.FAILED:
            f.error(reason)
        else:
            f.event(reason)
        src_status = await self.src.status()
        if src_status in ("running", "paused", "postmigrate", "finish-migrate", "inmigrate") and \
                self.src.connected:
            with contextlib.suppress(LinkError):
                info = await self.src.execute("query-migrate")
                self._mig_status = str(info.get("status", self._mig_status))
                if info.get("status") in ("active", "setup", "device", "pre-switchover"):
                    await self.src.execute("migrate_cancel")
                    await self._wait_migrate_end()
        if await self._target_took_over():
            return await self._finish(note=f"{reason}; but the target had already received the whole "
                                      "guest and the source could no longer run it, so it stays there")
        if not self.step.forward or not self.plan.sev:
            self._record(Step.ROLLBACK_CHOSEN, why=reason)
        target_gone = await self._stop_target()
        src_status = await self.src.status()
        if (src_status in ("paused", "postmigrate") and self._source_initial == "running"
                and target_gone):
            try:
                await self.src.execute("cont")
                f.event(f"{self.plan.source.name}: guest resumed (cont)")
            except LinkError as exc:
                f.error(f"{self.plan.source.name}: the guest could not be resumed: {exc}")
            src_status = await self.src.wait_status(("running",), timeout=5)
        src_state = None
        if LAB_FIRMWARE in self.src.commands:
            await self._lab_extras()
            src_state = _guest_state(f.current.source_fw)
        # An incoming VM we could not stop can only run the guest if the stream got to its end
        # (QEMU: completed; SEV: the source reached SENT). Otherwise it can never start.
        could_run = self._mig_status == "completed" or src_state == GuestState.SENT
        runnable = self._runnable(src_status, src_state, "unknown" if not target_gone and could_run else None,
                                  None)
        if (src_status == "postmigrate" and self._source_initial == "paused" and target_gone
                and src_state != GuestState.SENT and self.plan.source.name not in runnable):
            # a paused guest whose stream "completed" into a target that then died: QEMU has no way
            # back to 'paused' without running it, but `cont` resumes it, so it is the one copy
            runnable = (self.plan.source.name, *runnable)
            f.event(f"{self.plan.source.name}: the paused guest stays there (postmigrate; `cont` resumes it)")
        if not target_gone:
            f.error(f"{self.plan.target.name}: the incoming VM could not be confirmed gone"
                    + ("" if could_run else " (it never received the end of the stream, so it cannot run)"))
        if src_status is None:
            f.error(f"{self.plan.source.name}: the source guest could not be confirmed running")
        f.phase(Phase.CANCELLED if result == Result.CANCELLED else Phase.FAILED)
        where = f"{self.plan.vm.name} runs on {self.plan.source.name}" if src_status == "running" \
            else f"{self.plan.vm.name} is '{src_status}' on {self.plan.source.name}"
        return Outcome(result, f"{reason}; {where}", runnable=runnable, source_status=src_status,
                       target_status=None if target_gone else "unknown", source_guest_state=src_state,
                       target_guest_state=_guest_state(f.current.target_fw) if not target_gone else None)

    async def _source_lost(self, why: str) -> Outcome:
        """The source's QMP link broke mid-way: reconnect and roll back; if the source stays out of
        reach, decide from the target (it either runs the guest or its incoming VM is stopped, so
        the source QEMU, seeing the stream break, keeps the guest)."""
        f = self.folder
        f.error(f"{self.plan.source.name}: QMP link lost mid-way ({why})")
        self._post()
        await self.src.drop()
        deadline = self._clock() + RECONNECT_S
        while self._clock() < deadline:
            try:
                await self.src.reopen()
                break
            except LinkError:
                await asyncio.sleep(0.2)
        if self.src.connected:
            f.event(f"{self.plan.source.name}: QMP link re-opened")
            info = await self.src.execute("query-migrate")
            if info.get("status") == "completed":
                return await self._finish()
            return await self._rollback(Result.FAILED, f"{self.plan.source.name}'s QMP link dropped mid-way; "
                                        "migration rolled back")
        if await self._target_took_over():
            return await self._finish(note=f"{self.plan.source.name} unreachable over QMP after the target "
                                      "received the whole guest")
        gone = await self._stop_target()
        f.phase(Phase.FAILED)
        return Outcome(Result.FAILED, f"{self.plan.source.name} unreachable over QMP; the incoming VM on "
                       f"{self.plan.target.name} was stopped before it had the whole guest, so the source "
                       "QEMU keeps it (not confirmed)",
                       runnable=(self.plan.source.name,) if gone else (), target_status=None if gone else "unknown")

    async def _stop_target(self) -> bool:
        """Stop the incoming VM; True when it is confirmed gone."""
        if self._incoming is None:
            return True
        await self.dst.quit()
        try:
            await self.target.stop(self._incoming.pid)
        except LinkError as exc:
            self.folder.error(str(exc))
            return False
        self.folder.event(f"{self.plan.target.name}: incoming VM (pid {self._incoming.pid}) stopped")
        self._incoming = None
        return True

    def _runnable(self, src_status: str | None, src_state: int | None, dst_status: str | None,
                  dst_state: int | None) -> tuple[str, ...]:
        out = []
        src_ok = src_status == "running" or (src_status == "paused" and self._source_initial == "paused")
        if src_ok and src_state != GuestState.SENT:
            out.append(self.plan.source.name)
        if dst_status in ("running", "unknown") or (dst_status == "paused" and self._source_initial == "paused"):
            out.append(self.plan.target.name)
        return tuple(out)

    # -- QMP helpers
    async def _src_call(self, cmd: str) -> Any:
        """A source call in the watch loop: a broken link (not a QMP error answer) is _LinkLost."""
        try:
            return await self.src.execute(cmd)
        except LinkError as exc:
            if isinstance(exc.__cause__, ExecuteError):
                raise
            raise _LinkLost(str(exc)) from exc

    async def _wait_migrate_end(self) -> None:
        deadline = self._clock() + QMP_TIMEOUT_S
        while self._clock() < deadline:
            info = await self.src.execute("query-migrate")
            self.folder.fold_migrate(info)
            self._mig_status = str(info.get("status", self._mig_status))
            if info.get("status") in TERMINAL:
                return
            await asyncio.sleep(0.05)

    async def _digest(self, end: Endpoint) -> str | None:
        try:
            return await end.digest()
        except (LinkError, KeyError, TypeError) as exc:
            self.folder.event(f"guest digest not read: {exc}")
            return None

    def _post(self) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(self.folder.snapshot())
        except Exception as exc:  # a broken watcher must not strand a guest mid-migration
            self.folder.event(f"progress watcher failed: {type(exc).__name__}: {exc}")


def refused_outcome(folder: ProgressFolder, checks: Sequence[Check], source: str, why: str = "") -> Outcome:
    """The preflight's failures (or `why`) as the outcome of a run that touched nothing."""
    bad = " ".join(c.sentence for c in checks if c.status.value == "fail") or why
    folder.phase(Phase.FAILED)
    folder.error("refused by preflight: " + bad)
    return Outcome(Result.REFUSED, "refused by preflight: " + bad, runnable=(source,))


def measured(outcome: Outcome, folder: ProgressFolder, duration_s: float) -> Outcome:
    """`outcome` with what the run's progress measured: its length, bytes and errors."""
    current = folder.current
    return _with(outcome, duration_s=duration_s, bytes_transferred=current.bytes_transferred,
                 errors=current.errors)


def audited(plan: MigrationPlan, checks: Sequence[Check], outcome: Outcome,
            audit_log: Path | None | bool = True) -> Outcome:
    """`outcome` with the audit line written for it (True: the console's log; False: none); a
    log that cannot be written is one more error of the outcome, never a lost result."""
    if audit_log is False:
        return outcome
    try:
        line = audit.record(plan, checks, outcome, None if audit_log is True else audit_log)
    except OSError as exc:
        return _with(outcome, errors=(*outcome.errors, f"audit log not written: {exc}"))
    return _with(outcome, audit=json.dumps(line, sort_keys=True))


def uri_host(address: str) -> str:
    """An address as tcp: URIs want it (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _guest_state(view: Any) -> int | None:
    return None if view is None else view.guest_state


def _known_state(value: int | None) -> GuestState | None:
    try:
        return None if value is None else GuestState(value)
    except ValueError:
        return None


def _sentence(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _with(outcome: Outcome, **changes: Any) -> Outcome:
    from dataclasses import replace

    return replace(outcome, **changes)
