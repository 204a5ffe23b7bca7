"""Full garbage collections while the operator is idle, not in the middle of a keystroke.

A full (generation 2) collection walks every tracked object that is not frozen: on a fleet's
console that is 25 ms idle and up to ~85 ms with migrations streaming on the same cores, the
slowest keys the console benchmark saw. CPython starts one whenever enough objects survived
into the oldest generation, which on a console that keeps making rows, strips and journal
entries is every few seconds. So the automatic trigger is pushed far out and a timer runs the
full collection once the keys have been quiet for IDLE_S (at most every EVERY_S), and at least
every FORCE_S whatever the operator does, so memory stays bounded. The young generations are
left to CPython: their collections take a few ms.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IDLE_S = 1.0  # no key or click for this long: a pause here is not felt
EVERY_S = 10.0  # at most one idle full collection this often
FORCE_S = 60.0  # and one at the latest this long after the last, idle or not
AUTOMATIC_FULL_AFTER = 10_000  # generation-1 collections before CPython's own full one (default 10)


@dataclass
class IdleCollector:
    clock: Callable[[], float] = time.monotonic  # tests pass a clock of their own
    last_input: float = field(default=0.0)
    last_full: float = field(default=0.0)
    full_runs: int = 0
    _saved: tuple[int, int, int] | None = None

    def now(self) -> float:
        return self.clock()

    def start(self) -> None:
        """Take over full collections (call once; `stop` gives them back)."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            young, middle, _ = self._saved
            gc.set_threshold(young, middle, AUTOMATIC_FULL_AFTER)
        self.last_input = self.last_full = self.now()

    def stop(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def input(self) -> None:
        """A key or a click: the operator is here."""
        self.last_input = self.now()

    def due(self) -> bool:
        now = self.now()
        since_full = now - self.last_full
        return since_full >= FORCE_S or (since_full >= EVERY_S and now - self.last_input >= IDLE_S)

    def tick(self) -> bool:
        """Called by a timer: runs a full collection when it is due; True when it did."""
        if self._saved is None or not self.due():
            return False
        gc.collect()
        self.full_runs += 1
        self.last_full = self.now()
        return True
