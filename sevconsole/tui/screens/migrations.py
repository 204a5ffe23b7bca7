"""Migrations from the journal (in flight, unfinished, recent), re-attach; and the quit question.

Migrations belong to runner processes, not to this console: any console lists them and opens
the live view of one in flight (re-attach), including a console opened after the one that
started it was hung up.
"""

from __future__ import annotations

import datetime
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Header, Static

from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.tui import safe
from sevconsole.tui.messages import MigrationsListed
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.line_table import LineTable

COLUMNS = (("id", "Migration"), ("vm", "VM"), ("route", "From → To"), ("started", "Started"),
           ("state", "State"))


def state_cell(entry: Any) -> Content:
    if entry.in_flight:
        return safe.show("[$accent b]in flight[/]")
    if not entry.journal.trusted:
        return safe.show("[$error]corrupt journal[/]")
    step = entry.step.value if entry.step is not None else None
    if step is None:
        return safe.show("[$text-muted]not started[/]")
    if entry.unfinished:
        return safe.show("[$error]unfinished ($step): recover[/]", step=step)
    if step == "done":
        return safe.show("[$success]done[/]")
    return safe.show("[$warning]$step[/]", step=step)


class MigrationsScreen(ConsoleScreen):
    """`enter` on a migration in flight opens its live view, on a finished one its replay; `r`
    reads the journal again."""

    BINDINGS = [
        Binding("enter", "open", "Watch or replay", id="migrations.open"),
        Binding("r", "refresh", "Refresh", id="migrations.refresh"),
        Binding("escape", "app.pop_screen", "Back", id="migrations.back"),
    ]
    DEFAULT_CSS = """
    MigrationsScreen #hint { height: auto; padding: 0 1; color: $text-muted; }
    MigrationsScreen LineTable { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Any] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Migrations are owned by runner processes: leaving the console never stops "
                     "one. Enter re-attaches to a migration in flight, or replays a finished one.", id="hint")
        yield LineTable(COLUMNS, id="migrations-table")
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = "migrations"
        self.action_refresh()

    def action_refresh(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="migrations", exit_on_error=False)
    def _load(self) -> None:
        backend = self.app.backend  # type: ignore[attr-defined]
        lister = getattr(backend, "migrations", None)
        entries = lister() if lister is not None else []
        self.post_message(MigrationsListed(tuple(entries)))

    def on_migrations_listed(self, message: MigrationsListed) -> None:
        entries = list(message.entries)
        self.entries = [e for e in entries if e.in_flight or e.unfinished] + \
            [e for e in entries if not (e.in_flight or e.unfinished)][:50]
        table = self.query_one(LineTable)
        rows = []
        for e in self.entries:
            started = datetime.datetime.fromtimestamp(e.started).strftime("%Y-%m-%d %H:%M:%S") \
                if e.started else "?"
            cells = (safe.plain(e.id), safe.plain(e.vm), safe.plain(f"{e.source} → {e.target}"), Content(started),
                     state_cell(e))
            rows.append((e.id, [safe.rich(self.app, c) for c in cells]))
        if not self.entries:
            rows.append(("", [safe.rich(self.app, safe.plain("no migrations yet"))]))
        table.set_rows(rows, keep=table.row_key())

    def on_line_table_row_selected(self, event: LineTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        table = self.query_one(LineTable)
        if not self.entries or table.cursor_row >= len(self.entries):
            return
        entry = self.entries[table.cursor_row]
        if not entry.in_flight and entry.finished:
            from sevconsole.tui.screens.replay import ReplayScreen

            self.app.push_screen(ReplayScreen(entry.id, title=f"{entry.vm} {entry.source} → {entry.target}"))
            return
        if not entry.in_flight:
            outcome = entry.outcome or {}
            text = outcome.get("message") or (
                "its runner is gone: `sevconsole recover` (or a new console) finishes it"
                if entry.unfinished else "not in flight")
            self.notify(f"{entry.id} ({entry.vm}): {text}")
            return
        self.app.push_screen(attach_screen(self.app, entry))


def attach_screen(app: Any, entry: Any) -> Screen[None]:
    """The live view of a migration in flight, attached to its runner."""
    from sevconsole.tui.screens.live import LiveScreen

    reports: dict[str, HostReport] = getattr(app, "reports", {})
    source = reports.get(entry.source) or HostReport(name=entry.source, address="", port=0, reachable=False)
    target = reports.get(entry.target) or HostReport(name=entry.target, address="", port=0, reachable=False)
    vm = VmInfo(name=entry.vm, pid=None, qmp_path=None)
    return LiveScreen(vm, source, target, (), 300, attach_id=entry.id)


class QuitScreen(ModalScreen[str]):
    """Quitting while a migration runs: leave it running (detach), cancel it, or stay."""

    BINDINGS = [
        Binding("d", "answer('detach')", "Leave it running", id="quit.detach"),
        Binding("c", "answer('cancel')", "Cancel it", id="quit.cancel"),
        Binding("escape,s", "answer('stay')", "Stay", id="quit.stay"),
    ]
    DEFAULT_CSS = """
    QuitScreen { align: center middle; }
    QuitScreen > Vertical { width: 74; max-width: 98%; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    QuitScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    QuitScreen Button { margin-left: 1; }
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(safe.show("[b]Quit while $count migration(s) run?[/]", count=len(self.names)))
            yield Static(safe.plain("Running: " + ", ".join(self.names) + ". Each is owned by its own "
                                    "runner process: leaving it running is safe, and `sevconsole "
                                    "migrations` (or M in a new console) re-attaches. Cancelling "
                                    "returns each guest to its source first."))
            with Horizontal():
                yield Button("Stay (esc)", id="stay")
                yield Button("Cancel them (c)", id="cancel", variant="error")
                yield Button("Leave running (d)", id="detach", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))

    def action_answer(self, value: str) -> None:
        self.dismiss(value)
