"""Aggregation of a guest's page states into the pixels of the page map.

A 64 GiB guest has 16M pages and the map a few thousand pixels, so a frame cannot walk every
page. Pages are grouped in fixed blocks whose per-state counts are kept up to date: a new
snapshot is compared with the previous one eight pages at a time (uint64 words), and only the
pages that changed move between counts. Pixels are runs of whole blocks, so the counts per
pixel stay exact while a resize only re-sums the (small) block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sevconsole.sev.pagestate import STATE_COUNT

MAX_BLOCKS = 1 << 15  # block table bound (32K x 6 counts): also the most pixels a map fills
EMPTY = -1  # pixel colour index for pixels past the last page


@dataclass(frozen=True)
class GridView:
    """One frame's aggregate: per-pixel exact counts and the state each pixel shows."""

    width: int  # pixels per pixel row
    height: int  # pixel rows (two per character row)
    cell_counts: np.ndarray  # (used, STATE_COUNT) int64: pages per state in each used pixel
    page_edges: np.ndarray  # (used + 1,) page index where each used pixel starts; last = total
    colours: np.ndarray  # (height, width) int8: the majority state, or EMPTY
    totals: np.ndarray  # (STATE_COUNT,) pages per state over the whole guest

    @property
    def used(self) -> int:
        return len(self.cell_counts)


class PageGrid:
    """Keeps block counts for one guest's page states; `view(pixels)` aggregates to pixels."""

    def __init__(self) -> None:
        self._states: np.ndarray | None = None
        self._block = 1
        self._counts = np.zeros((0, STATE_COUNT), np.int64)
        self._totals = np.zeros(STATE_COUNT, np.int64)
        self.version = 0  # bumps whenever the counts change
        self.full_recomputes = 0
        self._view_cache: tuple[tuple[int, int, int], GridView] | None = None

    @property
    def total_pages(self) -> int:
        return 0 if self._states is None else len(self._states)

    @property
    def block_pages(self) -> int:
        return self._block

    def update(self, states: np.ndarray | None) -> bool:
        """Take a new snapshot; returns True when anything changed. Same object: no work."""
        if states is self._states:
            return False
        if states is None:
            self._states, self._counts = None, np.zeros((0, STATE_COUNT), np.int64)
            self._totals = np.zeros(STATE_COUNT, np.int64)
            self.version += 1
            return True
        states = np.ascontiguousarray(states, dtype=np.uint8)
        prev = self._states
        if prev is None or len(prev) != len(states) or not self._apply_diff(prev, states):
            self._full(states)
        self._states = states
        self.version += 1
        return True

    def _full(self, states: np.ndarray) -> None:
        n = len(states)
        block = -(-n // MAX_BLOCKS)
        self._block = 1 if block <= 1 else -(-block // 8) * 8  # words never straddle blocks
        b = self._block
        nfull, tail = divmod(n, b)
        nblocks = nfull + (1 if tail else 0)
        counts = np.zeros((nblocks, STATE_COUNT), np.int64)
        if b == 1:
            counts[np.arange(n), states] = 1
        elif b <= 64:  # short rows: one bincount over (block, state) keys beats row scans
            keys = (np.arange(n, dtype=np.int64) // b) * STATE_COUNT + states
            counts = np.bincount(keys, minlength=nblocks * STATE_COUNT).reshape(nblocks, STATE_COUNT)
            tail = 0
        elif nfull:
            body = states[: nfull * b].reshape(nfull, b)
            rest = np.full(nfull, b, np.int64)
            for s in range(STATE_COUNT - 1):
                col = np.count_nonzero(body == s, axis=1)
                counts[:nfull, s] = col
                rest -= col
            counts[:nfull, STATE_COUNT - 1] = rest
        if tail:
            counts[-1] = np.bincount(states[nfull * b :], minlength=STATE_COUNT)
        self._counts = counts
        self._totals = counts.sum(axis=0)
        self.full_recomputes += 1

    def _apply_diff(self, prev: np.ndarray, new: np.ndarray) -> bool:
        """Move changed pages between counts; False when a full recompute is cheaper."""
        n = len(new)
        n8 = n - n % 8
        old_words, new_words = prev[:n8].view(np.uint64), new[:n8].view(np.uint64)
        words = np.flatnonzero(old_words != new_words)
        if len(words) > max(64, n8 // 64):  # over ~1/8 of pages touched: recount instead
            return False
        # Blocks are 1 page or a multiple of 8 pages, so a word lies in one block or eight. Counting all eight
        # pages of a changed word out (old) and in (new) moves exactly the changed ones.
        old_b = old_words[words].view(np.uint8)
        new_b = new_words[words].view(np.uint8)
        if self._block == 1:  # small guest: one block per page
            blocks = (words[:, None] * 8 + np.arange(8)).ravel()
        else:
            blocks = np.repeat(words * 8 // self._block, 8)
        if n8 < n:
            tail = np.arange(n8, n)
            old_b, new_b = np.concatenate([old_b, prev[n8:]]), np.concatenate([new_b, new[n8:]])
            blocks = np.concatenate([blocks, tail // self._block])
        if not len(blocks):
            return True
        # number the touched blocks 0..k-1 (they come sorted) and count in a small table
        first = np.empty(len(blocks), bool)
        first[0] = True
        np.not_equal(blocks[1:], blocks[:-1], out=first[1:])
        local = np.cumsum(first) - 1
        touched = blocks[first]
        size = len(touched) * STATE_COUNT
        delta = np.bincount(local * STATE_COUNT + new_b, minlength=size)
        delta -= np.bincount(local * STATE_COUNT + old_b, minlength=size)
        delta = delta.reshape(-1, STATE_COUNT)
        self._counts[touched] += delta
        self._totals += delta.sum(axis=0)
        return True

    def view(self, width: int, height: int) -> GridView:
        """Aggregate to a width x height pixel grid, pages row-major; cached per version/size."""
        key = (self.version, width, height)
        if self._view_cache is not None and self._view_cache[0] == key:
            return self._view_cache[1]
        width, height = max(width, 0), max(height, 0)
        nblocks = len(self._counts)
        used = min(width * height, nblocks)
        colours = np.full(width * height, EMPTY, np.int8)
        if used:
            edges = (np.arange(used + 1, dtype=np.int64) * nblocks) // used
            cell = np.add.reduceat(self._counts, edges[:-1], axis=0)
            colours[:used] = np.argmax(cell, axis=1)
            page_edges = np.minimum(edges * self._block, self.total_pages)
        else:
            cell = np.zeros((0, STATE_COUNT), np.int64)
            page_edges = np.zeros(1, np.int64)
        grid = GridView(
            width=width, height=height, cell_counts=cell, page_edges=page_edges,
            colours=colours.reshape(height, width), totals=self._totals.copy(),
        )
        self._view_cache = (key, grid)
        return grid
