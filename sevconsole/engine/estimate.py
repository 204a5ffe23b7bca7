"""Pure arithmetic over migration counters: rates, convergence, ETA, an estimated page map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sevconsole.sev.pagestate import PageState

MARGIN = 0.1  # the link must drain at least 10% faster than the guest dirties to count as converging


@dataclass(frozen=True)
class Convergence:
    expected_downtime_ms: float | None
    converging: bool | None  # None: not enough data yet
    eta_s: float | None


def convergence(*, remaining_bytes: int, rate_bps: float, dirty_bps: float, downtime_limit_ms: int,
                reported_downtime_ms: float | None = None, passes: int = 0) -> Convergence:
    """Expected downtime = what is left at the current rate; it converges when the link drains
    memory faster than the guest dirties it (and in the end the rest fits in the limit)."""
    if rate_bps <= 0:
        return Convergence(reported_downtime_ms, None, None)
    expected = reported_downtime_ms if reported_downtime_ms else remaining_bytes / rate_bps * 1000.0
    net = rate_bps - dirty_bps
    if net <= MARGIN * rate_bps and expected > downtime_limit_ms:
        # within the noise of two rate estimates: a pass leaves as much as it took (AMD's 2021
        # figures: 350-450 pages/s through the PSP against 300-400 dirtied) -- never converges
        return Convergence(expected, False, None)
    if passes < 1 and dirty_bps == 0:
        # first pass: no dirty rate measured yet, the ETA is the first pass only
        return Convergence(expected, None, remaining_bytes / rate_bps)
    if net <= 0:
        return Convergence(expected, expected <= downtime_limit_ms, None if expected > downtime_limit_ms else 0.0)
    # remaining shrinks by `net` per second until it fits in the downtime budget
    budget = rate_bps * downtime_limit_ms / 1000.0
    eta = max(0.0, (remaining_bytes - budget) / net) + min(remaining_bytes, budget) / rate_bps
    return Convergence(expected, True, eta)


def estimated_page_map(total_pages: int, remaining_pages: int, passes: int, private: bool) -> np.ndarray:
    """A picture of the page map from query-migrate counters alone (QEMU does not say which pages):
    the first pass goes up the address space; later passes are the dirty rest."""
    base = PageState.PRIVATE_UNSENT if private else PageState.SHARED_UNSENT
    states = np.full(total_pages, base + 1, dtype=np.uint8)  # *_SENT
    remaining = max(0, min(total_pages, remaining_pages))
    if remaining:
        pending = base if passes <= 1 else base + 2  # *_UNSENT in pass 1, *_DIRTY after
        states[total_pages - remaining:] = pending
    return states
