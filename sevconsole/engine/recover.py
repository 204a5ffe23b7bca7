"""Reconciliation: finish the migrations whose runner died, by the engine's own rules.

For each unfinished journal (a last step that is not terminal, and no runner holding its lock):
observe both ends over SSH and QMP, ask `machine.decide`, record the decision in the journal,
act, observe again; until exactly one copy can run (DONE or ROLLED_BACK) or the machine says the
operator must act (NEEDS_OPERATOR, with its sentence). Each result goes to the audit log.
One recover at a time: a second one waits on `migrations/recover.lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from sevconsole import paths
from sevconsole.engine import audit, journal
from sevconsole.engine.errors import LinkError
from sevconsole.engine.machine import (
    ACTIVE,
    Action,
    EndState,
    Facts,
    Observation,
    Step,
    decide,
    runnable_copies,
)
from sevconsole.sev.status import GuestState

MAX_ROUNDS = 8
QMP_TIMEOUT_S = 10.0
LAB_FIRMWARE = "x-query-sev-firmware"
HELD_FINISH = "x-sev-receive-finish"
# QEMU's SevState names, for hosts without the lab's firmware view
QEMU_SEV_STATES = {"uninit": GuestState.UNINIT, "launch-update": GuestState.LUPDATE,
                   "launch-secret": GuestState.LSECRET, "running": GuestState.RUNNING,
                   "send-update": GuestState.SUPDATE, "receive-update": GuestState.RUPDATE}


@dataclass(frozen=True)
class Reconciled:
    id: str
    vm: str
    source: str
    target: str
    result: str  # reconciled | needs-operator | skipped
    step: str
    sentence: str
    runnable: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "source": self.source, "target": self.target,
                "result": self.result, "step": self.step, "sentence": self.sentence,
                "runnable": list(self.runnable), "actions": list(self.actions),
                "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def recover_lock(on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    base = paths.migrations_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(base / "recover.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pending() -> list[journal.Entry]:
    """Unfinished migrations whose runner is gone, oldest first."""
    return sorted((e for e in journal.entries() if e.unfinished), key=lambda e: e.id)


@dataclass
class _End:
    """One end of a migration being reconciled: how to reach it and what it offers."""

    name: str
    link: Any  # engine.ssh.SshHost
    qmp_path: str | None
    pid: int | None = None
    client: QMPClient | None = None
    commands: set[str] = field(default_factory=set)

    async def connect(self) -> bool:
        if self.client is not None:
            return True
        if not self.qmp_path:
            return False
        try:
            self.client = await asyncio.wait_for(self.link.open_qmp(self.qmp_path), QMP_TIMEOUT_S)
            answer = await self.execute("query-commands")
            self.commands = {str(c.get("name")) for c in answer}
            return True
        except (LinkError, QMPError, OSError, TimeoutError):
            await self.drop()
            return False

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if self.client is None:
            raise LinkError(self.name, f"no QMP link for {command}")
        try:
            return await asyncio.wait_for(self.client.execute(command, args), QMP_TIMEOUT_S)
        except (QMPError, OSError, TimeoutError, EOFError) as exc:
            raise LinkError(self.name, f"{command}: {exc}") from exc

    async def drop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        self.client = None

    async def observe(self, sev: bool) -> EndState:
        if not await self.connect():
            return EndState(reachable=False, gone=await self._gone())
        try:
            run_state = str((await self.execute("query-status")).get("status"))
            migration = str((await self.execute("query-migrate")).get("status", "none"))
        except LinkError:
            await self.drop()
            return EndState(reachable=False, gone=await self._gone())
        guest = None
        if sev:
            guest = await self._guest_state(run_state, migration)
        return EndState(reachable=True, run_state=run_state, migration=migration, guest=guest)

    async def _guest_state(self, run_state: str, migration: str) -> GuestState | None:
        with contextlib.suppress(LinkError, KeyError, ValueError, TypeError, AttributeError):
            if LAB_FIRMWARE in self.commands:
                return GuestState(int((await self.execute(LAB_FIRMWARE))["guest-state"]))
            if "query-sev" in self.commands:
                state = QEMU_SEV_STATES.get(str((await self.execute("query-sev")).get("state")))
                # QEMU has no "sent": a source that completed and sits in postmigrate was SENT
                if state == GuestState.SUPDATE and run_state == "postmigrate" and migration == "completed":
                    return GuestState.SENT
                return state
        return None

    async def find_incoming(self, vm: str) -> bool:
        """An incoming copy of `vm` waiting on this host (QEMU inmigrate), adopted as ours: a
        driver that died between launching it and journaling its pid leaves exactly that."""
        from sevconsole.hosts import remote
        from sevconsole.hosts.errors import HostError

        try:
            conn = await self.link._conn()
            report = await asyncio.to_thread(remote.probe, conn)
        except (HostError, LinkError, OSError):
            return False
        for found in report.get("vms") or []:
            if not isinstance(found, dict) or found.get("name") != vm or not found.get("qmp"):
                continue
            self.qmp_path, self.pid = str(found["qmp"]), found.get("pid") if isinstance(found.get("pid"), int) else None
            if await self.connect():
                with contextlib.suppress(LinkError):
                    if (await self.execute("query-status")).get("status") == "inmigrate":
                        return True
                await self.drop()
            self.qmp_path, self.pid = None, None
        return False

    async def _gone(self) -> bool:
        """The process is confirmed absent (the host answers and does not list it)."""
        if self.pid is None:
            return self.qmp_path is None
        from sevconsole.hosts import remote
        from sevconsole.hosts.errors import HostError

        try:
            conn = await self.link._conn()
            report = await asyncio.to_thread(remote.probe, conn)
        except (HostError, LinkError, OSError):
            return False
        pids = {vm.get("pid") for vm in report.get("vms") or [] if isinstance(vm, dict)}
        return self.pid not in pids


async def _act(action: Action, src: _End, dst: _End) -> str:
    """Carry out one action; returns a sentence of what happened."""
    try:
        if action == Action.CANCEL_MIGRATION:
            await src.execute("migrate_cancel")
            deadline = time.monotonic() + QMP_TIMEOUT_S
            while time.monotonic() < deadline:
                status = (await src.execute("query-migrate")).get("status")
                if status not in ACTIVE:
                    return f"{src.name}: migration cancelled ({status})"
                await asyncio.sleep(0.05)
            return f"{src.name}: migrate_cancel sent; the stream has not ended yet"
        if action == Action.STOP_TARGET:
            with contextlib.suppress(LinkError):
                await dst.execute("quit")
            await dst.drop()
            if dst.pid is not None:
                stopped = await dst.link.stop(dst.pid)
                return f"{dst.name}: incoming VM (pid {dst.pid}) {'stopped' if stopped else 'already gone'}"
            return f"{dst.name}: incoming VM told to quit"
        if action == Action.CONT_SOURCE:
            await src.execute("cont")
            return f"{src.name}: guest resumed (cont)"
        if action == Action.CONT_TARGET:
            await dst.execute("cont")
            return f"{dst.name}: guest resumed (cont)"
        if action == Action.FINISH_HELD:
            await dst.execute(HELD_FINISH)
            return f"{dst.name}: held guest finished ({HELD_FINISH})"
    except LinkError as exc:
        return f"{action.value} failed: {exc}"
    return f"{action.value}: nothing to do"


def _effective_step(read: journal.JournalRead) -> Step:
    """The last decision that says which way the guest was going (NEEDS_OPERATOR records don't)."""
    for record in reversed(read.records):
        if record.step != Step.NEEDS_OPERATOR:
            return record.step
    return Step.PLANNED


async def reconcile(entry: journal.Entry, fleet: Any, *, operator_log: Path | None = None) -> Reconciled:
    """Bring one unfinished migration to exactly one runnable copy (or say why not)."""
    t0 = time.monotonic()
    read = entry.journal
    if not read.trusted:
        return Reconciled(entry.id, entry.vm, entry.source, entry.target, result="needs-operator", step="corrupt",
                          sentence="; ".join(read.problems) + ": the journal is not acted on; check both "
                          "hosts by hand (`sevconsole discover`)")
    data = read.data()
    facts = Facts(sev=bool(data.get("sev")), source_was_running=bool(data.get("source_was_running", True)))
    from sevconsole.engine.ssh import SshHost

    pool = fleet.options.pool()
    links: list[SshHost] = []
    try:
        def link(name: str) -> SshHost:
            spec = fleet.spec(name)
            address = spec.address if spec is not None and spec.address else name
            made = SshHost(name, address, _LazyConn(fleet, pool, name),  # type: ignore[arg-type]
                           reconnect=lambda: fleet.connection(pool, name))
            links.append(made)
            return made

        src = _End(entry.source, link(entry.source), data.get("source_qmp"))
        pid = data.get("target_pid")
        dst = _End(entry.target, link(entry.target), data.get("target_qmp"),
                   pid=int(pid) if isinstance(pid, int) else None)
        journal_out = journal.Journal(entry.folder / "journal.jsonl")
        step = _effective_step(read)
        if step == Step.PLANNED and dst.pid is None and await dst.find_incoming(entry.vm):
            journal_out.append(Step.TARGET_LAUNCHED, recovered=True, target_pid=dst.pid, target_qmp=dst.qmp_path,
                               why="an incoming VM launched before its pid was journaled")
            step = Step.TARGET_LAUNCHED
        done: list[str] = []
        decision = None
        for _ in range(MAX_ROUNDS):
            obs = Observation(await src.observe(facts.sev), await dst.observe(facts.sev))
            facts = Facts(facts.sev, facts.source_was_running, can_finish_held=HELD_FINISH in dst.commands)
            decision = decide(step, facts, obs)
            if decision.step.terminal or decision.step == Step.NEEDS_OPERATOR:
                runnable = runnable_copies(facts, obs, entry.source, entry.target)
                if decision.step != Step.NEEDS_OPERATOR or read.step != Step.NEEDS_OPERATOR \
                        or read.data().get("why") != decision.sentence:
                    journal_out.append(decision.step, recovered=True, why=decision.sentence,
                                       runnable=list(runnable), actions=done)
                result = "needs-operator" if decision.step == Step.NEEDS_OPERATOR else "reconciled"
                out = Reconciled(entry.id, entry.vm, entry.source, entry.target, result=result,
                                 step=decision.step.value, sentence=decision.sentence,
                                 runnable=runnable, actions=tuple(done), seconds=time.monotonic() - t0)
                _audit(out, facts, operator_log)
                return out
            journal_out.append(decision.step, recovered=True, why=decision.sentence,
                               actions=[a.value for a in decision.actions])
            step = decision.step
            for action in decision.actions:
                done.append(await _act(action, src, dst))
        sentence = (decision.sentence if decision else "") + "; still not settled after " \
            f"{MAX_ROUNDS} rounds: check both hosts, then run recover again"
        journal_out.append(Step.NEEDS_OPERATOR, recovered=True, why=sentence)
        out = Reconciled(entry.id, entry.vm, entry.source, entry.target, result="needs-operator",
                         step=Step.NEEDS_OPERATOR.value, sentence=sentence,
                         actions=tuple(done), seconds=time.monotonic() - t0)
        _audit(out, facts, operator_log)
        return out
    finally:
        for made in links:
            with contextlib.suppress(Exception):
                await made.close()
        await asyncio.to_thread(pool.close)


class _LazyConn:
    """An SSH connection opened on first use, so an unreachable host costs nothing up front."""

    alive = False

    def __init__(self, fleet: Any, pool: Any, name: str) -> None:
        self.fleet, self.pool, self.name = fleet, pool, name


def _audit(out: Reconciled, facts: Facts, path: Path | None) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "operator": audit.operator_name(),
              "event": "recover", "migration": out.id, "vm": out.vm, "source": out.source,
              "target": out.target, "sev": facts.sev, "outcome": out.result, "step": out.step,
              "message": out.sentence, "runnable": list(out.runnable), "actions": list(out.actions)}
    with contextlib.suppress(OSError, ValueError):
        audit.append(path or paths.audit_log_file(), record)


def recover_all(override: Any = None, *, on_wait: Any = None, on_start: Any = None) -> list[Any]:
    """Reconcile every pending migration (under the recover lock); blocking."""
    from sevconsole.hosts.fleet import FleetError, open_where

    results: list[Reconciled] = []
    with recover_lock(on_wait):
        for entry in pending():
            where = entry.job.get("where") or {}
            if override is not None and where != override.where():
                results.append(Reconciled(entry.id, entry.vm, entry.source, entry.target, "skipped",
                                          str(entry.step), f"started on another fleet ({where})"))
                continue
            with journal.hold(entry.folder) as held:
                if not held:  # a runner (or another console's recover) took it meanwhile
                    continue
                if on_start is not None:
                    on_start(entry)
                try:
                    fleet = override or open_where(where)
                except FleetError as exc:
                    results.append(Reconciled(entry.id, entry.vm, entry.source, entry.target, "needs-operator",
                                              str(entry.step), f"its hosts cannot be opened: {exc}; give "
                                              "--inventory or --lab"))
                    continue
                results.append(asyncio.run(reconcile(journal.entry(entry.id), fleet)))
    return results


async def apply_fix(action: Any, fleet: Any) -> str:
    """Carry out an attention item's safe action (engine.attention.SafeAction), confirmed by the
    operator before this is called; returns a sentence of what happened."""
    from sevconsole.engine.attention import Fix
    from sevconsole.engine.ssh import SshHost

    if action.fix == Fix.RECOVER:
        results = await asyncio.to_thread(recover_all, fleet)
        mine = [r for r in results if r.id == action.migration_id]
        return mine[0].sentence if mine else f"migration {action.migration_id} had nothing left to reconcile"
    pool = fleet.options.pool()
    try:
        conn = await asyncio.to_thread(fleet.connection, pool, action.host)
        spec = fleet.spec(action.host)
        link = SshHost(action.host, spec.address if spec and spec.address else action.host, conn)
        try:
            if action.fix == Fix.CONT:
                end = _End(action.host, link, action.qmp)
                if not await end.connect():
                    raise LinkError(action.host, f"cannot reach the QMP socket {action.qmp}")
                try:
                    await end.execute("cont")
                finally:
                    await end.drop()
                return f"{action.host}: resumed (cont)"
            if action.fix == Fix.STOP and action.pid is not None:
                stopped = await link.stop(action.pid)
                return f"{action.host}: pid {action.pid} {'stopped' if stopped else 'was already gone'}"
            return "nothing to do"
        finally:
            await link.close()
    finally:
        await asyncio.to_thread(pool.close)
