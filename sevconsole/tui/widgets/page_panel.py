"""The page map with its legend: exact page counts per state, and what the map is made of."""

from __future__ import annotations

import numpy as np
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from sevconsole.sev.pagestate import PageState
from sevconsole.tui import format as fmt
from sevconsole.tui.widgets.page_map import PageMap

LEGEND = (
    (PageState.PRIVATE_UNSENT, "$primary-darken-2", "unsent"),
    (PageState.PRIVATE_SENT, "$success", "sent"),
    (PageState.PRIVATE_DIRTY, "$error", "dirty"),
    (PageState.SHARED_UNSENT, "$panel-lighten-2", "unsent"),
    (PageState.SHARED_SENT, "$accent", "sent"),
    (PageState.SHARED_DIRTY, "$warning", "dirty"),
)


class PagePanel(Vertical):
    """Page map + legend. `show(states, exact)`; counts are the exact totals of the array."""

    DEFAULT_CSS = """
    PagePanel { height: 1fr; border: round $panel-lighten-1; border-title-color: $text-muted; }
    PagePanel > #legend { height: auto; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield PageMap(id="pagemap")
        yield Static(id="legend")

    def on_mount(self) -> None:
        self.border_title = "Guest pages"

    def show(self, states: np.ndarray | None, exact: bool = True, page_size: int = 4096) -> None:
        page_map = self.query_one(PageMap)
        page_map.show(states)
        totals = page_map.grid.view(0, 0).totals if states is not None else np.zeros(len(PageState), np.int64)
        source = "exact (firmware page state)" if exact else "estimated from QEMU counters"
        pages = int(totals.sum())
        per = page_map.grid.block_pages

        def cell(state: PageState, colour: str) -> str:
            return f"[{colour}]█[/] {fmt.count(int(totals[state])):<7}"

        rows = [
            "[$text-muted]          unsent    sent      dirty[/]",
            "private " + "".join(cell(st, c) for st, c, _ in LEGEND[:3]),
            "shared  " + "".join(cell(st, c) for st, c, _ in LEGEND[3:]),
        ]
        self.border_subtitle = (f"{fmt.count(pages)} pages, {'exact' if exact else 'estimated'}" if pages
                                else "no pages yet")
        self.tooltip = (f"Each half cell is a run of {per}+ pages of {fmt.size(page_size)}, coloured by the "
                        f"state most of them are in. Counts are {source}. Private pages travel as SEV "
                        "packets (encrypted with the TEK); shared pages travel in clear.")
        self.query_one("#legend", Static).update("\n".join(rows))
