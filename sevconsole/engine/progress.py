"""Progress: the immutable snapshot of one migration that the engine posts to its watchers.

The console and `sevconsole migrate --json` read only this. Arrays are numpy arrays that the
engine never mutates after posting (a new snapshot carries new arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Phase(StrEnum):
    PREFLIGHT = "preflight"
    CONNECTING = "connecting"
    SEND_START = "send-start"
    PRECOPY = "pre-copy"  # with Progress.pass_number
    STOP_AND_COPY = "stop-and-copy"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED, Phase.CANCELLED)


@dataclass(frozen=True)
class FirmwareView:
    """One end's firmware as last seen (firmware numbering; SENT = 6)."""

    host: str
    platform_state: int | None = None
    guest_state: int | None = None
    handle: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    last_status: int | None = None


@dataclass(frozen=True)
class SevLogEntry:
    host: str
    command: str  # SEND_START, SEND_UPDATE_DATA, ...
    status: int
    count: int = 1  # consecutive identical commands are folded: SEND_UPDATE_DATA x N
    time: float = 0.0


@dataclass(frozen=True)
class Progress:
    vm: str
    source: str
    target: str
    phase: Phase
    pass_number: int = 0
    started_at: float = 0.0
    elapsed_s: float = 0.0
    # memory
    page_size: int = 4096
    total_pages: int = 0
    page_states: np.ndarray | None = None  # sev.pagestate values, one per page
    page_map_exact: bool = False  # False: estimated from query-migrate counters
    # transfer
    bytes_transferred: int = 0
    bytes_remaining: int = 0
    bytes_total: int = 0
    pages_transferred: int = 0
    rate_bps: float = 0.0  # bytes/s now
    pages_per_s: float = 0.0
    rate_history: tuple[float, ...] = ()  # bytes/s, oldest first
    dirty_pages_per_s: float = 0.0
    # convergence
    downtime_limit_ms: int = 300
    expected_downtime_ms: float | None = None
    converging: bool | None = None  # None: not enough data yet
    eta_s: float | None = None
    # firmware
    source_fw: FirmwareView | None = None
    target_fw: FirmwareView | None = None
    sev_log: tuple[SevLogEntry, ...] = ()
    # outcome
    events: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (page map as counts, not the array)."""
        from sevconsole.sev.pagestate import PageState

        data: dict[str, Any] = {
            "vm": self.vm, "source": self.source, "target": self.target,
            "phase": self.phase.value, "pass": self.pass_number, "elapsed_s": round(self.elapsed_s, 3),
            "bytes_transferred": self.bytes_transferred, "bytes_remaining": self.bytes_remaining,
            "bytes_total": self.bytes_total, "pages_transferred": self.pages_transferred,
            "rate_bps": self.rate_bps, "pages_per_s": self.pages_per_s,
            "dirty_pages_per_s": self.dirty_pages_per_s, "downtime_limit_ms": self.downtime_limit_ms,
            "expected_downtime_ms": self.expected_downtime_ms, "converging": self.converging,
            "eta_s": self.eta_s, "page_map_exact": self.page_map_exact, "errors": list(self.errors),
        }
        if self.page_states is not None:
            # one compare per state: np.bincount would widen 16M uint8 pages to int64 first (~10x slower)
            data["pages"] = {s.name.lower(): int(np.count_nonzero(self.page_states == s)) for s in PageState}
        for key, fw in (("source_fw", self.source_fw), ("target_fw", self.target_fw)):
            if fw is not None:
                data[key] = {"platform_state": fw.platform_state, "guest_state": fw.guest_state,
                             "last_status": fw.last_status}
        return data
