"""The backend over real hosts (an inventory, or a lab's state folder, which is read the same
way): hosts/ for discovery and SSH links, engine/ for preflight and the run."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sevconsole import paths
from sevconsole.engine.progress import Progress
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.tui.backend import (
    CheckLine,
    HostKeyPending,
    HostKeyQuestion,
    ProgressSink,
    Result,
    check_line,
    result_from_outcome,
)


class BackendError(Exception):
    """The console cannot reach its hosts; the sentence says what to do."""


def open_backend(*, inventory: Path | None, lab_dir: Path | None) -> LiveBackend:
    from sevconsole.hosts.errors import InventoryError
    from sevconsole.hosts.inventory import load_inventory
    from sevconsole.hosts.labdir import load_lab

    try:
        if lab_dir is not None:
            lab = load_lab(lab_dir)
            return LiveBackend(list(lab.inventory.hosts), known_hosts=lab.known_hosts,
                               lab_root=lab.lab_root, lab=True)
        inv = load_inventory(inventory)
        return LiveBackend(list(inv.hosts), known_hosts=inv.known_hosts, lab_root=inv.lab_root,
                           lab=any(h.lab for h in inv.hosts))
    except InventoryError as exc:
        raise BackendError(str(exc)) from exc


class LiveBackend:
    def __init__(self, hosts: Sequence[Any], *, known_hosts: Path | None, lab_root: Path | None,
                 lab: bool) -> None:
        from sevconsole.hosts.chains import trust_with_lab_root
        from sevconsole.hosts.discovery import DiscoveryOptions

        self.specs = {h.name: h for h in hosts}
        self.lab = lab
        self.options = DiscoveryOptions(known_hosts=known_hosts, lab_root=lab_root)
        self._lock = threading.Lock()
        self._pool = self.options.pool()
        self._trust = trust_with_lab_root(lab_root)

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
                  downtime_limit_ms: int) -> list[CheckLine]:
        from sevconsole.engine.checks import preflight

        return [check_line(c) for c in preflight(self._plan(vm, source, target, downtime_limit_ms), self._trust)]

    def migration(self, vm: VmInfo, source: HostReport, target: HostReport, downtime_limit_ms: int,
                  checks: Sequence[CheckLine], on_progress: ProgressSink,
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


class LiveMigration:
    """One engine run: SSH links are opened in a thread, the run loop in the app's event loop."""

    def __init__(self, backend: LiveBackend, plan: Any, checks: Sequence[CheckLine],
                 on_progress: ProgressSink) -> None:
        self.backend, self.plan, self.on_progress = backend, plan, on_progress
        self.checks = checks
        self._migration: Any = None
        self._cancel: str | None = None

    async def run(self) -> Result:
        import asyncio

        from sevconsole.engine.checks import Check, CheckStatus
        from sevconsole.engine.run import Migration
        from sevconsole.engine.ssh import SshHost

        src_conn = await asyncio.to_thread(self.backend.connection, self.plan.source.name)
        dst_conn = await asyncio.to_thread(self.backend.connection, self.plan.target.name)
        # reconnect: a dropped SSH transport is replaced, so a rollback can still reach the host
        source = SshHost(self.plan.source.name, self.plan.source.address, src_conn,
                         reconnect=lambda: self.backend.connection(self.plan.source.name))
        target = SshHost(self.plan.target.name, self.plan.target.address, dst_conn,
                         reconnect=lambda: self.backend.connection(self.plan.target.name))
        checks = [Check(c.key, c.title, CheckStatus(c.status), c.sentence) for c in self.checks]
        self._migration = Migration(self.plan, source, target, checks=checks, on_progress=self._post)
        if self._cancel is not None:
            self._migration.cancel(self._cancel)
        try:
            outcome = await self._migration.run()
        finally:
            await source.close()
            await target.close()
        return result_from_outcome(outcome, audit=_last_audit_line())

    def _post(self, progress: Progress) -> None:
        self.on_progress(progress)

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        self._cancel = reason
        if self._migration is not None:
            self._migration.cancel(reason)


def _last_audit_line() -> str | None:
    path = paths.audit_log_file()
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    return lines[-1].decode("utf-8", "replace") if lines else None


__all__ = ["BackendError", "LiveBackend", "open_backend"]
