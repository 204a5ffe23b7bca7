"""Everything a migration shows, as one container: page map, transfer, firmware, events.

Snapshots arrive as messages; `apply` draws the newest and is cheap for an unchanged page array.
A replay applies older snapshots too (the scrubber going back): the event log is then rewritten.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import RichLog, Static, TabbedContent, TabPane

from sevconsole.engine.progress import Progress
from sevconsole.tui import safe
from sevconsole.tui.widgets.firmware import FirmwarePanel
from sevconsole.tui.widgets.page_panel import PagePanel
from sevconsole.tui.widgets.transfer import TransferPanel


def title_line(p: Progress, mode: str = "") -> Content:
    """`web: lab-1 → lab-2, pre-copy` in one styled run (a style change beside a space reads as a
    missing space to anything that takes the runs apart)."""
    return safe.show("[b]$vm: $source → $target, $phase[/]$mode", vm=p.vm, source=p.source, target=p.target,
                     phase=p.phase.value, mode=mode)


class MigrationView(Vertical):
    SCOPED_CSS = False  # its rules name the screen's breakpoint classes (-tall, -wide)
    DEFAULT_CSS = """
    MigrationView { height: 1fr; }
    MigrationView > #mv-title { height: 1; padding: 0 1; }
    MigrationView > #mv-top { height: 13; }
    MigrationView #mv-side { width: 40; height: auto; }
    MigrationView > TabbedContent { height: 1fr; min-height: 6; }
    MigrationView TabPane { padding: 0; }
    MigrationView RichLog { height: 1fr; padding: 0 1; }
    MigrationView #events-empty { height: auto; padding: 0 1; }
    .-tall MigrationView > #mv-top { height: 1fr; min-height: 15; }
    .-tall MigrationView > TabbedContent { height: 16; }
    .-wide MigrationView #mv-side { width: 56; }
    """

    def __init__(self, *, mode: str = "", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.latest: Progress | None = None
        self.mode = mode  # shown after the title: " (replay)"
        self._events: tuple[str, ...] = ()
        self._errors: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(safe.show("[$text-muted]waiting for the first snapshot…[/]"), id="mv-title")
        with Horizontal(id="mv-top"):
            yield PagePanel()
            with Vertical(id="mv-side"):
                yield TransferPanel()
        with TabbedContent(initial="tab-firmware"):
            with TabPane("Firmware", id="tab-firmware"):
                yield FirmwarePanel()
            with TabPane("Events", id="tab-events"):
                yield Static(safe.show("[$text-muted]no event yet[/]"), id="events-empty")
                yield RichLog(id="events", wrap=True, markup=False, max_lines=500)

    def apply(self, p: Progress) -> None:
        with self.app.batch_update():  # one repaint for all panels (Memray's pattern)
            self._apply(p)

    def _apply(self, p: Progress) -> None:
        self.latest = p
        self.query_one("#mv-title", Static).update(title_line(p, self.mode))
        self.query_one(PagePanel).show(p.page_states, p.page_map_exact, p.page_size)
        self.query_one(TransferPanel).show(p)
        self.query_one(FirmwarePanel).show(p.source_fw, p.target_fw, p.sev_log)
        self._log(p)

    def _log(self, p: Progress) -> None:
        """Events and errors are host sentences: Rich Text, never markup (a `[` in one crashed the
        log). New lines are appended; when the snapshot's lines do not continue what is shown (the
        engine keeps the last 100 events, a replay goes back), the log is written again."""
        events, errors = p.events, p.errors
        if events == self._events and errors == self._errors:
            return
        log = self.query_one("#events", RichLog)
        self.query_one("#events-empty").display = not (events or errors)
        continues = (events[: len(self._events)] == self._events and errors[: len(self._errors)] == self._errors)
        if continues:
            new_events, new_errors = events[len(self._events):], errors[len(self._errors):]
        else:
            log.clear()
            new_events, new_errors = events, errors
        for event in new_events:
            log.write(safe.rich(self.app, safe.plain(event)))
        for error in new_errors:
            log.write(safe.rich(self.app, safe.plain(error, "$error")))
        self._events, self._errors = events, errors
