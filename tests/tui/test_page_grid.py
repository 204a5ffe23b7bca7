"""The page map's aggregation: per-pixel counts are exact, whether recounted or diffed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevconsole.sev.pagestate import STATE_COUNT, PageState
from sevconsole.tui.page_grid import EMPTY, MAX_BLOCKS, PageGrid
from sevconsole.tui.widgets.page_map import StripPainter


def brute_counts(states: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.array([np.bincount(states[a:b], minlength=STATE_COUNT) for a, b in zip(edges, edges[1:], strict=False)])


def check(grid: PageGrid, states: np.ndarray, width: int, height: int) -> None:
    view = grid.view(width, height)
    assert view.page_edges[0] == 0 and view.page_edges[-1] == len(states)
    assert np.all(np.diff(view.page_edges) > 0)
    np.testing.assert_array_equal(view.cell_counts, brute_counts(states, view.page_edges))
    np.testing.assert_array_equal(view.totals, np.bincount(states, minlength=STATE_COUNT))
    flat = view.colours.ravel()
    np.testing.assert_array_equal(flat[: view.used], np.argmax(view.cell_counts, axis=1))
    assert np.all(flat[view.used :] == EMPTY)


@pytest.mark.parametrize("pages", [1, 7, 100, 4099, 262_144 + 5, 3 * MAX_BLOCKS * 8 + 13])
def test_counts_per_cell_exact(pages: int) -> None:
    rng = np.random.default_rng(pages)
    states = rng.integers(0, STATE_COUNT, pages, dtype=np.uint8)
    grid = PageGrid()
    grid.update(states)
    for width, height in [(80, 20), (7, 3), (200, 80), (1, 1)]:
        check(grid, states, width, height)


def test_small_guest_fills_only_its_pages() -> None:
    states = np.array([PageState.SHARED_SENT] * 3 + [PageState.PRIVATE_DIRTY] * 2, np.uint8)
    grid = PageGrid()
    grid.update(states)
    view = grid.view(4, 4)
    assert view.used == 5
    assert view.colours.ravel().tolist() == [4, 4, 4, 2, 2] + [EMPTY] * 11


def test_diff_updates_match_a_fresh_count() -> None:
    """Many small changes go through the word diff; the result equals a recount."""
    rng = np.random.default_rng(7)
    pages = 1_000_003  # not a multiple of 8: the tail pages are diffed one by one
    states = rng.integers(0, STATE_COUNT, pages, dtype=np.uint8)
    grid = PageGrid()
    grid.update(states)
    for step in range(20):
        states = states.copy()
        idx = rng.integers(0, pages, 500)
        states[idx] = rng.integers(0, STATE_COUNT, 500, dtype=np.uint8)
        states[-1] = step % STATE_COUNT
        assert grid.update(states)
    assert grid.full_recomputes == 1  # every later snapshot was diffed
    fresh = PageGrid()
    fresh.update(states)
    np.testing.assert_array_equal(grid.view(90, 30).cell_counts, fresh.view(90, 30).cell_counts)
    check(grid, states, 90, 30)


def test_same_array_is_no_work_and_big_change_recounts() -> None:
    states = np.zeros(80_000, np.uint8)
    grid = PageGrid()
    assert grid.update(states)
    version = grid.version
    assert not grid.update(states)
    assert grid.version == version
    everything = np.full(80_000, PageState.PRIVATE_SENT, np.uint8)
    grid.update(everything)
    assert grid.full_recomputes == 2
    check(grid, everything, 50, 10)


@settings(max_examples=60, deadline=None)
@given(
    pages=st.integers(1, 5000),
    changes=st.lists(st.tuples(st.integers(0, 4999), st.integers(0, STATE_COUNT - 1)), max_size=40),
    width=st.integers(1, 40),
    height=st.integers(1, 12),
)
def test_property_diff_equals_brute_force(pages: int, changes: list[tuple[int, int]], width: int, height: int) -> None:
    rng = np.random.default_rng(pages)
    states = rng.integers(0, STATE_COUNT, pages, dtype=np.uint8)
    grid = PageGrid()
    grid.update(states)
    new = states.copy()
    for index, state in changes:
        new[index % pages] = state
    grid.update(new)
    check(grid, new, width, height)


def test_painter_half_blocks_carry_upper_and_lower_pixels() -> None:
    states = np.array([PageState.PRIVATE_SENT] * 4 + [PageState.SHARED_DIRTY] * 4, np.uint8)
    grid = PageGrid()
    grid.update(states)
    painter = StripPainter()
    strips = painter.strips(grid.view(4, 2))  # upper row: pages 0-3, lower row: pages 4-7
    assert len(strips) == 1
    segments = list(strips[0])
    assert [s.text for s in segments] == ["▀▀▀▀"]
    assert segments[0].style.color.name == "#00af5f" and segments[0].style.bgcolor.name == "#ffd700"
    # an unchanged row is served from the cache: the very same Strip object
    assert painter.strips(grid.view(4, 2))[0] is strips[0]
