"""The page map: one half-block pixel per run of guest pages, drawn with the Line API.

Each character cell shows two pixels: the upper one as the foreground of "▀", the lower one
as its background. Strips are cached per character row and rebuilt only for rows whose pixels
changed, so a redraw with an unchanged snapshot costs only the lookups (Toolong's pattern).
"""

from __future__ import annotations

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from sevconsole.sev.pagestate import PageState
from sevconsole.tui.page_grid import GridView, PageGrid

UPPER = "▀"
STATE_CLASSES = tuple(f"pagemap--{s.name.lower().replace('_', '-')}" for s in PageState)
# Fallback colours (256-colour safe) when no stylesheet is around, as in the benchmark.
DEFAULT_COLOURS = ("#5f5f87", "#00af5f", "#ff5f00", "#3a3a3a", "#5fafaf", "#ffd700")
DEFAULT_EMPTY = "#1c1c1c"


class StripPainter:
    """Turns a GridView's colour grid into one Strip per character row, cached by row content."""

    def __init__(self, colours: tuple[str, ...] = DEFAULT_COLOURS, empty: str = DEFAULT_EMPTY) -> None:
        self.set_colours(colours, empty)

    def set_colours(self, colours: tuple[str, ...], empty: str) -> None:
        palette = [*colours, empty]  # index -1 (EMPTY) picks the last entry
        # one Style per (upper, lower) pair, so building a strip makes no new Style objects
        self._styles = [[Style(color=u, bgcolor=lo) for lo in palette] for u in palette]
        self._rows: dict[int, tuple[bytes, Strip]] = {}

    def strips(self, grid: GridView) -> list[Strip]:
        rows = grid.height // 2
        out = []
        for y in range(rows):
            pair = grid.colours[2 * y : 2 * y + 2]
            key = pair.tobytes()
            cached = self._rows.get(y)
            if cached is None or cached[0] != key:
                cached = (key, self._paint(pair[0], pair[1]))
                self._rows[y] = cached
            out.append(cached[1])
        for y in [y for y in self._rows if y >= rows]:
            del self._rows[y]
        return out

    def _paint(self, upper: np.ndarray, lower: np.ndarray) -> Strip:
        code = upper.astype(np.int16) * 16 + lower  # one number per cell
        if len(code) == 0:
            return Strip([], 0)
        starts = np.flatnonzero(np.diff(code, prepend=code[0] - 1))
        lengths = np.diff(np.append(starts, len(code))).tolist()
        ups, los = upper[starts].tolist(), lower[starts].tolist()  # plain ints: fast to index
        styles = self._styles
        segments = [
            Segment(UPPER * n, styles[u][lo]) for u, lo, n in zip(ups, los, lengths, strict=True)
        ]
        return Strip(segments, len(code))


class PageMap(Widget):
    """Live map of a guest's pages; feed it with `show(states)` (the array is never mutated)."""

    DEFAULT_CSS = """
    PageMap { height: 1fr; min-height: 2; background: $surface; }
    PageMap > .pagemap--private-unsent { color: $primary-darken-2; }
    PageMap > .pagemap--private-sent { color: $success; }
    PageMap > .pagemap--private-dirty { color: $error; }
    PageMap > .pagemap--shared-unsent { color: $panel-lighten-2; }
    PageMap > .pagemap--shared-sent { color: $accent; }
    PageMap > .pagemap--shared-dirty { color: $warning; }
    PageMap > .pagemap--empty { color: $surface; }
    PageMap > .pagemap--label { color: $text-muted; }
    """
    COMPONENT_CLASSES = {*STATE_CLASSES, "pagemap--empty", "pagemap--label"}
    EMPTY_TEXT = "no page map yet: it appears once the source reports its pages"

    version: reactive[int] = reactive(0, layout=False)

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.grid = PageGrid()
        self._painter = StripPainter()
        self._palette_key: tuple[str, ...] = ()
        self._strips: list[Strip] = []
        self._strips_key: tuple[int, int, int] | None = None

    def show(self, states: np.ndarray | None) -> None:
        if self.grid.update(states):
            self.version = self.grid.version
            self.refresh()

    def current_view(self) -> GridView:
        return self.grid.view(self.size.width, self.size.height * 2)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return container.height

    def _palette(self) -> None:
        colours = tuple(
            self.get_component_rich_style(c, partial=True).color.name  # type: ignore[union-attr]
            if self.get_component_rich_style(c, partial=True).color else d
            for c, d in zip(STATE_CLASSES, DEFAULT_COLOURS, strict=True)
        )
        empty_style = self.get_component_rich_style("pagemap--empty", partial=True)
        empty = empty_style.color.name if empty_style.color else DEFAULT_EMPTY
        key = (*colours, empty)
        if key != self._palette_key:
            self._palette_key = key
            self._painter.set_colours(colours, empty)
            self._strips_key = None

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._palette_key = ()  # theme changed: re-read the component colours
        self.refresh()

    def render_line(self, y: int) -> Strip:
        if not self.grid.total_pages:  # nothing to draw yet: say so, never a block of one colour
            width = self.size.width
            if y != (self.size.height - 1) // 2:
                return Strip.blank(width)
            text = self.EMPTY_TEXT if len(self.EMPTY_TEXT) <= width else "no page map yet"
            style = self.get_component_rich_style("pagemap--label", partial=True)
            return Strip([Segment(text.center(width)[:width], style)], width)
        if not self._palette_key:
            self._palette()
        key = (self.grid.version, self.size.width, self.size.height)
        if key != self._strips_key:
            self._strips = self._painter.strips(self.current_view())
            self._strips_key = key
        if y < len(self._strips):
            return self._strips[y]
        return Strip.blank(self.size.width)
