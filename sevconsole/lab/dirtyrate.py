"""QEMU 7.2's dirty-rate measurement for a lab VM: `calc-dirty-rate` and `query-dirty-rate`.

Arguments, answers and error sentences are QEMU's (migration/dirtyrate.c): the rate is an
integer in MB/s, `start-time` and `calc-time` are seconds, status `unstarted` -> `measuring` ->
`measured`. The lab counts the workload's page writes over the window (what KVM's dirty log
gives `dirty-bitmap`); `page-sampling` skips RAM blocks under 128 MiB as QEMU does, so a small
guest answers -1; the lab has no KVM dirty ring, so `dirty-ring` is refused as on such a host.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from .layout import PAGE_SIZE
from .qapi import Enum, Int, struct
from .qmp import QmpError

if TYPE_CHECKING:
    from .vm import LabVm

MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
MIN_CALC_S, MAX_CALC_S = 1, 60
MIN_SAMPLE, MAX_SAMPLE, DEFAULT_SAMPLE = 128, 16384, 512  # QEMU 7.2: [128, 16384]
MIN_RAMBLOCK_MIB = 128  # QEMU's MIN_RAMBLOCK_SIZE: smaller blocks are not sampled
ARGS = struct(("calc-time", Int(), False), ("sample-pages", Int()), ("mode", Enum(MODES)))


class DirtyRateMeter:
    """One VM's measurement state (QEMU keeps one per process)."""

    def __init__(self, vm: LabVm) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.status = "unstarted"
        self.start_time = 0
        self.calc_time = 0
        self.sample_pages = 0
        self.mode = "page-sampling"
        self.rate = -1

    def calc(self, args: dict[str, Any]) -> dict:
        calc_time = args["calc-time"]
        mode = args.get("mode", "page-sampling")
        with self.lock:
            if self.status == "measuring":
                raise QmpError("the dirty rate is already being measured.")
        if not MIN_CALC_S <= calc_time <= MAX_CALC_S:
            raise QmpError(f"calc-time is out of range[{MIN_CALC_S}, {MAX_CALC_S}].")
        if "sample-pages" in args and mode != "page-sampling":
            raise QmpError("sample-pages is used only in page-sampling mode")
        sample = args.get("sample-pages", DEFAULT_SAMPLE)
        if not MIN_SAMPLE <= sample <= MAX_SAMPLE:
            raise QmpError(f"sample-pages is out of range[{MIN_SAMPLE}, {MAX_SAMPLE}].")
        if mode == "dirty-ring":
            raise QmpError("mode dirty-ring is not enabled, use other method instead.")
        with self.lock:
            self.status, self.mode, self.sample_pages = "measuring", mode, sample
            self.start_time, self.calc_time, self.rate = int(time.time()), calc_time, -1
        start = (time.monotonic(), self.vm.dirtied_total)
        timer = threading.Timer(calc_time, self._measured, args=(start, calc_time))
        timer.daemon = True
        timer.start()
        return {}

    def _measured(self, start: tuple[float, int], calc_time: int) -> None:
        # QEMU divides by the period it asked for when its sleep ended on time (dirty_stat_wait),
        # by the time spent only when it overran: a timer a few ms late is on time here
        spent = int((time.monotonic() - start[0]) * 1000)
        ms = spent if spent > calc_time * 1000 + 100 else calc_time * 1000
        mib = (self.vm.dirtied_total - start[1]) * PAGE_SIZE >> 20
        small = self.vm.mem_bytes < MIN_RAMBLOCK_MIB << 20
        with self.lock:
            self.rate = -1 if self.mode == "page-sampling" and small else mib * 1000 // ms
            self.calc_time = ms // 1000
            self.status = "measured"

    def query(self, args: dict[str, Any]) -> dict:
        with self.lock:
            info: dict[str, Any] = {"status": self.status, "start-time": self.start_time,
                                    "calc-time": self.calc_time, "sample-pages": self.sample_pages,
                                    "mode": self.mode}
            if self.status == "measured":
                info["dirty-rate"] = self.rate
                if self.mode == "dirty-bitmap":
                    info["sample-pages"] = 0
        return info
