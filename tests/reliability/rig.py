"""A lab rig for fault campaigns: start a lab, run migrations through the engine (over real SSH
and QMP, as the console does) with a fault proxy on the migration stream, and count the guest's
runnable copies independently of the engine.

The census asks each live lab host over SSH which VMs it has (the helper's `probe`), then each VM
over its own QMP socket: firmware guest state (`x-query-sev-firmware`), run state and the guest's
plaintext digest. A copy is runnable when its firmware says RUNNING (plain guests: QEMU says
running or paused outside a migration). Used by tests/reliability and benchmarks/faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko
from qemu.qmp import QMPClient

from sevconsole.engine.checks import preflight
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.run import Migration, Outcome
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.discovery import DiscoveryOptions, discover, endpoint_for
from sevconsole.hosts.inventory import load_inventory
from sevconsole.hosts.report import HostReport
from sevconsole.lab import Lab
from sevconsole.sev.certs import AmdCert
from sevconsole.sev.trust import TrustStore

from .proxy import Fault, StreamProxy

HELPER = "python3 -c 'import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))' BLOB "
GUEST_RUNNING, GUEST_SENT = 3, 6
QMP_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ the census


@dataclass(frozen=True)
class Copy:
    host: str
    pid: int
    status: str  # QEMU run state
    guest_state: int | None  # firmware numbering; None for a plain guest
    digest: str | None

    @property
    def runnable(self) -> bool:
        if self.guest_state is not None:
            return self.guest_state == GUEST_RUNNING and self.status not in ("inmigrate", "postmigrate")
        return self.status in ("running", "paused")


@dataclass(frozen=True)
class Census:
    vm: str
    copies: tuple[Copy, ...]
    dead_hosts: tuple[str, ...] = ()

    @property
    def runnable(self) -> tuple[Copy, ...]:
        return tuple(c for c in self.copies if c.runnable)

    def describe(self) -> str:
        parts = [f"{c.host}/pid {c.pid}: {c.status}, firmware {c.guest_state}" for c in self.copies]
        dead = f"; dead hosts: {', '.join(self.dead_hosts)}" if self.dead_hosts else ""
        return f"{self.vm}: " + ("; ".join(parts) or "no copy at all") + dead


def helper(lab: Lab, host: str, command: str, stdin: dict | None = None, timeout: float = 20.0) -> dict:
    """One remote-helper command on a lab host over a fresh SSH connection (independent of the
    console's pool); raises OSError/paramiko errors when the host is gone."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=lab.host(host).port, username="lab", key_filename=str(lab.client_key),
                   look_for_keys=False, allow_agent=False, timeout=timeout, banner_timeout=timeout,
                   auth_timeout=timeout)
    try:
        chan = client.get_transport().open_session(timeout=timeout)
        chan.settimeout(timeout)
        chan.exec_command(HELPER + command)
        if stdin is not None:
            chan.sendall(json.dumps(stdin).encode())
        chan.shutdown_write()
        out = bytearray()
        while data := chan.recv(65536):
            out += data
        code = chan.recv_exit_status()
    finally:
        client.close()
    if code != 0:
        raise RuntimeError(f"{host}: helper {command} exited {code}: {bytes(out)[:300]!r}")
    return json.loads(out)


async def qmp_client(path: str, name: str = "census") -> QMPClient:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(path), QMP_TIMEOUT_S)
    return client


async def qmp_once(path: str, command: str, args: dict | None = None) -> Any:
    client = await qmp_client(path)
    try:
        return await asyncio.wait_for(client.execute(command, args), QMP_TIMEOUT_S)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def census(lab: Lab, vm: str, hosts: tuple[str, ...] | None = None, *, digests: bool = True) -> Census:
    """Every copy of `vm` on the lab's live hosts."""
    copies: list[Copy] = []
    dead: list[str] = []
    for h in lab.hosts:
        if hosts is not None and h.name not in hosts:
            continue
        if not h.alive:
            dead.append(h.name)
            continue
        probe = await asyncio.to_thread(helper, lab, h.name, "probe")
        for entry in probe["vms"]:
            if entry["name"] != vm:
                continue
            with contextlib.suppress(Exception):  # a VM being torn down right now: no copy
                copies.append(await _copy(h.name, entry, digests))
    return Census(vm, tuple(copies), tuple(dead))


async def _copy(host: str, entry: dict, digests: bool) -> Copy:
    client = await qmp_client(entry["qmp"])
    try:
        status = (await asyncio.wait_for(client.execute("query-status"), QMP_TIMEOUT_S))["status"]
        sev = any(str(a).startswith("sev-guest") for a in entry["argv"])
        state = None
        if sev:
            fw = await asyncio.wait_for(client.execute("x-query-sev-firmware"), QMP_TIMEOUT_S)
            state = int(fw["guest-state"])
        digest = None
        if digests and (state in (None, GUEST_RUNNING)):
            digest = (await asyncio.wait_for(client.execute("x-query-guest-digest"), QMP_TIMEOUT_S))["sha256"]
        return Copy(host, int(entry["pid"]), str(status), state, digest)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def settle(lab: Lab, vm: str, hosts: tuple[str, ...], timeout: float = 30.0) -> Census:
    """Waits until no copy of `vm` is mid-migration (inmigrate with a live stream, or a source
    still sending), then returns the census. A safe state is a settled one."""
    deadline = time.monotonic() + timeout
    while True:
        c = await census(lab, vm, hosts, digests=False)
        busy = [x for x in c.copies if x.guest_state in (4, 5) or x.status in ("finish-migrate", "inmigrate")]
        if not busy or time.monotonic() > deadline:
            return await census(lab, vm, hosts)
        await asyncio.sleep(0.1)  # the lab tears a failed incoming VM down asynchronously


# ------------------------------------------------------------------ the rig


class ProxiedTarget:
    """The engine's target HostLink with the migration stream routed through a StreamProxy: the
    port the target's QEMU reports in `query-migrate` is replaced by the proxy's."""

    def __init__(self, link: SshHost, make_proxy: Callable[[int], StreamProxy]) -> None:
        self._link = link
        self._make_proxy = make_proxy
        self.name = link.name
        self.address = link.address
        self.proxy: StreamProxy | None = None

    async def open_qmp(self, path: str) -> QMPClient:
        client = await self._link.open_qmp(path)
        execute = client.execute

        async def rewriting(cmd: str, args: dict | None = None) -> Any:
            answer = await execute(cmd, args)
            if cmd == "query-migrate" and isinstance(answer, dict) and answer.get("socket-address"):
                port = int(answer["socket-address"][0]["port"])
                if self.proxy is None:
                    self.proxy = self._make_proxy(port)
                answer = dict(answer)
                answer["socket-address"] = [dict(answer["socket-address"][0], port=str(self.proxy.port))]
            return answer

        client.execute = rewriting  # type: ignore[method-assign]
        return client

    async def launch_incoming(self, argv):  # type: ignore[no-untyped-def]
        return await self._link.launch_incoming(argv)

    async def stop(self, pid: int) -> bool:
        return await self._link.stop(pid)

    async def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        await self._link.close()


class KeepSource:
    """The engine's source HostLink, remembering the QMP clients it opened (to drop them)."""

    def __init__(self, link: SshHost) -> None:
        self._link = link
        self.inner = link  # its `_links` hold the QMP bridges (to drop one)
        self.name = link.name
        self.address = link.address
        self.clients: list[QMPClient] = []

    async def open_qmp(self, path: str) -> QMPClient:
        client = await self._link.open_qmp(path)
        self.clients.append(client)
        return client

    async def launch_incoming(self, argv):  # type: ignore[no-untyped-def]
        return await self._link.launch_incoming(argv)

    async def stop(self, pid: int) -> bool:
        return await self._link.stop(pid)

    async def close(self) -> None:
        await self._link.close()


@dataclass
class Rig:
    """A running lab reached like any hosts: inventory, discovery over SSH, the engine."""

    lab: Lab
    options: DiscoveryOptions
    pool: Any
    trust: TrustStore
    inventory: Any
    audit: Path | bool = False

    @classmethod
    def start(cls, state_dir: Path, hosts: int = 2, **lab_kw: Any) -> Rig:
        lab = Lab.start(state_dir / "lab", hosts=hosts, **lab_kw)
        try:
            amd = state_dir / "amd-roots"
            amd.mkdir(exist_ok=True)
            options = DiscoveryOptions(known_hosts=lab.known_hosts, system_known_hosts=(),
                                       lab_root=lab.paths.lab_root, amd_roots=amd, use_agent=False)
            trust = TrustStore.amd().with_lab_root(AmdCert.from_bytes(lab.lab_ark.read_bytes()))
            return cls(lab, options, options.pool(), trust, load_inventory(lab.inventory))
        except BaseException:
            lab.stop()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.close()
        self.lab.stop()

    def spec(self, name: str) -> Any:
        return self.inventory.by_name()[name]

    def reports(self, *names: str, need: str | None = None, tries: int = 10) -> dict[str, HostReport]:
        specs = [h for h in self.inventory.hosts if h.name in names]
        got: dict[str, HostReport] = {}
        for _ in range(tries):
            got = {r.name: r for r in discover(specs, self.options, pool=self.pool)}
            if all(r.reachable and not any(v.errors for v in r.vms if v.name == need) for r in got.values()):
                return got
        raise AssertionError(f"lab discovery kept failing: {[(r.name, r.error, [v.errors for v in r.vms]) for r in got.values()]}")

    def link(self, name: str) -> SshHost:
        endpoint = endpoint_for(self.spec(name), self.inventory.hosts)
        # as `sevconsole migrate` does: a dropped transport is re-opened from the pool
        return SshHost(name, "127.0.0.1", self.pool.get(endpoint), reconnect=lambda: self.pool.get(endpoint))

    def plan(self, vm: str, src: str, dst: str, *, strip_hold: bool = True, **kw: Any) -> MigrationPlan:
        reports = self.reports(src, dst, need=vm)
        found = [v for v in reports[src].vms if v.name == vm and v.firmware_guest_state in (None, GUEST_RUNNING)
                 and v.status in ("running", "paused")]
        if not found:
            raise AssertionError(f"no runnable {vm} on {src}: {reports[src].vms}")
        vm_info = found[0]
        if strip_hold and "-S" in vm_info.argv:
            # A guest that arrived by migration carries -S; the engine then waits 10 s for its
            # target to run by itself (see test_engine_faults.py::test_second_hop_*). The
            # campaign measures faults, not that wait.
            vm_info = replace(vm_info, argv=tuple(a for a in vm_info.argv if a != "-S"))
        return MigrationPlan(vm=vm_info, source=reports[src], target=reports[dst], **kw)

    def kill_host(self, name: str) -> None:
        os.kill(self.lab.host(name).pid, signal.SIGKILL)
        self.lab.host(name).process.wait(timeout=10)


@dataclass
class Attempt:
    """One migration with one fault, as the campaign records it."""

    kind: str
    fault: str
    outcome: Outcome | None
    census: Census
    digest_before: str
    fired: bool
    safe_after_s: float | None  # from the fault acting to the engine's verified end
    violations: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    note: str = ""
    source: str = ""
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # what a kind measures besides the promises

    @property
    def ends_on(self) -> str:
        """Where the guest can run now: source, target, none, or dead host."""
        hosts = [c.host for c in self.census.runnable]
        if not hosts:
            return "dead host" if self.note else "none"
        return "+".join("source" if h == self.source else "target" for h in hosts)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "fault": self.fault, "fired": self.fired,
                "result": self.outcome.result if self.outcome else None,
                "message": self.outcome.message if self.outcome else None,
                "runnable": [c.host for c in self.census.runnable], "violations": self.violations,
                "digest_mismatches": self.mismatches, "safe_after_s": self.safe_after_s, "note": self.note,
                "ends_on": self.ends_on, **self.extra}


async def run_with_fault(rig: Rig, vm: str, src: str, dst: str, faults: list[Fault], *, kind: str,
                         plan_kw: dict[str, Any] | None = None, on_progress: Callable[[Any], None] | None = None,
                         before_run: Callable[[Migration, KeepSource, ProxiedTarget], None] | None = None,
                         host_killed: Callable[[], str | None] = lambda: None,
                         record: bool = False) -> tuple[Attempt, ProxiedTarget]:
    """Plans, preflights and runs one migration through the engine with `faults` on the stream,
    then checks the promises: one runnable copy (or, when a host was killed, no clone and the
    survivor intact) and its memory equal to the guest's before the run."""
    plan = rig.plan(vm, src, dst, **(plan_kw or {}))
    path = plan.vm.qmp_path
    assert path is not None
    before = (await qmp_once(path, "x-query-guest-digest"))["sha256"]
    checks = preflight(plan, rig.trust)
    source = KeepSource(rig.link(src))
    target = ProxiedTarget(rig.link(dst), lambda port: StreamProxy(("127.0.0.1", port), faults, record=record))
    mig = Migration(plan, source, target, checks=checks, on_progress=on_progress, poll_interval_s=0.05,
                    audit_log=rig.audit)
    if before_run is not None:
        before_run(mig, source, target)
    try:
        outcome = await asyncio.wait_for(mig.run(), 120)
    finally:
        await source.close()
        await target.close()
    ended = time.monotonic()
    proxy = target.proxy
    fired = bool(proxy and proxy.fired.is_set())
    safe = round(ended - proxy.fired_at, 3) if proxy and proxy.fired_at else None
    killed = host_killed()
    c = await settle(rig.lab, vm, (src, dst))
    att = Attempt(kind, "; ".join(f.describe() for f in faults) or "none", outcome, c, before, fired, safe,
                  source=src, target=dst)
    check_promises(att, src, dst, killed)
    return att, target


def check_promises(att: Attempt, src: str, dst: str, killed: str | None) -> None:
    runnable = att.census.runnable
    if len(runnable) > 1:
        att.violations.append(f"cloned: {att.census.describe()}")
    elif not runnable:
        if killed is None:
            att.violations.append(f"lost: {att.census.describe()}")
        else:
            # The guest died with its host: only acceptable when it had not moved yet, i.e. the
            # host killed held the one copy (the source before SEND_FINISH).
            att.note = f"{killed} was killed with the guest's only copy"
            if killed == dst and att.outcome is not None and att.outcome.result == "done":
                att.violations.append("engine said done but the target host died")
    for copy in runnable:
        if copy.digest != att.digest_before:
            att.mismatches.append(f"{copy.host}: {str(copy.digest)[:16]} != {att.digest_before[:16]} before")
    o = att.outcome
    if o is not None and killed is None:
        # the engine's own verdict must agree with what the hosts say
        if set(o.runnable) != {c.host for c in runnable}:
            att.violations.append(f"engine says runnable on {list(o.runnable)}, census finds "
                                  f"{[c.host for c in runnable]}")
        if o.result == "done" and [c.host for c in runnable] != [dst]:
            att.violations.append(f"engine said done, census: {att.census.describe()}")


async def cleanup_vm(rig: Rig, vm: str) -> str | None:
    """Quits every non-runnable leftover copy of `vm` (a SENT source, like QEMU exiting after a
    migration) and returns the host holding the runnable one."""
    return await tidy(rig.lab, vm)


async def tidy(lab: Lab, vm: str) -> str | None:
    """`cleanup_vm` for a bare lab."""
    c = await census(lab, vm, digests=False)
    home = None
    for copy in c.copies:
        if copy.runnable:
            home = copy.host
            continue
        with contextlib.suppress(Exception):
            await asyncio.to_thread(helper, lab, copy.host, f"stop {copy.pid}")
    return home


def fault_plan(rng: Any, kind: str, total_out: int) -> list[Fault]:
    """A fault of `kind` at a random place of a stream about `total_out` bytes long."""
    from sevconsole.lab.stream import Frame

    if kind == "cut-stream":
        return [Fault("cut", at=int(rng.integers(0, total_out)))]
    if kind == "cut-reply":
        return [Fault("cut", direction="back", at=int(rng.integers(0, 10)))]
    if kind == "flip-session":
        return [Fault("flip", frame=Frame.SEV_START, offset=8 + 2084 + 4 + int(rng.integers(0, 128)),
                      mask=1 << int(rng.integers(0, 8)))]
    if kind == "flip-header":
        return [Fault("flip", frame=Frame.PRIVATE, nth=int(rng.integers(0, 8)), offset=16 + int(rng.integers(0, 52)),
                      mask=1 << int(rng.integers(0, 8)))]
    if kind == "flip-ciphertext":
        return [Fault("flip", frame=Frame.PRIVATE, nth=int(rng.integers(0, 8)), offset=72 + int(rng.integers(0, 4096)),
                      mask=1 << int(rng.integers(0, 8)))]
    raise ValueError(kind)


async def replay_to(rig: Rig, host: str, vm: str, recorded: bytes) -> tuple[bytes, Census]:
    """Starts an incoming `vm` on `host` (same command line as the guest's), opens its listener,
    sends it the recorded bytes; returns the listener's answer and the host's census after."""
    argv = None
    for h in rig.lab.hosts:
        if h.alive:
            for entry in (await asyncio.to_thread(helper, rig.lab, h.name, "probe"))["vms"]:
                if entry["name"] == vm:
                    argv = entry["argv"]
    assert argv is not None, f"no {vm} anywhere to copy the command line from"
    incoming = await asyncio.to_thread(helper, rig.lab, host, "launch-incoming", {"argv": argv})
    await qmp_once(incoming["qmp"], "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info = await qmp_once(incoming["qmp"], "query-migrate")
    port = int(info["socket-address"][0]["port"])
    from .proxy import replay

    answer = await asyncio.to_thread(replay, ("127.0.0.1", port), recorded)
    return answer, await settle(rig.lab, vm, (host,))


def plain_proxy(port: int) -> StreamProxy:
    """A proxy without faults (to see what crossed)."""
    return StreamProxy(("127.0.0.1", port))


def rebind(plan: MigrationPlan, **vm_changes: Any) -> MigrationPlan:
    return replace(plan, vm=replace(plan.vm, **vm_changes))


# ------------------------------------------------------------------ durable migrations, as processes

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("connecting", "send-start", "pre-copy", "stop-and-copy", "finishing")  # the order they come in
RUNNER_POINTS = ("target-launched", "pre-copy", "stop-and-copy", "send-finished")  # where a runner is killed


@dataclass
class Console:
    """An operator's console folders for commands run as processes (`migrate`, `recover`,
    `migrations`): state (the journals), a short runtime folder (runner sockets: a UNIX socket
    path has at most 108 bytes), data (audit log) and config."""

    base: Path
    runtime: Path
    home: Path  # HOME: no operator's ~/.ssh is read

    @classmethod
    def make(cls, base: Path) -> Console:
        import tempfile

        base.mkdir(parents=True, exist_ok=True)
        (base / "home").mkdir(exist_ok=True)
        return cls(base, Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp")), base / "home")

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def migrations(self) -> Path:
        return self.state / "migrations"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SEVCONSOLE_STATE_DIR": str(self.state), "SEVCONSOLE_RUNTIME_DIR": str(self.runtime),
                "SEVCONSOLE_DATA_DIR": str(self.base / "data"), "SEVCONSOLE_CONFIG_DIR": str(self.base / "config"),
                "SEVCONSOLE_OPERATOR": "tester", "HOME": str(self.home)}

    def argv(self, *args: str) -> list[str]:
        import sys

        return [sys.executable, "-m", "sevconsole", *args]

    def run(self, *args: str, timeout: float = 120.0) -> Any:
        import subprocess

        return subprocess.run(self.argv(*args), capture_output=True, text=True, cwd=ROOT, env=self.env(),
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, *args: str, name: str = "client") -> Client:
        """A command in its own session (as from its own terminal), stdout read line by line."""
        import subprocess

        err = self.base / f"{name}-{time.monotonic_ns()}.stderr"
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(self.argv(*args), cwd=ROOT, env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=stderr, bufsize=0, start_new_session=True)
        return Client(proc, err)

    def folders(self) -> list[Path]:
        try:
            return sorted(p for p in self.migrations.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def migration(self, timeout: float = 30.0, known: Collection[Path] = ()) -> Path:
        """The folder of the migration just started under this console (not one of `known`),
        once its runner runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [f for f in self.folders() if f not in known]
            if found and (found[-1] / "runner.json").exists():
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no runner started under {self.migrations} in {timeout} s")

    @staticmethod
    def runner_pid(folder: Path) -> int:
        return int(json.loads((folder / "runner.json").read_text())["pid"])

    @staticmethod
    def wait_runner_gone(folder: Path, timeout: float = 60.0) -> Any:
        """Waits until no runner holds the migration's lock; returns its journal as read then."""
        from sevconsole.engine import journal

        deadline = time.monotonic() + timeout
        while journal.runner_alive(folder):
            if time.monotonic() > deadline:
                raise AssertionError(f"the runner of {folder.name} still runs after {timeout} s: "
                                     f"{journal.read(folder / 'journal.jsonl').step}")
            time.sleep(0.05)
        return journal.read(folder / "journal.jsonl")

    def close(self) -> None:
        """Kills any runner still alive under this console (a failed test leaves none behind)."""
        import shutil

        from sevconsole.engine import journal

        for folder in self.folders():
            if journal.runner_alive(folder):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    os.kill(self.runner_pid(folder), signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)


class Client:
    """A `migrate` or `migrations watch` process: its JSON lines on stdout, its stderr in a file."""

    def __init__(self, proc: Any, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self.lines: list[dict[str, Any]] = []
        self._pending = b""
        self.eof = False

    def _read(self, wait: float) -> None:
        import select

        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, wait))
        if not ready:
            return
        chunk = os.read(fd, 1 << 16)  # raw reads: a buffered readline would hide lines from select
        if not chunk:
            self.eof = True
            return
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        for raw in complete:
            if raw.strip():
                self.lines.append(json.loads(raw))

    def until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
              also: Callable[[], bool] = lambda: False, poll: float = 0.05) -> dict[str, Any] | None:
        """Reads lines until one is `wanted` (returned) or `also()` holds (the last line, asked
        at least every `poll` s); None at the end of the output."""
        deadline = time.monotonic() + timeout
        seen = len(self.lines)
        while True:
            while seen < len(self.lines):
                seen += 1
                if wanted(self.lines[seen - 1]):
                    return self.lines[seen - 1]
            if also():
                return self.lines[-1] if self.lines else {}
            if self.eof:
                return None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing wanted on stdout in {timeout} s; last: "
                                     f"{self.lines[-1:]}; stderr: {self.stderr()[-500:]}")
            self._read(min(poll, deadline - time.monotonic()))

    def rest(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Every line up to the end of the output, then the exit."""
        self.until(lambda _: False, timeout)
        self.proc.wait(timeout)
        return self.lines

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def phase_at(line: dict[str, Any], point: str, fraction: float = 0.0) -> bool:
    """A Progress line at or past `point` (a phase); in pre-copy, once `fraction` of the guest
    has been sent. A line past every point (the end, the outcome) also counts: the migration
    may have moved faster than the lines were read."""
    phase = line.get("phase")
    if "outcome" in line or phase in ("done", "failed", "cancelled"):
        return True
    if phase not in PHASES:
        return False
    if PHASES.index(phase) > PHASES.index(point):
        return True
    if phase != point:
        return False
    total = int(line.get("bytes_total") or 0)
    return point != "pre-copy" or (total > 0 and line.get("bytes_transferred", 0) >= fraction * total)


def journal_step(folder: Path) -> str | None:
    from sevconsole.engine import journal

    step = journal.read(folder / "journal.jsonl").step
    return None if step is None else step.value


JOURNAL_POINTS = {"target-launched": ("target-launched", "streaming"),  # a point -> steps that show it
                  "send-finished": ("send-finished", "target-confirmed")}


def reach(client: Client, folder: Path, point: str, fraction: float = 0.0, timeout: float = 60.0) -> str:
    """Waits until the migration reaches `point`: a phase as its client prints it, or a step as
    its journal records it ("target-launched", "send-finished": the journal is watched every
    2 ms, so a kill that follows lands before the runner's next decision). Returns where it was:
    "phase/journal step"."""
    if point in JOURNAL_POINTS:
        steps = JOURNAL_POINTS[point]
        line = client.until(lambda x: "outcome" in x, timeout, poll=0.002,
                            also=lambda: journal_step(folder) in (*steps, "done", "rolled-back", "refused"))
    else:
        line = client.until(lambda x: phase_at(x, point, fraction), timeout)
    return f"{(line or {}).get('phase', 'end')}/{journal_step(folder)}"


def outcome_of(folder: Path) -> dict[str, Any] | None:
    """The runner's outcome as its journal recorded it (None when the runner did not end it)."""
    from sevconsole.engine import journal

    out = journal.read(folder / "journal.jsonl").data().get("outcome")
    return out if isinstance(out, dict) else None
