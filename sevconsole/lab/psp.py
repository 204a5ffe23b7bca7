"""The host's firmware model behind one lock, with failures turned into typed errors.

The firmware model is one PSP: the lab's threads (QMP, migration, workload, SSH) all reach it
through `Psp.call`, which serialises them and raises `FirmwareError` naming the command, its
status and the firmware's own sentence.
"""

from __future__ import annotations

import threading
from typing import Any

from sevconsole.sev.status import STATUS_MEANING, Status


class FirmwareError(Exception):
    def __init__(self, host: str, command: str, status: Status, detail: str = "") -> None:
        self.host = host
        self.command = command
        self.status = status
        self.detail = detail
        why = detail or STATUS_MEANING.get(status, "")
        super().__init__(f"{host}: {command} failed with {status.name}: {why}")


class Psp:
    def __init__(self, host: str, firmware: Any) -> None:
        self.host = host
        self.fw = firmware
        self.lock = threading.RLock()
        self._sessions: set[bytes] = set()

    def claim_session(self, nonce: bytes) -> bool:
        """The hypervisor's replay guard: a session (by its nonce) is received once per host.
        The firmware would unwrap a replayed session again; accepting it would clone the guest."""
        with self.lock:
            if nonce in self._sessions:
                return False
            self._sessions.add(nonce)
            return True

    def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Runs `firmware.<command>(...)`; raises FirmwareError unless the status is SUCCESS."""
        with self.lock:
            result = getattr(self.fw, command)(*args, **kwargs)
        status = getattr(result, "status", Status.SUCCESS)
        if status != Status.SUCCESS:
            raise FirmwareError(self.host, command.upper(), Status(status), getattr(result, "detail", ""))
        return result

    def raw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Runs a command and returns its result whatever the status (for probes)."""
        with self.lock:
            return getattr(self.fw, command)(*args, **kwargs)
