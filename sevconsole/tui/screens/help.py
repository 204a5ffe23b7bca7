"""`?`: every binding active on the screen below, and the app's own."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 76; max-width: 98%; height: 90%; border: thick $primary; background: $surface; }
    HelpScreen DataTable { height: auto; }
    """

    def __init__(self, below: Screen) -> None:
        super().__init__()
        self.rows = binding_rows(below)

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("[b]Keys[/] (Ctrl+P opens the command palette: every action is there too)")
            yield DataTable(cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("key", "action", "where")
        for row in self.rows:
            table.add_row(*(Text(cell, end="") for cell in row))  # a str cell is markup; a key may be "["
        table.focus()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)


def binding_rows(screen: Screen) -> list[tuple[str, str, str]]:
    """(key, description, owner) for the bindings of the focused chain, the screen and the app."""
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    app = screen.app
    focused = [n for n in (screen.focused.ancestors_with_self if screen.focused else []) if n is not screen]
    nodes = [screen, app, *focused]  # the screen's own keys first, widget navigation last
    for node in nodes:
        owner = "app" if node is app else type(node).__name__
        for key, binding in _bindings(node):
            if not binding.description or (key, binding.action) in seen:
                continue
            seen.add((key, binding.action))
            rows.append((app.get_key_display(binding), binding.description, owner))
    return rows


def _bindings(node: object) -> list[tuple[str, Binding]]:
    bindings_map = getattr(node, "_bindings", None)
    if bindings_map is None:
        return []
    return [(key, b) for key, items in bindings_map.key_to_bindings.items() for b in items]
