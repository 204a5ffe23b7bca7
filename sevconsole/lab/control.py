"""Start and stop a lab: one OS process per host, readiness by each host's ready line.

    with Lab.start(state_dir, hosts=3) as lab:
        lab.host("lab-1").port, lab.qmp_path("lab-1", "web"), lab.inventory
    # or lab = Lab.start(...); ...; lab.stop()

Each host process has the lab's pipe on its stdin: if this process dies, the hosts see EOF
and stop by themselves, so no process or socket is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import state
from .layout import HostSpec, default_layout

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                 "MALLOC_TOP_PAD_": str(64 << 20)}


class LabError(Exception):
    """The lab could not start or a host failed; the sentence names the host and its log."""


StateDirError = state.StateDirError  # a state folder refused before anything is written (exit 2)


@dataclass
class RunningHost:
    name: str
    spec: HostSpec
    process: subprocess.Popen
    log: Path
    port: int = 0
    pid: int = 0
    qmp: dict[str, str] = field(default_factory=dict)  # VM name -> socket path
    sockets: Path = Path()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def _refuse_if_running(state_dir: Path) -> None:
    """Two labs in one folder would overwrite each other's inventory and sockets."""
    try:
        described = json.loads((state_dir / "lab.json").read_text())
        pids = [int(h["pid"]) for h in described["hosts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            alive.append(pid)
    if alive:
        raise LabError(f"a lab is already running in {state_dir} (host processes {', '.join(map(str, alive))}); "
                       "stop it (Ctrl-C in its terminal) or give another --state-dir")


class Lab:
    def __init__(self, paths: state.LabPaths, hosts: list[RunningHost], run_dir: Path, temp_run: bool) -> None:
        self.paths = paths
        self.hosts = hosts
        self.run_dir = run_dir
        self._temp_run = temp_run
        self._stopped = False

    # --- start ----------------------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: str | os.PathLike, hosts: int = 3, *, vms_per_host: int = 0, mem_mib: int = 64,
              dirty_rate: float = 0.0, realistic_psp: bool = False,
              layout: tuple[HostSpec, ...] | None = None, timeout: float = READY_TIMEOUT_S) -> Lab:
        specs = layout or default_layout(hosts, vms_per_host=vms_per_host, mem_mib=mem_mib,
                                         dirty_rate=dirty_rate, realistic_psp=realistic_psp)
        state.check_state_dir(Path(state_dir).resolve())  # before reading anything in it
        _refuse_if_running(Path(state_dir))
        paths = state.prepare(Path(state_dir), [s.name for s in specs], {s.oca_domain for s in specs})
        run_dir, temp_run = state.run_dir(paths)
        running: list[RunningHost] = []
        lab = cls(paths, running, run_dir, temp_run)
        try:
            for spec in specs:
                running.append(lab._spawn(spec))
            lab._wait_ready(timeout)
            state.write_known_hosts(paths, [(h.name, h.port) for h in running])
            state.write_inventory(paths, [(h.name, h.port, str(h.sockets)) for h in running])
            (paths.root / "lab.json").write_text(json.dumps(lab.describe(), indent=2))
        except BaseException:
            lab.stop()
            raise
        return lab

    def _spawn(self, spec: HostSpec) -> RunningHost:
        host_dir = self.paths.host_dir(spec.name)
        host_dir.mkdir(parents=True, exist_ok=True)
        sockets = self.run_dir / spec.name
        log = host_dir / "host.log"
        config = {
            "spec": spec.to_json(), "run_dir": str(sockets), "host_key": str(self.paths.host_key(spec.name)),
            "client_pub": str(self.paths.client_pub), "ark": str(self.paths.ark), "ask": str(self.paths.ask),
            "ask_key": str(self.paths.ask_key), "oca_key": str(self.paths.oca_key(spec.oca_domain)),
            "user": "lab", "log": str(log),
        }
        config_path = host_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        env = dict(os.environ)
        # The package must be importable by the child however this process found it.
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
        # The hot path makes many MiB-sized buffers; glibc would mmap and unmap each one (a page
        # fault per 4 KiB, measured at ~0.5 GB/s for AES over 1 MiB instead of ~5 GB/s). Keeping
        # them on the heap is what makes the lab's migration run at crypto speed.
        for key, value in MALLOC_TUNING.items():
            env.setdefault(key, value)
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sevconsole.lab.host", str(config_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, env=env,
                start_new_session=True,  # Ctrl-C reaches the lab, which stops its hosts in order
            )
        return RunningHost(name=spec.name, spec=spec, process=proc, log=log, sockets=sockets)

    def _wait_ready(self, timeout: float) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[str, bytes] = {}
        for h in self.hosts:
            out = h.process.stdout
            assert out is not None  # started with stdout=PIPE
            sel.register(out, selectors.EVENT_READ, h)
            buffers[h.name] = b""
        pending = {h.name for h in self.hosts}
        deadline = time.monotonic() + timeout
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(f"lab hosts {', '.join(sorted(pending))} were not ready within {timeout:.0f} s; "
                                   f"see {self._log_hint(sorted(pending)[0])}")
                for key, _ in sel.select(timeout=left):
                    h = key.data  # the RunningHost registered above
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        if h.name in pending:
                            raise LabError(f"lab host {h.name} exited before it was ready: {self._log_tail(h)}")
                        continue
                    buffers[h.name] += chunk
                    if b"\n" in buffers[h.name] and h.name in pending:
                        line = buffers[h.name].split(b"\n", 1)[0]
                        try:
                            ready = json.loads(line)
                        except ValueError:
                            raise LabError(f"lab host {h.name} said {line[:200]!r} instead of its ready line") from None
                        h.port, h.pid, h.qmp = int(ready["ssh_port"]), int(ready["pid"]), dict(ready["vms"])
                        pending.discard(h.name)
        finally:
            sel.close()

    def _log_tail(self, h: RunningHost) -> str:
        try:
            lines = h.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " / ".join(lines[-3:]) or f"no output (log {h.log})"

    def _log_hint(self, name: str) -> str:
        return str(self.paths.host_dir(name) / "host.log")

    # --- use ------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def inventory(self) -> Path:
        return self.paths.inventory

    @property
    def known_hosts(self) -> Path:
        return self.paths.known_hosts

    @property
    def client_key(self) -> Path:
        return self.paths.client_key

    @property
    def lab_ark(self) -> Path:
        return self.paths.ark

    def host(self, name: str) -> RunningHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no lab host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")

    def qmp_path(self, host: str, vm: str) -> str:
        h = self.host(host)
        if vm not in h.qmp:
            raise KeyError(f"lab host {host} has no VM {vm!r} (VMs: {', '.join(h.qmp) or 'none'})")
        return h.qmp[vm]

    def describe(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.paths.root), "inventory": str(self.paths.inventory),
            "known_hosts": str(self.paths.known_hosts), "client_key": str(self.paths.client_key),
            "lab_root": str(self.paths.ark), "run_dir": str(self.run_dir),
            "hosts": [{"name": h.name, "address": "127.0.0.1", "port": h.port, "pid": h.pid,
                       "api": list(h.spec.api), "oca_domain": h.spec.oca_domain, "vms": h.qmp}
                      for h in self.hosts],
        }

    # --- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for h in self.hosts:
            if h.alive:
                with contextlib.suppress(ProcessLookupError):
                    h.process.send_signal(signal.SIGTERM)
        for h in self.hosts:
            try:
                h.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                h.process.kill()
                h.process.wait()
            for f in (h.process.stdin, h.process.stdout):
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.close()
            # A host killed hard cannot clean up: its sockets go here.
            if h.sockets.is_dir():
                for sock in h.sockets.glob("*.qmp"):
                    state.remove_quietly(sock)
                with contextlib.suppress(OSError):
                    h.sockets.rmdir()
        if self._temp_run:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        state.remove_quietly(self.paths.root / "lab.json")
