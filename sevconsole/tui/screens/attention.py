"""Guests that need attention (no runnable copy, a paused or held copy with no migration in
flight, an interrupted migration) and the one safe action for each, run only once confirmed."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from sevconsole.tui import safe

COLUMNS = (("vm", "VM"), ("problem", "What is wrong"), ("action", "Safe action"))


class AttentionScreen(Screen[None]):
    BINDINGS = [
        Binding("enter", "fix", "Apply safe action", id="attention.fix"),
        Binding("escape", "app.pop_screen", "Back", id="attention.back"),
    ]
    DEFAULT_CSS = """
    AttentionScreen #hint { height: auto; padding: 0 1; color: $text-muted; }
    AttentionScreen DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Each action is what `sevconsole recover` would do; it runs only after you confirm.",
                     id="hint")
        table: DataTable[Content] = DataTable(cursor_type="row", zebra_stripes=True)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "attention"
        self.refresh_items()

    @property
    def items(self) -> list[Any]:
        return list(getattr(self.app, "attention", []))

    def refresh_items(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for item in self.items:
            action = item.action.sentence if item.action is not None else "none: check the hosts by hand"
            table.add_row(safe.plain(item.vm), safe.plain(item.problem), safe.plain(action))
        if not self.items:
            table.add_row(safe.plain("nothing needs attention"), Content(), Content())

    def attention_updated(self) -> None:
        self.refresh_items()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_fix()

    def action_fix(self) -> None:
        from sevconsole.tui.screens.modals import ConfirmScreen

        items = self.items
        row = self.query_one(DataTable).cursor_row
        if not items or row >= len(items):
            return
        item = items[row]
        if item.action is None:
            self.notify(f"{item.vm}: no safe action; {item.problem}", severity="warning")
            return

        def answer(ok: bool | None) -> None:
            if ok:
                self._apply(item)

        self.app.push_screen(ConfirmScreen(f"{item.action.sentence.capitalize()}?",
                                           f"{item.vm}: {item.problem}.", yes="Do it (y)", no="No (n)"), answer)

    @work(exclusive=True, group="attention", exit_on_error=False)
    async def _apply(self, item: Any) -> None:
        backend = self.app.backend  # type: ignore[attr-defined]
        try:
            sentence = await backend.apply_fix(item.action)
        except Exception as exc:  # the sentence of a link or QMP error
            self.notify(f"{item.vm}: {exc}", severity="error", timeout=15)
            return
        self.notify(f"{item.vm}: {sentence}", title="Done", timeout=10)
        self.app.probe_all()  # type: ignore[attr-defined]
