"""One lab host: a firmware model, its VMs with their QMP sockets, and an SSH server.

Runs as its own OS process (`python -m sevconsole.lab.host CONFIG.json`), so a migration
between two hosts uses two cores and a console stays responsive. It prints one JSON line
`{"ready": true, ...}` on stdout once every socket listens, and stops cleanly on SIGTERM,
SIGINT or when its stdin closes (the parent lab went away), removing its sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevconsole.priority import yield_cpu
from sevconsole.sev.certs import AmdCert
from sevconsole.sev.firmware import PspTiming, SevFirmware

from .argv import CBITPOS, REDUCED_PHYS_BITS, ArgvError, build_argv, parse_argv
from .layout import HostSpec, VmSpec
from .monitor import Monitor
from .psp import Psp
from .qmp import QmpServer
from .vm import LabVm

if TYPE_CHECKING:  # imported at run time by serve(), where it is used
    from .ssh import LabSshServer


def file_stem(name: str) -> str:
    """A VM name as a file name: ASCII letters, digits, '-', '_' and '.', no leading dot, short."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:48] or "vm"


class LabHostError(Exception):
    """A lab host request that cannot be served; the sentence says why."""


class LabHost:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.spec = HostSpec.from_json(config["spec"])
        self.name = self.spec.name
        self.run_dir = Path(config["run_dir"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cbitpos = CBITPOS
        self.reduced_phys_bits = REDUCED_PHYS_BITS
        self.cpu0_id = hashlib.sha512(b"sevconsole lab cpu0 " + self.name.encode()).digest()
        self.psp = Psp(self.name, self._make_firmware())
        self.psp.call(self.psp.fw.init)
        self.vms: dict[int, LabVm] = {}  # by synthetic pid
        self.servers: dict[int, QmpServer] = {}
        self._next_pid = 1000
        self._next_asid = 1
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ssh: LabSshServer | None = None

    def _make_firmware(self) -> SevFirmware:
        c = self.config
        ark = AmdCert.from_bytes(Path(c["ark"]).read_bytes(), "lab ARK")
        ask = AmdCert.from_bytes(Path(c["ask"]).read_bytes(), "lab ASK")
        ask_key = serialization.load_pem_private_key(Path(c["ask_key"]).read_bytes(), None)
        oca_key = serialization.load_pem_private_key(Path(c["oca_key"]).read_bytes(), None)
        if not isinstance(ask_key, rsa.RSAPrivateKey):
            raise LabHostError(f"{self.name}: the lab ASK key {c['ask_key']} is not an RSA private key")
        if not isinstance(oca_key, ec.EllipticCurvePrivateKey):
            raise LabHostError(f"{self.name}: the lab OCA key {c['oca_key']} is not an elliptic-curve private key")
        timing = PspTiming() if self.spec.realistic_psp else None
        return SevFirmware(ask_key=ask_key, ask=ask, ark=ark, api=self.spec.api, build=self.spec.build,
                           es=self.spec.es, oca_key=oca_key, timing=timing)

    # --- VMs ------------------------------------------------------------------------------

    def _alloc(self) -> tuple[int, int]:
        with self._lock:
            pid, asid = self._next_pid, self._next_asid
            self._next_pid += 1
            self._next_asid += 1
        return pid, asid

    def _qmp_path(self, name: str, pid: int) -> str:
        # The name came from a source's -name: only its plain characters reach the file name, and
        # the pid keeps it unique, so a socket never lands outside run_dir.
        return str(self.run_dir / f"{file_stem(name)}-{pid}.qmp")

    async def add_vm(self, spec: VmSpec, *, incoming: bool = False, autostart: bool = True) -> LabVm:
        pid, asid = self._alloc()
        path = self._qmp_path(spec.name, pid)
        argv = build_argv(spec.name, spec.mem_mib, spec.sev, spec.policy, path,
                          incoming=incoming, autostart=autostart)
        vm = LabVm(name=spec.name, pid=pid, spec=spec, psp=self.psp, qmp_path=path, argv=argv,
                   incoming=incoming, autostart=autostart)
        vm.digest_on_send = bool(self.spec.extra.get("digest-on-send", False))
        if not incoming:
            # Filling and encrypting RAM takes a while for big guests: off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, vm.launch, asid)
        server = QmpServer(path, Monitor(self, vm).commands())
        vm.on_status = lambda event, data, s=server: s.emit_threadsafe(event, data)
        await server.start()
        self.vms[pid] = vm
        self.servers[pid] = server
        return vm

    def monitor_commands(self, vm: LabVm) -> list[str]:
        server = self.servers.get(vm.pid)
        return sorted(server.commands) if server else []

    def emitter(self, vm: LabVm) -> Callable[[str, dict[str, Any] | None], None]:
        def emit(event: str, data: dict[str, Any] | None) -> None:
            if event in ("MIGRATION", "MIGRATION_PASS") and not vm.capabilities.get("events"):
                return  # QEMU sends these only with the `events` capability on
            self.emit(vm, event, data)
        return emit

    def emit(self, vm: LabVm, event: str, data: dict[str, Any] | None = None) -> None:
        """An event on the VM's monitor, from any thread, whatever its capabilities."""
        server = self.servers.get(vm.pid)
        if server is not None:
            server.emit(event, data)

    async def remove_vm(self, vm: LabVm) -> None:
        server = self.servers.pop(vm.pid, None)
        self.vms.pop(vm.pid, None)
        mig = vm.migration
        if mig is not None and hasattr(mig, "close"):
            mig.close()
        if mig is not None and hasattr(mig, "request_cancel"):
            mig.request_cancel()
        await asyncio.get_running_loop().run_in_executor(None, vm.close)
        if server is not None:
            await server.close()

    def discard_vm(self, vm: LabVm) -> None:
        """From any thread: drop a VM (a failed incoming migration), like QEMU exiting."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.remove_vm(vm), self.loop)

    def quit_vm(self, vm: LabVm) -> None:
        server = self.servers.get(vm.pid)
        if server is not None:
            server.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        assert self.loop is not None
        self.loop.create_task(self.remove_vm(vm))

    # --- the remote helper's commands ------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        st = self.psp.raw(self.psp.fw.platform_status)
        pdh = self.psp.raw(self.psp.fw.pdh_cert_export)

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        return {
            "helper": 1, "hostname": self.name, "kernel": "6.1.0-lab (simulated SEV host)",
            "cpu": "AMD EPYC 7763 64-Core Processor (sevconsole lab model)",
            "kvm_amd": {"sev": "Y", "sev_es": "Y" if self.spec.es else "N"},
            "dev_sev": True,
            "platform_status": {"api_major": st.api_major, "api_minor": st.api_minor, "state": int(st.state),
                                "flags": st.flags, "build": st.build, "guest_count": st.guest_count},
            "pdh": b64(pdh.pdh) if pdh.status == 0 else None,
            "cert_chain": b64(pdh.cert_chain) if pdh.status == 0 else None,
            "amd_chain": b64(self.psp.fw.amd_chain),
            "errors": [] if pdh.status == 0 else [f"PDH_CERT_EXPORT failed: {pdh.detail}"],
            "vms": [{"pid": vm.pid, "name": vm.name, "qmp": vm.qmp_path, "argv": list(vm.argv)}
                    for vm in list(self.vms.values())],
            "memory": self._memory(),
            "lab": True,
        }

    def _memory(self) -> dict[str, int]:
        """A host of `host-mib` (64 GiB unless the layout says) less what its guests hold."""
        total = int(self.spec.extra.get("host-mib", 65536))
        used = sum(vm.spec.mem_mib for vm in list(self.vms.values()))
        return {"total_mib": total, "available_mib": max(total - used, 0)}

    def launch_incoming(self, request: Any) -> dict[str, Any]:
        """From an SSH thread: create an incoming VM like the source's argv describes."""
        if not isinstance(request, dict) or not isinstance(request.get("argv"), list):
            raise LabHostError('launch-incoming expects {"argv": [...]} on stdin')
        try:
            cfg = parse_argv(request["argv"])
        except ArgvError as exc:
            raise LabHostError(f"{self.name}: cannot start the incoming VM: {exc}") from None
        limit = int(self.spec.extra.get("max-vm-mib", 16384))
        if cfg.mem_mib > limit:
            raise LabHostError(f"{self.name}: the guest needs {cfg.mem_mib} MiB, this lab host offers at most {limit} MiB")
        spec = VmSpec(name=cfg.name, sev=cfg.sev, policy=cfg.policy, mem_mib=cfg.mem_mib, shared=())
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(self.add_vm(spec, incoming=True, autostart=cfg.autostart), self.loop)
        vm = fut.result(timeout=60)
        return {"pid": vm.pid, "qmp": vm.qmp_path}

    def stop_pid(self, pid: int) -> bool:
        vm = self.vms.get(pid)
        if vm is None:
            return False
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self.remove_vm(vm), self.loop).result(timeout=60)
        return True

    def qmp_path_known(self, path: str) -> bool:
        return any(vm.qmp_path == path for vm in list(self.vms.values()))

    # --- lifetime -------------------------------------------------------------------------

    async def serve(self, ready_out: TextIO) -> None:
        from .ssh import LabSshServer

        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        threading.Thread(target=self._watch_stdin, args=(stop,), name="stdin-watch", daemon=True).start()
        for spec in self.spec.vms:
            await self.add_vm(spec)
        self.ssh = LabSshServer(self, host_key=self.config["host_key"], client_pub=self.config["client_pub"],
                                user=self.config.get("user", "lab"))
        self.ssh.start()
        ready = {"ready": True, "name": self.name, "pid": os.getpid(), "ssh_port": self.ssh.port,
                 "vms": {vm.name: vm.qmp_path for vm in self.vms.values()}}
        ready_out.write(json.dumps(ready) + "\n")
        ready_out.flush()
        await stop.wait()
        await self.shutdown()

    def _watch_stdin(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # the raw fd: no buffered-reader lock held at exit
                pass
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(stop.set)

    async def shutdown(self) -> None:
        if self.ssh is not None:
            self.ssh.stop()
        for vm in list(self.vms.values()):
            await self.remove_vm(vm)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()


LAB_NICE = 5  # a lab host's nice, and its session's


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sevconsole.lab.host CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(args[0]).read_text())
    # A lab host stands for another machine: on this one it yields the CPU to the console, as
    # a remote hypervisor would never compete with the operator's terminal (its session's group
    # too: it leads a session of its own, see sevconsole/priority.py).
    yield_cpu(LAB_NICE)
    # stdout carries only the ready line; everything else goes to stderr (the host's log).
    ready_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    host = LabHost(config)
    asyncio.run(host.serve(ready_out))
    return 0



if __name__ == "__main__":
    sys.exit(main())
