"""The runner: one detached process owns one migration, whatever happens to its clients.

`spawn(job)` makes the migration's folder (engine/journal.py), starts
`python -m sevconsole.engine.runner FOLDER` in its own session (SIGHUP and SIGINT ignored, stdio
to runner.log, double-forked so no client has to reap it) and returns once the runner listens on
its UNIX socket in the user's runtime folder. The runner probes both hosts again, runs the
preflight, then the engine; every decision goes to the journal before it is acted on, every
Progress snapshot to the attached clients (engine/attach.py) and to snapshots.jsonl.gz.
SIGTERM cancels the migration (a rollback, unless the guest already went forward), then exits.

Socket protocol, JSON lines. Runner -> client: `{"type": "hello", "id", "job", "pid",
"checks": [...]}`, `{"type": "progress", "progress": wire}`, `{"type": "outcome", "outcome":
wire}`. Client -> runner: `{"op": "cancel", "reason": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sevconsole import paths
from sevconsole.engine import journal
from sevconsole.engine.checks import Check, CheckStatus, preflight, refused
from sevconsole.engine.errors import EngineError
from sevconsole.engine.machine import Step
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import Migration, Outcome, Result
from sevconsole.engine.wire import progress_to_wire
from sevconsole.priority import yield_cpu

START_TIMEOUT_S = 20.0
LINGER_S = 3.0  # after the outcome: time for attached clients to read it
MAX_CLIENT_BACKLOG = 32 << 20  # a client that reads nothing is dropped, never waited for
MAX_LINE = 64 << 20
RUNNER_NICE = 10


class RunnerError(EngineError):
    """The runner could not be started or reached; the sentence says why."""


def socket_path(migration_id: str) -> Path:
    return paths.runtime_dir() / f"m-{migration_id}.sock"


def check_to_wire(check: Check) -> dict[str, str]:
    return {"key": check.key, "title": check.title, "status": check.status.value, "sentence": check.sentence}


def check_from_wire(data: Any) -> Check:
    return Check(str(data["key"]), str(data["title"]), CheckStatus(data["status"]), str(data["sentence"]))


def terminal_step(outcome: Outcome, plan_source: str) -> Step:
    if outcome.result == Result.REFUSED:
        return Step.REFUSED
    if not outcome.one_copy:
        return Step.NEEDS_OPERATOR
    return Step.ROLLED_BACK if outcome.runnable[0] == plan_source else Step.DONE


# -- the client's side: start a runner

def spawn(job: dict[str, Any]) -> str:
    """Start a runner for `job` (vm, source, target, where, options); returns the migration id
    once the runner listens. On an embedded lab (kept by a keeper while leases are held) the
    runner gets a lease of its own, handed over before this process lets go of it, so the lab
    stays up for the whole migration even if this client dies the next instant."""
    from sevconsole import leases

    migration_id, where = journal.create({**job, "created": time.time()})
    cmd = [sys.executable, "-m", "sevconsole.engine.runner", str(where)]
    lab = (job.get("where") or {}).get("lab")
    lease = leases.take_if_kept(Path(lab), "runner") if lab else None
    from sevconsole.hosts import passphrases

    env, secret_fds = passphrases.spawn_env()  # identity passphrases this process learnt, by pipe
    try:
        if lease is not None:
            cmd += ["--lease-fd", str(lease.fd)]
        with open(where / "runner.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True, env={**os.environ, **env},
                                    pass_fds=((lease.fd,) if lease is not None else ()) + secret_fds)
        yield_cpu(RUNNER_NICE, proc.pid)  # from its first import on, not only once it has forked
        try:
            proc.wait(timeout=START_TIMEOUT_S)  # the intermediate exits once the runner is forked
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RunnerError(f"the runner for {job.get('vm')} did not start (see {where / 'runner.log'})") \
                from None
    finally:
        for fd in secret_fds:
            os.close(fd)
        if lease is not None:
            lease.detach()  # the runner holds it now
    sock = socket_path(migration_id)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if sock.exists() and journal.runner_alive(where):
            return migration_id
        if proc.returncode != 0 or _ended(where):
            break
        time.sleep(0.02)
    raise RunnerError(f"the runner for {job.get('vm')} did not start: {_log_tail(where)}")


def _ended(where: Path) -> bool:
    return (where / "runner.done").exists()


def _log_tail(where: Path) -> str:
    try:
        with open(where / "runner.log", "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 2000))
            text = handle.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return f"no log at {where / 'runner.log'}"
    return text[-1] if text else f"nothing in {where / 'runner.log'}"


# -- the runner process

class Runner:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.job = journal.load_job(where)
        self.id = str(self.job["id"])
        self.journal = journal.Journal(where / "journal.jsonl")
        self.clients: set[asyncio.StreamWriter] = set()
        self.latest: bytes | None = None
        self.final: bytes | None = None
        self.checks: list[Check] = []
        self.migration: Migration | None = None
        self.cancel_reason: str | None = None
        # closed at the end of serve(): it lives as long as the migration
        self.snapshots = gzip.open(where / "snapshots.jsonl.gz", "ab", compresslevel=5)  # noqa: SIM115
        self._last_snapshot_write = 0.0

    # socket
    async def serve(self) -> int:
        sock = socket_path(self.id)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(sock), limit=1 << 16)
        finally:
            os.umask(old_umask)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.cancel, "the runner was stopped (SIGTERM)")
        (self.where / "runner.json").write_text(json.dumps({"pid": os.getpid(), "socket": str(sock)}))
        try:
            outcome = await self._run()
            self.final = self._line({"type": "outcome", "outcome": outcome.to_wire()})
            for writer in list(self.clients):
                self._send(writer, self.final)
            deadline = time.monotonic() + LINGER_S
            while self.clients and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            server.close()
            with contextlib.suppress(OSError):
                sock.unlink()
            for writer in list(self.clients):
                writer.close()
            self.snapshots.close()
        return 0 if outcome.result == Result.DONE else 1

    def _line(self, message: dict[str, Any]) -> bytes:
        return (json.dumps(message, separators=(",", ":")) + "\n").encode()

    def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.is_closing():
            self.clients.discard(writer)
            return
        if writer.transport.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
            writer.close()
            self.clients.discard(writer)
            return
        writer.write(data)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        try:
            self._send(writer, self._line({"type": "hello", "id": self.id, "job": self.job, "pid": os.getpid(),
                                           "checks": [check_to_wire(c) for c in self.checks]}))
            if self.latest is not None:
                self._send(writer, self.latest)
            if self.final is not None:
                self._send(writer, self.final)
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError):  # over-long line or a reset: drop that client
                    break
                if not line:
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("op") == "cancel":
                    self.cancel(str(message.get("reason") or "cancelled by the operator")[:500])
        finally:
            self.clients.discard(writer)
            writer.close()

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        if self.migration is not None:
            self.migration.cancel(reason)

    def post(self, progress: Progress) -> None:
        self.latest = self._line({"type": "progress", "progress": progress_to_wire(progress)})
        for writer in list(self.clients):
            self._send(writer, self.latest)
        now = time.monotonic()
        if now - self._last_snapshot_write >= 0.1 or progress.phase.terminal:
            self._last_snapshot_write = now
            self.snapshots.write(self.latest)

    def record(self, step: Step, data: dict[str, Any]) -> None:
        self.journal.append(step, **data)

    # the migration
    async def _run(self) -> Outcome:
        from sevconsole.engine import audit
        from sevconsole.hosts.fleet import FleetError

        job = self.job
        try:
            plan, fleet, pool = await asyncio.to_thread(self._plan)
        except (FleetError, RunnerError, OSError) as exc:
            outcome = Outcome(Result.FAILED, f"nothing started: {exc}", runnable=(str(job.get("source")),),
                              migration_id=self.id)
            self.record(Step.REFUSED, {"outcome": outcome.to_wire(), "why": str(exc)})
            self.post(Progress(vm=str(job.get("vm")), source=str(job.get("source")),
                               target=str(job.get("target")), phase=Phase.FAILED, errors=(str(exc),)))
            return outcome
        try:
            from sevconsole.hosts.chains import trust_with_lab_root

            self.checks = preflight(plan, trust_with_lab_root(fleet.lab_root))
            for writer in list(self.clients):  # clients that attached early learn the checks now
                self._send(writer, self._line({"type": "checks",
                                               "checks": [check_to_wire(c) for c in self.checks]}))
            if refused(self.checks):
                bad = " ".join(c.sentence for c in self.checks if c.status == CheckStatus.FAIL)
                outcome = Outcome(Result.REFUSED, f"refused by preflight: {bad}", runnable=(plan.source.name,),
                                  migration_id=self.id)
                try:
                    line = audit.record(plan, self.checks, outcome)
                    outcome = _replace(outcome, audit=json.dumps(line, sort_keys=True))
                except (OSError, ValueError) as exc:
                    outcome = _replace(outcome, errors=(f"audit log not written: {exc}",))
                self.record(Step.REFUSED, {"outcome": outcome.to_wire()})
                self.post(Progress(vm=plan.vm.name, source=plan.source.name, target=plan.target.name,
                                   phase=Phase.FAILED, errors=(outcome.message,)))
                return outcome
            source, target = await asyncio.to_thread(self._links, plan, fleet, pool)
            from sevconsole.engine.hostlinks import migration_for

            self.migration = migration_for(plan, source, target, checks=self.checks, on_progress=self.post,
                                           on_step=self.record)
            if self.cancel_reason is not None:
                self.migration.cancel(self.cancel_reason)
            try:
                outcome = await self.migration.run()
            finally:
                await source.close()
                await target.close()
            outcome = _replace(outcome, migration_id=self.id)
            step = terminal_step(outcome, plan.source.name)
            self.record(step, {"outcome": outcome.to_wire()})
            return outcome
        finally:
            pool.close()

    def _plan(self) -> tuple[MigrationPlan, Any, Any]:
        from sevconsole.hosts.discovery import discover
        from sevconsole.hosts.fleet import open_where, pick_vm

        job = self.job
        fleet = open_where(job.get("where") or {})
        pool = fleet.options.pool()
        try:
            specs = [fleet.spec(str(job["source"])), fleet.spec(str(job["target"]))]
            if None in specs:
                raise RunnerError(f"{job['source']} or {job['target']} is no longer in the inventory")
            reports = discover([s for s in specs if s is not None], fleet.options, pool=pool)
            source, target = reports
            vm = pick_vm([source], str(job["vm"]))
            if vm is None:
                why = "; ".join(source.errors) or "it runs no VM of that name any more"
                raise RunnerError(f"{source.name} runs no VM named {job['vm']} ({why})")
            plan = MigrationPlan(vm=vm, source=source, target=target,
                                 downtime_limit_ms=int(job.get("downtime_ms", 300)),
                                 bandwidth_bps=job.get("bandwidth_bps"),
                                 stall_warn_s=float(job.get("stall_warn_s", 10.0)),
                                 stall_timeout_s=float(job.get("stall_timeout_s", 60.0)),
                                 keep_source=bool(job.get("keep_source", False)))
        except BaseException:
            pool.close()
            raise
        return plan, fleet, pool

    def _links(self, plan: MigrationPlan, fleet: Any, pool: Any) -> tuple[Any, Any]:
        from sevconsole.engine.hostlinks import links_for

        return links_for(plan, fleet, pool)


def _replace(outcome: Outcome, **changes: Any) -> Outcome:
    from dataclasses import replace

    return replace(outcome, **changes)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal or SSH session is not our end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not argv:
        print("usage: python -m sevconsole.engine.runner FOLDER [--lease-fd N]", file=sys.stderr)
        return 2
    where = Path(argv[0])
    from sevconsole.hosts import passphrases

    passphrases.adopt_from_env()  # the passphrases the starter handed over (a pipe), if any
    lease_fd = int(argv[2]) if len(argv) >= 3 and argv[1] == "--lease-fd" else None
    if lease_fd is not None:
        from sevconsole import leases

        try:
            leases.adopt(lease_fd)  # held for the runner's life: the fd is simply never closed
        except (OSError, ValueError) as exc:
            print(f"lab lease not adopted: {exc}", file=sys.stderr)
    if os.fork() > 0:  # the spawner reaps this intermediate at once; the runner is nobody's child
        os._exit(0)
    os.umask(0o077)  # journals, logs and snapshots name hosts and guests: the user's alone
    with contextlib.suppress(OSError):
        os.setsid()
    # A runner mostly waits on its hosts; the CPU it wants (start-up, probes, snapshots) can wait a
    # few ms for the operator's keys in the console beside it (a session's group too: priority.py).
    yield_cpu(RUNNER_NICE)
    try:
        with journal.hold(where) as held:
            if not held:
                print(f"{where}: another runner owns this migration", file=sys.stderr)
                return 2
            return asyncio.run(Runner(where).serve())
    except Exception:  # the log is the only place a runner's own bug can be read
        traceback.print_exc()
        return 70
    finally:
        with contextlib.suppress(OSError):
            (where / "runner.done").touch()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
