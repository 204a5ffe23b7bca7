"""Page map frame time for 1, 16 and 64 GiB guests, printed as JSON.

A frame = take a new page-state snapshot (a new array, as the engine posts) + aggregate to
pixels + build the Strips of every row. The state changes between frames the way a pre-copy
pass does: a sending frontier advances (1000 MB/s at 10 snapshots/s by default) and the
workload dirties scattered pages (50k pages/s by default). Also timed:
the first frame (full count) and a redraw with an unchanged snapshot (cache hit).
Usage: python -m benchmarks.pagemap [--frames N] [--size COLSxROWS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from sevconsole.sev.pagestate import PageState
from sevconsole.tui.page_grid import PageGrid
from sevconsole.tui.widgets.page_map import StripPainter

GIB_PAGES = (1 << 30) // 4096


def snapshots(pages: int, frames: int, sent_per_frame: int, dirty_per_frame: int, seed: int = 1):
    """Yield new arrays: 30% shared pages, a sending frontier, scattered dirtied pages."""
    rng = np.random.default_rng(seed)
    shared = rng.random(pages) < 0.3
    states = np.where(shared, PageState.SHARED_UNSENT, PageState.PRIVATE_UNSENT).astype(np.uint8)
    # start mid-pass, so every frame has sent pages to dirty
    lo = pages // 3
    states[:lo][states[:lo] == PageState.PRIVATE_UNSENT] = PageState.PRIVATE_SENT
    states[:lo][states[:lo] == PageState.SHARED_UNSENT] = PageState.SHARED_SENT
    for _ in range(frames):
        states = states.copy()  # the engine never mutates a posted array
        hi = min(pages, lo + sent_per_frame)
        seg = states[lo:hi]
        seg[seg == PageState.PRIVATE_UNSENT] = PageState.PRIVATE_SENT
        seg[seg == PageState.SHARED_UNSENT] = PageState.SHARED_SENT
        lo = hi
        dirty = rng.integers(0, max(hi, 1), size=dirty_per_frame)
        states[dirty] = np.where(shared[dirty], PageState.SHARED_DIRTY, PageState.PRIVATE_DIRTY)
        yield states


def run(gib: int, frames: int, cols: int, rows: int, sent: int, dirty: int) -> dict[str, float | int]:
    pages = gib * GIB_PAGES
    grid, painter = PageGrid(), StripPainter()
    times, first = [], None
    for snap in snapshots(pages, frames + 1, sent, dirty):
        t0 = time.perf_counter()
        grid.update(snap)
        strips = painter.strips(grid.view(cols, rows * 2))
        dt = (time.perf_counter() - t0) * 1000
        assert len(strips) == rows
        if first is None:
            first = dt
        else:
            times.append(dt)
    t0 = time.perf_counter()
    for _ in range(frames):
        grid.update(snap)
        painter.strips(grid.view(cols, rows * 2))
    cached = (time.perf_counter() - t0) * 1000 / frames
    return {
        "gib": gib, "pages": pages, "frames": len(times),
        "first_frame_ms": round(first or 0.0, 3),
        "frame_ms_median": round(statistics.median(times), 3),
        "frame_ms_max": round(max(times), 3),
        "unchanged_redraw_ms": round(cached, 4),
        "full_recounts": grid.full_recomputes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", default="156x18", help="map size in characters (COLSxROWS)")
    parser.add_argument("--fps", type=float, default=10.0, help="snapshots per second")
    parser.add_argument("--rate-mbs", type=float, default=1000.0, help="transfer rate, MB/s")
    parser.add_argument("--dirty-pps", type=float, default=50_000.0, help="pages dirtied per second")
    args = parser.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    sent = int(args.rate_mbs * 1e6 / 4096 / args.fps)
    dirty = int(args.dirty_pps / args.fps)
    results = [run(g, args.frames, cols, rows, sent, dirty) for g in (1, 16, 64)]
    base = results[0]["frame_ms_median"] or 1e-9
    print(json.dumps({
        "benchmark": "pagemap", "map_chars": [cols, rows], "pixels": cols * rows * 2,
        "pages_sent_per_frame": sent, "pages_dirtied_per_frame": dirty,
        "target_ms_64gib": 5.0, "results": results,
        "ratio_64gib_to_1gib": round(results[2]["frame_ms_median"] / base, 2),
        "ratio_64gib_to_16gib": round(results[2]["frame_ms_median"] / (results[1]["frame_ms_median"] or 1e-9), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
