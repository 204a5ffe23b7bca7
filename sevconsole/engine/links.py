"""What the engine needs from a host, as a small Protocol, so tests can use local processes and
the console real hosts over SSH through the same run loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qemu.qmp import QMPClient


@dataclass(frozen=True)
class IncomingVm:
    """The target QEMU started with `-incoming defer`: its pid and QMP socket on that host."""

    pid: int
    qmp: str


@runtime_checkable
class HostLink(Protocol):
    name: str
    address: str  # where the migration stream reaches this host (QEMU listens here)

    async def open_qmp(self, path: str) -> QMPClient:
        """A connected, negotiated QMPClient for the UNIX socket `path` on this host.
        Raises LinkError when the socket cannot be reached."""
        ...

    async def launch_incoming(self, argv: Sequence[str]) -> IncomingVm:
        """Start a QEMU with the source's configuration, `-incoming defer` and a new QMP socket."""
        ...

    async def stop(self, pid: int) -> bool:
        """Stop the QEMU `pid`; True when it was running and is now gone."""
        ...

    async def close(self) -> None:
        ...


def incoming_argv(argv: Sequence[str], qmp_path: str) -> list[str]:
    """The source command line made into a target one: its own QMP socket, `-incoming defer`,
    and nothing that would collide with the source on one host (pidfile, daemonize)."""
    drop_with_value = {"-qmp", "-incoming", "-pidfile", "-monitor", "-chardev", "-mon", "-serial"}
    drop_alone = {"-daemonize", "-S"}
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if i == 0:
            out.append(arg)
            continue
        flag = arg[1:] if arg.startswith("--") else arg  # QEMU takes -opt and --opt
        if flag in drop_with_value:
            skip = True
            continue
        if flag in drop_alone:
            continue
        out.append(arg)
    return out + ["-qmp", f"unix:{qmp_path},server=on,wait=off", "-incoming", "defer"]
