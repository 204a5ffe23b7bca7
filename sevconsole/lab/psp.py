"""The host's PSP: its firmware model one command at a time, on real time, failures as errors.

The lab's threads (QMP, migration, workload, SSH) all reach the firmware through `Psp.call`
(`Psp.raw` for probes that want the status whatever it is), which serialises them and raises
`FirmwareError` naming the command, its status and the firmware's own sentence.

The firmware model is pure: with a cost model (`SevFirmware.timing`) it only adds up each
command's modelled time (`busy_s`). Here real time follows it: the PSP stays held until the
command's modelled end on a `Timeline` of back-to-back commands, so a lab host runs at a real
PSP's rate (about 400 pages/s). The firmware's introspection (`log`, `counts`, ...) does not
go through this lock, so it answers while a long batch holds the PSP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from sevconsole.sev.firmware import SevFirmware
from sevconsole.sev.status import STATUS_MEANING, Status

P = ParamSpec("P")
R = TypeVar("R")

PSP_SLACK_S = 0.01  # how far behind its timeline a busy PSP may catch up


class FirmwareError(Exception):
    def __init__(self, host: str, command: str, status: Status, detail: str = "") -> None:
        self.host = host
        self.command = command
        self.status = status
        self.detail = detail
        why = detail or STATUS_MEANING.get(status, "")
        super().__init__(f"{host}: {command} failed with {status.name}: {why}")


@dataclass
class Timeline:
    """Real time for modelled PSP time: commands end back to back, as on one busy PSP.

    A command queued right behind another starts where that one ended on the timeline, not
    when its thread woke up, so sleep overshoot (often ~1 ms on a loaded host) does not add
    up; after an idle gap longer than PSP_SLACK_S the timeline restarts at now.
    """

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    free_at: float = 0.0  # when the modelled PSP finishes its last command

    def hold(self, began: float, cost: float) -> None:
        """A command that began at `began` and costs `cost`: wait for its modelled end."""
        start = max(self.free_at, began - PSP_SLACK_S)
        self.free_at = start + cost
        delay = self.free_at - self.clock()
        if delay > 0:
            self.sleep(delay)


class Psp:
    def __init__(
        self, host: str, firmware: SevFirmware, *, timeline: Timeline | None = None
    ) -> None:
        self.host = host
        self.fw = firmware
        self.lock = threading.RLock()  # one command in flight, held for its modelled time
        if timeline is None and firmware.timing is not None:
            timeline = Timeline()
        self.timeline = timeline
        self._sessions: set[bytes] = set()

    @property
    def paced(self) -> bool:
        """Whether commands take a real PSP's time (the "realistic PSP")."""
        return self.timeline is not None

    def claim_session(self, nonce: bytes) -> bool:
        """The hypervisor's replay guard: a session (by its nonce) is received once per host.
        The firmware would unwrap a replayed session again; accepting it would clone the guest."""
        with self.lock:
            if nonce in self._sessions:
                return False
            self._sessions.add(nonce)
            return True

    # A command is given as the firmware's bound method (`psp.call(psp.fw.send_start, ...)`),
    # so its arguments and result are typed.
    def call(self, command: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs the command; raises FirmwareError unless its status is SUCCESS."""
        result = self.raw(command, *args, **kwargs)
        status = getattr(result, "status", Status.SUCCESS)
        if status != Status.SUCCESS:
            detail = getattr(result, "detail", "")
            raise FirmwareError(self.host, command.__name__.upper(), Status(status), detail)
        return result

    def raw(self, command: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs the command and returns its result whatever the status (for probes)."""
        with self.lock:
            if self.timeline is None:
                return command(*args, **kwargs)
            began, before = self.timeline.clock(), self.fw.busy_s
            result = command(*args, **kwargs)
            self.timeline.hold(began, self.fw.busy_s - before)
            return result
