"""The LineTable: what reaches the screen as the cursor moves in a scrolled list."""

from __future__ import annotations

from rich.text import Text
from textual.app import App, ComposeResult

from sevconsole.tui.widgets.line_table import LineTable


class OneTable(App[None]):
    def compose(self) -> ComposeResult:
        table = LineTable((("name", "Name"),), id="t")
        table.styles.height = 10
        yield table

    def on_mount(self) -> None:
        table = self.query_one(LineTable)
        table.set_rows([(f"r{i}", [Text(f"row {i:02}")]) for i in range(60)])
        table.focus()


def cursor_lines(app: OneTable) -> list[int]:
    """Screen lines drawn in the cursor's colours (the background of the table's first cell)."""
    table = app.query_one(LineTable)
    cursor = table.get_component_rich_style("linetable--cursor").bgcolor
    return [y for y in range(1, 10) if app.screen.get_style_at(1, y).bgcolor == cursor]


async def test_moving_up_in_a_scrolled_list_repaints_both_rows() -> None:
    app = OneTable()
    async with app.run_test(size=(30, 12)) as pilot:
        await pilot.press("end")  # the last row: the list scrolls
        await pilot.pause()
        table = app.query_one(LineTable)
        assert table.scroll_offset.y > 0 and table.cursor_row == 59
        assert cursor_lines(app) == [9]
        for expected in (8, 7, 6):
            await pilot.press("up")
            await pilot.pause()
            assert cursor_lines(app) == [expected]  # the new row lit, the old one no longer
        await pilot.press("down")
        await pilot.pause()
        assert cursor_lines(app) == [7]
