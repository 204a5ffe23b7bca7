"""The backend over real hosts (an inventory, or a lab's state folder, which is read the same
way): hosts/ for discovery and SSH links, engine/ for preflight and the run."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sevconsole.engine.checks import Check
from sevconsole.engine.run import Outcome, Result
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.tui.backend import HostKeyPending, HostKeyQuestion, ProgressSink


class BackendError(Exception):
    """The console cannot reach its hosts; the sentence says what to do."""


def open_backend(*, inventory: Path | None, lab_dir: Path | None) -> LiveBackend:
    from sevconsole.hosts.fleet import FleetError, open_fleet

    try:
        fleet = open_fleet(inventory=inventory, lab=lab_dir)
    except FleetError as exc:
        raise BackendError(str(exc)) from exc
    return LiveBackend(list(fleet.hosts), known_hosts=fleet.options.known_hosts, lab_root=fleet.lab_root,
                       lab=lab_dir is not None or any(h.lab for h in fleet.hosts), fleet=fleet)


class LiveBackend:
    def __init__(self, hosts: Sequence[Any], *, known_hosts: Path | None, lab_root: Path | None,
                 lab: bool, fleet: Any = None) -> None:
        from sevconsole.hosts.chains import trust_with_lab_root
        from sevconsole.hosts.discovery import DiscoveryOptions

        self.specs = {h.name: h for h in hosts}
        self.lab = lab
        self.options = DiscoveryOptions(known_hosts=known_hosts, lab_root=lab_root)
        self._lock = threading.Lock()
        self._pool = self.options.pool()
        self._trust = trust_with_lab_root(lab_root)
        self.fleet = fleet  # hosts.fleet.Fleet: how runners and recover reach the same hosts
        self._finished: dict[str, Any] = {}  # migration id -> its journal Entry, once it can no longer change

    def host_names(self) -> list[str]:
        return list(self.specs)

    def probe(self, name: str) -> HostReport:
        from sevconsole.hosts.discovery import discover

        spec = self.specs.get(name)
        if spec is None:
            raise BackendError(f"{name} is not in the inventory")
        with self._lock:
            pool = self._pool
        (report,) = discover([spec], self.options, pool=pool)
        key = getattr(report, "host_key", None)
        if key is not None and key.status == "unknown":
            raise HostKeyPending(HostKeyQuestion(name, key.key_type, key.fingerprint,
                                                 report.errors[0] if report.errors else "unknown host key"))
        return report

    def accept_host_key(self, question: HostKeyQuestion) -> None:
        from sevconsole.hosts.discovery import discover

        spec = self.specs[question.host]
        # ask discovery for the key again, then record exactly the key the operator saw
        (report,) = discover([spec], self.options, pool=self._pool)
        key = getattr(report, "host_key", None)
        if key is None or key.fingerprint != question.fingerprint:
            raise BackendError(f"{question.host} now offers another key than {question.fingerprint}; "
                               "nothing was recorded")
        self.options.key_store().accept(key.host_id, key.key_type, key.key_base64)
        with self._lock:  # a fresh pool reads the known_hosts file again
            old, self._pool = self._pool, self.options.pool()
        old.close()

    def _plan(self, vm: VmInfo, source: HostReport, target: HostReport, downtime_limit_ms: int) -> Any:
        from sevconsole.engine.plan import MigrationPlan

        return MigrationPlan(vm=vm, source=source, target=target, downtime_limit_ms=downtime_limit_ms)

    def preflight(self, vm: VmInfo, source: HostReport, target: HostReport,
                  downtime_limit_ms: int) -> list[Check]:
        from sevconsole.engine.checks import preflight

        return list(preflight(self._plan(vm, source, target, downtime_limit_ms), self._trust))

    def migration(self, vm: VmInfo, source: HostReport, target: HostReport, downtime_limit_ms: int,
                  checks: Sequence[Check], on_progress: ProgressSink,
                  bandwidth_bps: int | None = None) -> LiveMigration:
        plan = replace(self._plan(vm, source, target, downtime_limit_ms), bandwidth_bps=bandwidth_bps)
        return LiveMigration(self, plan, checks, on_progress)

    def connection(self, name: str) -> Any:
        from sevconsole.hosts.discovery import endpoint_for

        spec = self.specs[name]
        with self._lock:
            pool = self._pool
        return pool.get(endpoint_for(spec, list(self.specs.values()), self.options.ssh_config))

    async def lab_command(self, host: HostReport, vm: VmInfo, command: str, arguments: dict[str, Any]) -> Any:
        import asyncio

        from sevconsole.hosts.qmp import open_qmp

        if not host.lab:
            raise BackendError(f"{host.name} is not a lab host; {command} exists only in the lab")
        if vm.qmp_path is None:
            raise BackendError(f"{vm.name} on {host.name} has no QMP socket")
        conn = await asyncio.to_thread(self.connection, host.name)
        async with open_qmp(conn, vm.qmp_path) as link:
            return await link.execute(command, arguments)

    def close(self) -> None:
        self._pool.close()


    # -- durable migrations (runners, journal, recover)
    def spawn(self, plan: Any) -> str:
        """Blocking: start a runner for `plan`; returns the migration id."""
        from sevconsole.engine.runner import spawn

        if self.fleet is None:
            raise BackendError("this console was opened without a fleet a runner could reach")
        return spawn({"vm": plan.vm.name, "source": plan.source.name, "target": plan.target.name,
                      "where": self.fleet.where(), "downtime_ms": plan.downtime_limit_ms,
                      "bandwidth_bps": plan.bandwidth_bps, "stall_warn_s": plan.stall_warn_s,
                      "stall_timeout_s": plan.stall_timeout_s})

    def attach(self, migration_id: str, on_progress: ProgressSink) -> LiveMigration:
        """A handle on a migration another console (or `migrate`) started: re-attach to its runner."""
        return LiveMigration(self, None, (), on_progress, migration_id=migration_id)

    def migrations(self) -> list[Any]:
        """Blocking: every migration from the journal, newest first (engine.journal.Entry). A
        finished one whose runner is gone never changes: it is read once, then kept (the overview
        asks every two seconds, and a fleet's folders only grow)."""
        from sevconsole import paths
        from sevconsole.engine import journal

        try:
            names = sorted((p.name for p in paths.migrations_dir().iterdir() if p.is_dir()), reverse=True)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            entry = self._finished.get(name)
            if entry is None:
                try:
                    entry = journal.entry(name)
                except journal.JournalError:
                    continue
                if entry.finished and not entry.runner_alive and entry.journal.trusted:
                    self._finished[name] = entry
            out.append(entry)
        return out

    def attention(self, reports: Sequence[HostReport]) -> list[Any]:
        """Blocking (reads the journal): guests needing attention across these reports."""
        from sevconsole.engine import attention, journal

        entries = journal.entries()
        return attention.find(reports, [e for e in entries if e.in_flight], [e for e in entries if e.unfinished],
                              fleet=True)

    def replay(self, migration_id: str) -> Any:
        """Blocking: the recorded snapshots of a finished migration (engine.replay.Tape)."""
        from sevconsole.engine.replay import Tape

        return Tape.for_migration(migration_id)

    def audit_tail(self, limit: int) -> list[dict[str, Any]]:
        from sevconsole.paths import audit_log_file
        from sevconsole.tui.fleet import read_audit_tail

        return read_audit_tail(audit_log_file(), limit)

    async def apply_fix(self, action: Any) -> str:
        from sevconsole.engine.recover import apply_fix

        if self.fleet is None:
            raise BackendError("this console was opened without a fleet to act on")
        return await apply_fix(action, self.fleet)

    def recover(self) -> list[Any]:
        """Blocking: reconcile every unfinished migration of this fleet whose runner is gone."""
        from sevconsole.engine.recover import recover_all

        return recover_all(self.fleet) if self.fleet is not None else []


class LiveMigration:
    """One migration, owned by a runner process: this console only attaches to it. Closing the
    console (or losing its terminal) detaches; only `cancel` stops the migration."""

    def __init__(self, backend: LiveBackend, plan: Any, checks: Sequence[Check],
                 on_progress: ProgressSink, *, migration_id: str | None = None) -> None:
        self.backend, self.plan, self.on_progress = backend, plan, on_progress
        self.checks = checks
        self.migration_id = migration_id
        self._client: Any = None
        self._cancel: str | None = None
        self.running = False

    async def run(self) -> Outcome:
        import asyncio

        from sevconsole.engine.attach import Ended, RunnerClient, RunnerGone, Snapshot

        self.running = True
        try:
            if self.migration_id is None:
                self.migration_id = await asyncio.to_thread(self.backend.spawn, self.plan)
            self._client = await RunnerClient.connect(self.migration_id)
            if self._cancel is not None:
                await self._client.cancel(self._cancel)
            async for message in self._client.messages():
                if isinstance(message, Snapshot):
                    self.on_progress(message.progress)
                elif isinstance(message, Ended):
                    return message.outcome
                elif isinstance(message, RunnerGone):
                    return Outcome(result=Result.FAILED, message=message.sentence)
            return Outcome(result=Result.FAILED, message=f"migration {self.migration_id}: no outcome")
        finally:
            self.running = False
            if self._client is not None:
                await self._client.close()

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        import asyncio

        self._cancel = reason
        if self._client is not None:
            asyncio.get_running_loop().create_task(self._client.cancel(reason))


__all__ = ["BackendError", "LiveBackend", "open_backend"]
