"""A scripted backend: fixed HostReports and a replayed sequence of Progress snapshots.

Tests and SVG snapshots use it for deterministic screens; the preflight checks are the engine's
real ones. `sample_reports` and `sample_progress` build a small, plausible lab picture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sevconsole.engine.checks import Check
from sevconsole.engine.progress import FirmwareView, Phase, Progress, SevLogEntry
from sevconsole.engine.replay import ReplayError, Tape
from sevconsole.engine.run import Outcome
from sevconsole.hosts.report import Capabilities, HostReport, SevSupport, VmInfo
from sevconsole.sev.pagestate import PageState
from sevconsole.tui.backend import HostKeyPending, HostKeyQuestion, ProgressSink

POLICY_RECOMMENDED = 0x33  # NODBG|NOKS|DOMAIN|SEV
POLICY_NOSEND = 0x0B  # NODBG|NOKS|NOSEND


def sample_vm(name: str, mib: int, policy: int | None, state: int = 3, status: str = "running") -> VmInfo:
    return VmInfo(name=name, pid=4000 + mib // 256, qmp_path=f"/run/lab/{name}.qmp",
                  argv=("qemu-system-x86_64", "-name", name, "-m", str(mib)), status=status,
                  memory_mib=mib, sev_enabled=policy is not None, policy=policy,
                  sev_state="running" if policy is not None else None,
                  firmware_guest_state=state if policy is not None else None,
                  handle=1 if policy is not None else None, migration_support=True)


def sample_reports(caps: Capabilities | None = None, *, other_caps: Capabilities | None = None) -> dict[str, HostReport]:
    """Three lab hosts: lab-1 runs `web` (SEV, DOMAIN|SEV) and `vault` (NOSEND); lab-2 is an idle
    host of the same domain; lab-3 has other certificates (`other_caps`) or none."""
    sev = SevSupport(kernel_sev=True, kernel_sev_es=True, dev_sev=True, api_major=0, api_minor=22,
                     build=1, platform_state=2, owner_external=False, es_configured=True, guest_count=2)
    idle = replace(sev, platform_state=1, guest_count=0)
    base = dict(lab=True, hostname=None, kernel="6.1.0-lab", cpu="AMD EPYC 7302 (simulated)", probed_at=1.0)
    return {
        "lab-1": HostReport(name="lab-1", address="127.0.0.1", port=42201, reachable=True, latency_ms=3.2,
                            sev=sev, capabilities=caps, vms=(sample_vm("web", 4096, POLICY_RECOMMENDED),
                                                             sample_vm("vault", 2048, POLICY_NOSEND)), **base),
        "lab-2": HostReport(name="lab-2", address="127.0.0.1", port=42202, reachable=True, latency_ms=2.9,
                            sev=idle, capabilities=caps, **base),
        "lab-3": HostReport(name="lab-3", address="127.0.0.1", port=42203, reachable=True, latency_ms=3.5,
                            sev=idle, capabilities=other_caps, **base),
    }


def sample_progress(vm: str = "web", source: str = "lab-1", target: str = "lab-2", *,
                    gib: int = 1, frames: int = 12, converging: bool = True) -> list[Progress]:
    """A deterministic pre-copy of `gib` GiB: pass 1 sweeps, pass 2 resends the dirtied pages,
    then stop-and-copy and done (or, with converging=False, a dirty rate that never lets it end)."""
    pages = gib * (1 << 18)
    rng = np.random.default_rng(42)
    shared = np.zeros(pages, bool)
    shared[: pages // 64] = True  # firmware tables, DMA buffers: shared pages travel in clear
    shared[rng.integers(0, pages, pages // 50)] = True
    states = np.where(shared, PageState.SHARED_UNSENT, PageState.PRIVATE_UNSENT).astype(np.uint8)
    out: list[Progress] = []
    sev_log: list[SevLogEntry] = [SevLogEntry(source, "SEND_START", 0), SevLogEntry(target, "RECEIVE_START", 0)]
    events = [f"incoming VM started on {target} (-incoming defer)", "target PDH and chains handed to the source",
              "MIGRATION setup", "MIGRATION active"]
    rate = 780e6
    history: list[float] = []
    sent_bytes = 0
    for i in range(frames):
        states = states.copy()
        pass_number = 1 if i < frames * 2 // 3 else 2
        if pass_number == 1:
            hi = pages * (i + 1) // (frames * 2 // 3)
            lo = pages * i // (frames * 2 // 3)
            seg = states[lo:hi]
            seg[seg == PageState.PRIVATE_UNSENT] = PageState.PRIVATE_SENT
            seg[seg == PageState.SHARED_UNSENT] = PageState.SHARED_SENT
            sent_bytes += (hi - lo) * 4096
        else:
            dirty = states == PageState.PRIVATE_DIRTY
            states[dirty] = PageState.PRIVATE_SENT
            states[states == PageState.SHARED_DIRTY] = PageState.SHARED_SENT
            sent_bytes += int(dirty.sum()) * 4096
        touched = rng.integers(0, pages, pages // (200 if converging else 20))
        touched = touched[(states[touched] == PageState.PRIVATE_SENT) | (states[touched] == PageState.SHARED_SENT)]
        states[touched] = np.where(shared[touched], PageState.SHARED_DIRTY, PageState.PRIVATE_DIRTY)
        remaining = int(np.isin(states, (0, 2, 3, 5)).sum()) * 4096
        rate = rate * (0.97 if i % 2 else 1.03)
        history.append(rate)
        dirty_pps = 9000.0 if converging else 250000.0
        sev_log.append(SevLogEntry(source, "SEND_UPDATE_DATA", 0, count=(i + 1) * 1800))
        sev_log.append(SevLogEntry(target, "RECEIVE_UPDATE_DATA", 0, count=(i + 1) * 1800))
        if i == frames * 2 // 3:
            events.append("MIGRATION_PASS 2")
        expected = remaining / rate * 1000
        out.append(Progress(
            vm=vm, source=source, target=target, phase=Phase.PRECOPY, pass_number=pass_number,
            started_at=0.0, elapsed_s=0.35 * (i + 1), total_pages=pages, page_states=states,
            page_map_exact=True, bytes_transferred=sent_bytes, bytes_remaining=remaining,
            bytes_total=pages * 4096, pages_transferred=sent_bytes // 4096, rate_bps=rate,
            pages_per_s=rate / 4096, rate_history=tuple(history), dirty_pages_per_s=dirty_pps,
            downtime_limit_ms=300, expected_downtime_ms=expected,
            converging=None if i < 2 else converging, eta_s=(remaining / rate + 0.3) if converging else None,
            source_fw=FirmwareView(source, 2, 4, 1, {"SEND_UPDATE_DATA": (i + 1) * 1800}, 0),
            target_fw=FirmwareView(target, 2, 5, 1, {"RECEIVE_UPDATE_DATA": (i + 1) * 1800}, 0),
            sev_log=_fold(sev_log), events=tuple(events)))
    if converging:
        last = out[-1]
        done_states = last.page_states.copy()  # type: ignore[union-attr]
        done_states[np.isin(done_states, (0, 2))] = PageState.PRIVATE_SENT
        done_states[np.isin(done_states, (3, 5))] = PageState.SHARED_SENT
        log = [*last.sev_log, SevLogEntry(source, "SEND_FINISH", 0), SevLogEntry(target, "RECEIVE_FINISH", 0)]
        out.append(replace(last, phase=Phase.STOP_AND_COPY, page_states=done_states, bytes_remaining=0,
                           expected_downtime_ms=41.0, events=(*last.events, "STOP (source paused)")))
        out.append(replace(out[-1], phase=Phase.DONE, elapsed_s=last.elapsed_s + 0.2,
                           source_fw=FirmwareView(source, 2, 6, 1, last.source_fw.counts, 0),  # type: ignore[union-attr]
                           target_fw=FirmwareView(target, 2, 3, 1, last.target_fw.counts, 0),  # type: ignore[union-attr]
                           sev_log=tuple(log),
                           events=(*out[-1].events, "MIGRATION completed", f"RESUME on {target}")))
    return out


def _fold(log: list[SevLogEntry]) -> tuple[SevLogEntry, ...]:
    """Consecutive same-host same-command entries fold into one with the latest count."""
    folded: dict[tuple[str, str], SevLogEntry] = {}
    for entry in log:
        folded[(entry.host, entry.command)] = entry
    return tuple(folded.values())


def sample_result(progress: Progress, audit: str | None = None) -> Outcome:
    return Outcome(result="done", message=f"{progress.vm} runs on {progress.target}",
                  runnable=(progress.target,), source_guest_state=6, target_guest_state=3,
                  source_status="postmigrate", target_status="running",
                  digest_source="9f2c" + "0" * 60, digest_target="9f2c" + "0" * 60,
                  bytes_transferred=progress.bytes_transferred, duration_s=progress.elapsed_s, audit=audit)


@dataclass
class ScriptedMigration:
    snapshots: Sequence[Progress]
    result: Outcome
    on_progress: ProgressSink
    step: asyncio.Event | None = None  # when set, wait for it before each snapshot (tests)
    interval_s: float = 0.0  # pacing for demos and screenshots
    cancelled: str | None = None
    posted: list[Progress] = field(default_factory=list)  # what a runner would record for replay

    async def run(self) -> Outcome:
        for snap in self.snapshots:
            if self.step is not None:
                await self.step.wait()
                self.step.clear()
            elif self.interval_s:
                await asyncio.sleep(self.interval_s)
            if self.cancelled is not None:
                last = replace(snap, phase=Phase.CANCELLED, events=(*snap.events, self.cancelled))
                self.posted.append(last)
                self.on_progress(last)
                return Outcome(result="cancelled", message=self.cancelled, runnable=(snap.source,),
                              source_guest_state=3, target_guest_state=None, duration_s=snap.elapsed_s,
                              migration_id=self.result.migration_id)
            self.posted.append(snap)
            self.on_progress(snap)
            await asyncio.sleep(0)  # let the screen draw between snapshots
        return self.result

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        self.cancelled = reason
        if self.step is not None:
            self.step.set()


@dataclass
class ScriptedBackend:
    reports: dict[str, HostReport]
    snapshots: Sequence[Progress] = ()
    result: Outcome | None = None
    lab: bool = True
    ask_keys: dict[str, HostKeyQuestion] = field(default_factory=dict)  # asked once, then known
    probe_gate: Callable[[str], None] | None = None  # tests block here to see rows fill one by one
    step: asyncio.Event | None = None
    interval_s: float = 0.0
    trust: object = None
    started: list[ScriptedMigration] = field(default_factory=list)  # every migration() handle, in order
    accepted: list[str] = field(default_factory=list)
    lab_commands: list[tuple[str, str, str]] = field(default_factory=list)
    scripts: dict[str, Sequence[Progress]] = field(default_factory=dict)  # per VM name
    results: dict[str, Outcome] = field(default_factory=dict)  # per VM name
    entries: list[Any] = field(default_factory=list)  # journal entries the overview and M list
    audit: list[dict[str, Any]] = field(default_factory=list)  # audit log lines, oldest first
    attention_items: list[Any] = field(default_factory=list)  # what attention() answers
    tapes: dict[str, Sequence[Progress]] = field(default_factory=dict)  # migration id -> its snapshots

    def host_names(self) -> list[str]:
        return list(self.reports)

    def probe(self, name: str) -> HostReport:
        if self.probe_gate is not None:
            self.probe_gate(name)
        if name in self.ask_keys:
            raise HostKeyPending(self.ask_keys[name])
        if name not in self.reports:
            raise LookupError(f"{name} is not in the inventory")
        return self.reports[name]

    def accept_host_key(self, question: HostKeyQuestion) -> None:
        self.accepted.append(question.fingerprint)
        self.ask_keys.pop(question.host, None)

    def preflight(self, vm: VmInfo, source: HostReport, target: HostReport, downtime_limit_ms: int) -> list[Check]:
        from sevconsole.engine.checks import preflight
        from sevconsole.engine.plan import MigrationPlan

        plan = MigrationPlan(vm=vm, source=source, target=target, downtime_limit_ms=downtime_limit_ms)
        return list(preflight(plan, self.trust))

    def migration(self, vm: VmInfo, source: HostReport, target: HostReport, downtime_limit_ms: int,
                  checks: Sequence[Check], on_progress: ProgressSink,
                  bandwidth_bps: int | None = None) -> ScriptedMigration:
        snaps = self.scripts.get(vm.name) or self.snapshots or sample_progress(vm.name, source.name, target.name)
        result = self.results.get(vm.name) or self.result or sample_result(snaps[-1])
        migration_id = f"scripted-{len(self.started) + 1}"
        result = replace(result, migration_id=migration_id)
        run = ScriptedMigration(snaps, result, on_progress, self.step, self.interval_s)
        self.tapes[migration_id] = run.posted  # what a runner records, as it posts
        self.started.append(run)
        return run

    async def lab_command(self, host: HostReport, vm: VmInfo, command: str, arguments: dict[str, object]) -> dict[str, object]:
        self.lab_commands.append((host.name, vm.name, command))
        return {}

    def close(self) -> None:
        pass

    # no runners or journal behind a scripted console: nothing in flight, nothing to recover
    def attach(self, migration_id: str, on_progress: ProgressSink) -> ScriptedMigration:
        raise LookupError(f"a scripted console has no migration {migration_id}")

    def migrations(self) -> list[Any]:
        return list(self.entries)

    def recover(self) -> list[Any]:
        return []

    def attention(self, reports: Sequence[HostReport]) -> list[Any]:
        return list(self.attention_items)

    def replay(self, migration_id: str) -> Tape:
        snaps = self.tapes.get(migration_id)
        if not snaps:
            raise ReplayError(f"no snapshots were recorded for migration {migration_id}")
        return Tape.from_progress(snaps, migration_id)

    def audit_tail(self, limit: int) -> list[dict[str, Any]]:
        return self.audit[-limit:]

    async def apply_fix(self, action: Any) -> str:
        return "nothing to do in a scripted console"
