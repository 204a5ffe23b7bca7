"""What the engine needs from a host, as a small Protocol, so tests can use local processes and
the console real hosts over SSH through the same run loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qemu.qmp import QMPClient

from sevconsole.engine.argv_policy import ArgvRefused, require_target_argv
from sevconsole.engine.errors import LinkError


class QemuGone(LinkError):
    """The QEMU behind a QMP socket is not running any more (a link may raise it from open_qmp),
    so an incoming VM that left by itself is told apart from one that cannot be reached."""


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
        """Start a QEMU with the source's configuration, `-incoming defer` and a new QMP socket.
        `argv` is the source's command line: implementations build the target's through the
        allow-list (engine/argv_policy.py) and raise LinkError, starting nothing, when it refuses."""
        ...

    async def stop(self, pid: int) -> bool:
        """Stop the QEMU `pid`; True when it was running and is now gone."""
        ...

    async def close(self) -> None:
        ...


def incoming_argv(argv: Sequence[str], qmp_path: str, target: str = "the target") -> list[str]:
    """The target's command line for a source VM: the allow-list's (engine/argv_policy.py), then
    its own QMP socket and `-incoming defer`. Raises LinkError naming the refused option."""
    try:
        allowed = require_target_argv(argv, target)
    except ArgvRefused as exc:
        raise LinkError(target, str(exc)) from None
    return [*allowed.argv, "-qmp", f"unix:{qmp_path},server=on,wait=off", "-incoming", "defer"]
