"""A lab VM: guest RAM (ciphertext at rest for private pages), its page map, and its workload.

`memory` is what a hypervisor holds: private pages encrypted with the guest's VEK by the
firmware model, shared pages in clear. The guest itself reads and writes through the
firmware's `guest_read`/`guest_write` (the CPU's view of its own memory). A dirty bitmap,
like KVM's, tells the migration which pages changed since they were last sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sevconsole.sev.firmware import GuestAccessError
from sevconsole.sev.pagestate import PageState

from .layout import PAGE_SIZE, VmSpec, default_shared_ranges
from .psp import Psp

if TYPE_CHECKING:  # migration.py imports this module
    from .migration import IncomingMigration, OutgoingMigration

RUN_STATES = ("running",)
# QEMU's blocker for an SEV guest, added at LAUNCH_FINISH. With the SEV migration series it stays
# until the guest itself writes KVM_MIGRATION_READY to the KVM migration control MSR (its
# firmware and kernel enable migration; dmesg says "live migration enabled in EFI").
SEV_BLOCKER = "SEV: Migration is not implemented"


@dataclass(frozen=True)
class Run:
    first: int  # page index
    count: int
    shared: bool


def runs_of(pages: np.ndarray, shared: np.ndarray, max_pages: int) -> Iterator[Run]:
    """Splits sorted page indices into contiguous runs of one kind, each at most max_pages."""
    if len(pages) == 0:
        return
    kinds = shared[pages]
    breaks = np.flatnonzero((np.diff(pages) != 1) | (kinds[1:] != kinds[:-1])) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first, kind = int(pages[s]), bool(kinds[s])
        n = e - s
        while n > 0:
            k = min(n, max_pages)
            yield Run(first, k, kind)
            first += k
            n -= k


class LabVm:
    """One guest on a lab host. Thread-safe: `lock` guards the page map and status."""

    def __init__(self, *, name: str, pid: int, spec: VmSpec, psp: Psp, qmp_path: str,
                 argv: list[str], incoming: bool = False, autostart: bool = True) -> None:
        self.name = name
        self.pid = pid
        self.spec = spec
        self.psp = psp
        self.qmp_path = qmp_path
        self.argv = argv
        self.sev = spec.sev
        self.policy = spec.policy
        self.autostart = autostart
        self.pages = spec.mem_mib * 1024 * 1024 // PAGE_SIZE
        self.mem_bytes = self.pages * PAGE_SIZE
        self.memory = np.zeros(self.mem_bytes, dtype=np.uint8)
        if incoming:
            # KVM pins an SEV guest's memory; touch every page now so the incoming migration
            # does not pay a page fault per page it writes.
            self.memory[::PAGE_SIZE] = 0
        self.shared = np.zeros(self.pages, dtype=bool)
        if self.sev:
            ranges = default_shared_ranges(self.pages) if spec.shared is None else spec.shared
            for first, count in ranges:
                self.shared[first:first + count] = True
        else:
            self.shared[:] = True  # no SEV: every page is plain memory
        self.states = np.where(self.shared, PageState.SHARED_UNSENT, PageState.PRIVATE_UNSENT).astype(np.uint8)
        self.dirty = np.zeros(self.pages, dtype=bool)
        self.lock = threading.RLock()
        self.handle: int | None = None
        self.status = "inmigrate" if incoming else "prelaunch"
        self.incoming = incoming
        self.dirtied_total = 0  # pages written by the workload, for the dirty rate
        self.final_digest: str | None = None  # digest when it left (SENT: memory frozen)
        self.digest_on_send = False  # x-lab-set digest-on-send: record the digest while stopped
        self.migration: OutgoingMigration | IncomingMigration | None = None  # set by the monitor
        self.params: dict[str, Any] = {}
        self.capabilities: dict[str, bool] = {}  # migrate-set-capabilities (only `events` acts)
        self.workload = Workload(self, spec.dirty_rate)
        self.on_status: Callable[[str, dict[str, Any] | None], None] | None = None  # STOP/RESUME events
        self.measurement: bytes | None = None  # LAUNCH_MEASURE's answer (query-sev-launch-measure)
        self.launch_digest: bytes | None = None  # SHA-256 of what LAUNCH_UPDATE_DATA measured
        # query-migrate's blocked-reasons; `migrate` is refused with the first
        self.blockers: list[str] = []

    # --- launch --------------------------------------------------------------------------

    def launch(self, asid: int) -> None:
        """Fills RAM with the guest's image and runs the LAUNCH flow; the guest then runs."""
        rng = np.random.default_rng(self.spec.seed)
        chunk = 64 << 20
        for off in range(0, self.mem_bytes, chunk):
            n = min(chunk, self.mem_bytes - off)
            self.memory[off:off + n] = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        if self.sev:
            fw = self.psp.fw
            handle = self.handle = self.psp.call(fw.launch_start, self.policy, self.memory).handle
            digest = hashlib.sha256()
            for run in runs_of(np.arange(self.pages), self.shared, self.pages):
                if not run.shared:
                    gpa, n = run.first * PAGE_SIZE, run.count * PAGE_SIZE
                    digest.update(self.memory[gpa:gpa + n].data)  # the plaintext, before it is encrypted
                    self.psp.call(fw.launch_update_data, handle, gpa, n)
            self.launch_digest = digest.digest()
            self.measurement = self.psp.call(fw.launch_measure, handle).measurement
            self.psp.call(fw.launch_finish, handle)
            self.psp.call(fw.activate, handle, asid)
            if not self.spec.migration_ready:
                self.blockers.append(SEV_BLOCKER)
        self.status = "running"
        self.workload.start()

    # --- guest view ---------------------------------------------------------------------

    def _guest_handle(self) -> int:
        """The SEV guest's firmware handle, for the guest CPU's own reads and writes."""
        if self.handle is None:
            raise GuestAccessError(f"{self.name} has no SEV guest on {self.psp.host}'s firmware: it is "
                                   "not launched, not received yet, or already closed")
        return self.handle

    def write_page(self, page: int, data: bytes) -> None:
        """The guest writes a page (private through the firmware, shared in clear)."""
        gpa = page * PAGE_SIZE
        with self.lock:
            if self.shared[page] or not self.sev:
                self.memory[gpa:gpa + PAGE_SIZE] = np.frombuffer(data, dtype=np.uint8)
            else:
                self.psp.call(self.psp.fw.guest_write, self._guest_handle(), gpa, data)
            self.dirty[page] = True
            s = self.states[page]
            if s == PageState.PRIVATE_SENT:
                self.states[page] = PageState.PRIVATE_DIRTY
            elif s == PageState.SHARED_SENT:
                self.states[page] = PageState.SHARED_DIRTY
            self.dirtied_total += 1

    def digest(self) -> str:
        """SHA-256 over the guest's plaintext, as the guest would compute it."""
        if self.final_digest is not None:
            return self.final_digest
        h = hashlib.sha256()
        with self.lock:
            for run in runs_of(np.arange(self.pages), self.shared, 1024):
                gpa, n = run.first * PAGE_SIZE, run.count * PAGE_SIZE
                if run.shared or not self.sev:
                    h.update(self.memory[gpa:gpa + n].data)
                else:
                    h.update(self.psp.call(self.psp.fw.guest_read, self._guest_handle(), gpa, n))
        return h.hexdigest()

    # --- run state ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.status in RUN_STATES

    def set_status(self, status: str) -> None:
        with self.lock:
            was = self.running
            self.status = status
            now = self.running
        if was and not now:
            self.workload.pause()
            self._event("STOP")
        elif now and not was:
            self.workload.resume()
            self._event("RESUME")

    def _event(self, name: str) -> None:
        if self.on_status is not None:
            self.on_status(name, None)

    def sync_dirty(self) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the pages dirtied since the last sync, and clear the log."""
        with self.lock:
            pages = np.flatnonzero(self.dirty)
            self.dirty[:] = False
        return pages

    def close(self) -> None:
        self.workload.stop()
        if self.handle is not None:
            for command in (self.psp.fw.deactivate, self.psp.fw.decommission):
                with contextlib.suppress(Exception):  # a guest already gone is fine at teardown
                    self.psp.raw(command, self.handle)
            self.handle = None


class Workload:
    """The guest's program: writes random plaintext to random pages at `rate` pages/s.

    Paced by the clock: every tick it writes as many pages as the elapsed time allows, so the
    rate holds whatever the tick jitter. It writes only while the VM runs.
    """

    TICK_S = 0.01

    def __init__(self, vm: LabVm, rate: float) -> None:
        self.vm = vm
        self.rate = float(rate)
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0

    def start(self) -> None:
        self._running.set()
        if self.rate > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"workload-{self.vm.name}", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self.start()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()  # wake it so it sees the stop
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        rng = np.random.default_rng()
        pacer = Pacer(self.rate, time.monotonic())
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                return
            self._stop.wait(self.TICK_S)
            pacer.rate = self.rate
            if not self.vm.running:
                pacer.idle(time.monotonic())
                continue
            # a tick never writes more than the whole guest, whatever rate it was given
            n = min(pacer.due(time.monotonic()), self.vm.pages)
            if n <= 0:
                continue
            data = rng.bytes(n * PAGE_SIZE)
            for i, page in enumerate(rng.integers(0, self.vm.pages, n).tolist()):
                if not self.vm.running or self._stop.is_set():
                    break
                try:
                    self.vm.write_page(page, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                except Exception:  # the guest was torn down under us
                    return
                self.written += 1


class Pacer:
    """How many pages are owed at `rate` pages/s between two clock readings.

    Fractions carry over, so the long-run rate is exact whatever the tick jitter; time spent
    idle (VM paused) is not owed.
    """

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.last = now
        self.owed = 0.0

    def due(self, now: float) -> int:
        self.owed += max(0.0, now - self.last) * self.rate
        self.last = now
        n = int(self.owed)
        self.owed -= n
        return n

    def idle(self, now: float) -> None:
        self.last = now
