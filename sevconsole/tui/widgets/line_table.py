"""A table drawn with the Line API: only the visible rows are drawn, each row's Strip cached.

For the fleet's VM list (hundreds of rows, re-sorted and re-filtered as the operator types): a
DataTable measures every cell it is given and redraws every visible row on a sort, a filter or a
focus change; here `set_rows` only replaces a list, column widths come from the cells' lengths,
and a Strip is made once per row, width, cursor and colours (Toolong's pattern). It answers the
part of DataTable's API the console uses (row_count, cursor_row, move_cursor, get_row_at) and
posts RowHighlighted, RowSelected and HeaderSelected.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

MAX_COLUMN = 48  # a cell wider than this is cut (its row still shows the rest)
CACHE = 512  # strips kept (a screenful many times over)


class LineTable(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
    ]
    DEFAULT_CSS = """
    LineTable { height: 1fr; overflow-x: hidden; background: $surface; color: $foreground; }
    LineTable:focus { background-tint: $foreground 5%; }
    LineTable > .linetable--header { text-style: bold; background: $panel; color: $foreground; }
    LineTable > .linetable--even { background: $surface-lighten-1 50%; }
    LineTable:dark > .linetable--even { background: $surface-darken-1 40%; }
    LineTable > .linetable--cursor { background: $block-cursor-blurred-background;
                                     color: $block-cursor-blurred-foreground; }
    LineTable:focus > .linetable--cursor { background: $block-cursor-background; color: $block-cursor-foreground;
                                          text-style: $block-cursor-text-style; }
    """
    COMPONENT_CLASSES = {"linetable--header", "linetable--even", "linetable--cursor"}

    cursor_row: reactive[int] = reactive(0, repaint=False)

    class RowHighlighted(Message):
        def __init__(self, table: LineTable, row: int, key: str | None) -> None:
            super().__init__()
            self.table, self.cursor_row, self.row_key = table, row, key

        @property
        def control(self) -> LineTable:
            return self.table

    class RowSelected(RowHighlighted):
        pass

    class HeaderSelected(Message):
        def __init__(self, table: LineTable, column_key: str) -> None:
            super().__init__()
            self.table, self.column_key = table, column_key

        @property
        def control(self) -> LineTable:
            return self.table

    def __init__(self, columns: Sequence[tuple[str, str]] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self.columns: list[tuple[str, str]] = list(columns)  # (key, label)
        self.keys: list[str] = []
        self.cells: list[tuple[Text, ...]] = []
        self.widths: list[int] = [cell_len(label) for _, label in self.columns]
        self._strips: OrderedDict[tuple[Any, ...], Strip] = OrderedDict()
        self._version = 0
        self._look: tuple[Style, Style, Style, Style] | None = None

    # -- data
    @property
    def row_count(self) -> int:
        return len(self.keys)

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Text]]], *, keep: str | None = None) -> None:
        """Replace every row (key, cells as Rich Text); the cursor stays on `keep` when it is there."""
        self.keys = [key for key, _ in rows]
        self.cells = [tuple(cells) for _, cells in rows]
        widths = [cell_len(label) for _, label in self.columns]
        for cells in self.cells:
            for i, cell in enumerate(cells[: len(widths)]):
                widths[i] = max(widths[i], min(MAX_COLUMN, cell.cell_len))
        self.widths = widths
        self._version += 1
        self._strips.clear()
        size = Size(sum(widths) + 2 * len(widths), len(self.keys) + 1)
        if size != self.virtual_size:  # a new virtual size lays the screen out again: only when it changes
            self.virtual_size = size
        row = self.keys.index(keep) if keep in self.keys else min(self.cursor_row, max(0, len(self.keys) - 1))
        self.set_reactive(LineTable.cursor_row, row)
        self._scroll_to_cursor()
        self.refresh()

    def get_row_at(self, index: int) -> tuple[Text, ...]:
        return self.cells[index]

    def row_key(self, index: int | None = None) -> str | None:
        index = self.cursor_row if index is None else index
        return self.keys[index] if 0 <= index < len(self.keys) else None

    def move_cursor(self, *, row: int, animate: bool = False) -> None:
        self.cursor_row = max(0, min(len(self.keys) - 1, row)) if self.keys else 0

    def watch_cursor_row(self, old: int, new: int) -> None:
        self._scroll_to_cursor()
        self._refresh_row(old)
        self._refresh_row(new)
        if self.keys:
            self.post_message(self.RowHighlighted(self, new, self.row_key(new)))

    def _refresh_row(self, row: int) -> None:
        y = row + 1 - round(self.scroll_offset.y)  # on screen, under the header
        if 0 < y < self.size.height:
            self.refresh_line(row + 1)  # ScrollView's refresh_line takes the line in the scrolled space

    def _scroll_to_cursor(self) -> None:
        height = max(1, self.size.height - 1)  # the header stays
        top = round(self.scroll_offset.y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + height:
            self.scroll_to(y=self.cursor_row - height + 1, animate=False)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._look = None  # new colours (a theme, or :focus): strips are keyed by them, see _colours

    def _colours(self) -> tuple[Style, Style, Style, Style]:
        """The table's style and its header, even-row and cursor styles, as they are now. Part of
        each strip's key, so a focus change back and forth finds its strips made already."""
        if self._look is None:
            self._look = (self.rich_style, self.get_component_rich_style("linetable--header"),
                          self.get_component_rich_style("linetable--even", partial=True),
                          self.get_component_rich_style("linetable--cursor", partial=True))
        return self._look

    def _on_focus(self, event: events.Focus) -> None:
        self.refresh()

    def _on_blur(self, event: events.Blur) -> None:
        self.refresh()

    # -- keys and mouse
    def action_cursor(self, step: int) -> None:
        self.move_cursor(row=self.cursor_row + step)

    def action_page(self, step: int) -> None:
        self.move_cursor(row=self.cursor_row + step * max(1, self.size.height - 2))

    def action_edge(self, end: int) -> None:
        self.move_cursor(row=len(self.keys) - 1 if end else 0)

    def action_select(self) -> None:
        if self.keys:
            self.post_message(self.RowSelected(self, self.cursor_row, self.row_key()))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x = event.x + round(self.scroll_offset.x)
            for (key, _), width in zip(self.columns, self.widths, strict=False):
                if x < width + 2:
                    self.post_message(self.HeaderSelected(self, key))
                    return
                x -= width + 2
            return
        row = event.y - 1 + round(self.scroll_offset.y)
        if 0 <= row < len(self.keys):
            if row == self.cursor_row and event.chain > 1:
                self.action_select()
            self.move_cursor(row=row)

    # -- drawing
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        look = self._colours()
        base, header, even, cursor_style = look
        if y == 0:
            return self._strip(("header", width, look, self._version),
                               lambda: self._line([Text(label) for _, label in self.columns], header, width))
        row = y - 1 + round(self.scroll_offset.y)
        if row >= len(self.keys):
            return Strip.blank(width, base)
        cursor = row == self.cursor_row
        key = ("row", self.keys[row], width, cursor, look, row % 2, self._version)

        def make() -> Strip:
            style = base
            if row % 2:
                style += even
            if cursor:
                style += cursor_style
            return self._line(self.cells[row], style, width)

        return self._strip(key, make)

    def _strip(self, key: tuple[Any, ...], make: Any) -> Strip:
        strip = self._strips.get(key)
        if strip is None:
            strip = make()
            self._strips[key] = strip
            while len(self._strips) > CACHE:
                self._strips.popitem(last=False)
        else:
            self._strips.move_to_end(key)
        return strip

    def _line(self, cells: Sequence[Text], style: Style, width: int) -> Strip:
        segments: list[Segment] = []
        for cell, column_width in zip(cells, self.widths, strict=False):
            text = cell.copy()
            text.truncate(column_width, overflow="ellipsis", pad=True)
            segments.append(Segment(" ", style))
            segments += [Segment(s.text, style + s.style if s.style else style)
                         for s in text.render(self.app.console)]
            segments.append(Segment(" ", style))
        return Strip(segments).adjust_cell_length(width, style).simplify()
