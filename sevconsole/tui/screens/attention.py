"""What needs attention across the fleet, with the one safe action for each, run only once
confirmed: guests with no runnable copy, a paused or held copy with no migration in flight, an
interrupted migration, a stale source copy; hosts that cannot be reached or whose key changed;
monitors held by another client (engine.attention.find with fleet=True)."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Header, Static

from sevconsole.tui import safe
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.line_table import LineTable

COLUMNS = (("vm", "Guest or host"), ("problem", "What is wrong"), ("action", "Safe action"))
KIND_WORDS = {"host-down": "host down", "host-key-changed": "key changed", "host-key-unknown": "new key",
              "monitor-held": "monitor held", "stale-copy": "stale copy"}


class AttentionScreen(ConsoleScreen):
    BINDINGS = [
        Binding("enter", "fix", "Apply safe action", id="attention.fix"),
        Binding("escape", "app.pop_screen", "Back", id="attention.back"),
    ]
    DEFAULT_CSS = """
    AttentionScreen #hint { height: auto; padding: 0 1; color: $text-muted; }
    AttentionScreen LineTable { height: 1fr; }
    AttentionScreen #attention-empty { height: auto; padding: 1 2; }
    AttentionScreen #attention-detail { height: auto; max-height: 50%; padding: 0 1; border: round $panel-lighten-1; }
    """

    def __init__(self, select: int = 0) -> None:
        super().__init__()
        self.select = select  # the row to start on (the overview's attention panel)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Each action is what `sevconsole recover` would do; it runs only after you confirm.",
                     id="hint")
        yield LineTable(COLUMNS, id="attention-table")
        yield Static(id="attention-empty")
        yield Static(id="attention-detail")
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = "attention"
        self.refresh_items()

    @property
    def items(self) -> list[Any]:
        return list(getattr(self.app, "attention", []))

    def refresh_items(self) -> None:
        table = self.query_one(LineTable)
        row = table.cursor_row if table.row_count else self.select
        rows = []
        for index, item in enumerate(self.items):
            action = item.action.sentence if item.action is not None else "none: check by hand"
            kind = KIND_WORDS.get(getattr(item, "kind", "guest"))
            what = (safe.show("[b]$what[/] [$warning]($kind)[/]", what=item.vm or item.host or "?", kind=kind)
                    if kind else safe.show("[b]$what[/]", what=item.vm or item.host or "?"))
            rows.append((str(index), [safe.rich(self.app, what), safe.rich(self.app, safe.plain(item.problem)),
                                      safe.rich(self.app, safe.plain(action))]))
        table.set_rows(rows)
        if self.items:
            table.move_cursor(row=min(row, len(self.items) - 1))
        table.display = bool(self.items)
        empty = self.query_one("#attention-empty", Static)
        empty.display = not self.items
        names = list(self.app.backend.host_names())  # type: ignore[attr-defined]
        probed = set(names) <= set(getattr(self.app, "reports", {}))
        empty.update(safe.show("[$success]✓ Nothing needs attention:[/] every guest has exactly one copy "
                               "that can run, and every host answers." if probed else
                               "[$text-muted]Not checked yet: the list is made once every host has "
                               "answered its probe.[/]"))
        self.show_detail()

    def show_detail(self) -> None:
        """The highlighted item in full: a table cell cuts long sentences."""
        detail = self.query_one("#attention-detail", Static)
        items = self.items
        row = self.query_one(LineTable).cursor_row
        detail.display = bool(items)
        if not items or row >= len(items):
            return
        item = items[row]
        lines = [safe.show("[b]$what[/]", what=item.vm or item.host or "?"), safe.plain(item.problem)]
        for copy in item.copies:
            lines.append(safe.show("  copy on $host: pid $pid, $status", host=copy.host, pid=copy.pid or "?",
                                   status=copy.status or "status unknown"))
        lines.append(safe.show("[$accent]Enter: $action[/]", action=item.action.sentence)
                     if item.action is not None else
                     safe.show("[$text-muted]No safe action: the console will not guess; check the hosts.[/]"))
        detail.update(safe.lines(lines))

    def on_line_table_row_highlighted(self, event: LineTable.RowHighlighted) -> None:
        self.show_detail()

    def attention_updated(self) -> None:
        self.refresh_items()

    def on_line_table_row_selected(self, event: LineTable.RowSelected) -> None:
        event.stop()
        self.action_fix()

    def action_fix(self) -> None:
        from sevconsole.tui.screens.modals import ConfirmScreen

        items = self.items
        row = self.query_one(LineTable).cursor_row
        if not items or row >= len(items):
            return
        item = items[row]
        if item.action is None:
            self.notify(f"{item.vm or item.host}: no safe action; {item.problem}", severity="warning")
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
