"""Everything a running migration shows, as one container: page map, transfer, firmware, events.

Snapshots arrive as messages; `apply` draws the newest and is cheap for an unchanged page array.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import RichLog, Static, TabbedContent, TabPane

from sevconsole.engine.progress import Progress
from sevconsole.tui import safe
from sevconsole.tui.widgets.firmware import FirmwarePanel
from sevconsole.tui.widgets.page_panel import PagePanel
from sevconsole.tui.widgets.transfer import TransferPanel


class MigrationView(Vertical):
    DEFAULT_CSS = """
    MigrationView { height: 1fr; }
    MigrationView > #mv-title { height: 1; }
    MigrationView > #mv-top { height: 13; }
    MigrationView #mv-side { width: 40; height: auto; }
    MigrationView > TabbedContent { height: 1fr; min-height: 6; }
    MigrationView TabPane { padding: 0; }
    MigrationView RichLog { height: 1fr; }
    .-tall MigrationView > #mv-top { height: 1fr; }
    .-tall MigrationView > TabbedContent { height: 16; }
    .-wide MigrationView #mv-side { width: 56; }
    """

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.latest: Progress | None = None
        self._events_seen = 0
        self._errors_seen = 0

    def compose(self) -> ComposeResult:
        yield Static(id="mv-title")
        with Horizontal(id="mv-top"):
            yield PagePanel()
            with Vertical(id="mv-side"):
                yield TransferPanel()
        with TabbedContent(initial="tab-firmware"):
            with TabPane("Firmware", id="tab-firmware"):
                yield FirmwarePanel()
            with TabPane("Events", id="tab-events"):
                yield RichLog(id="events", wrap=True, markup=False, max_lines=500)

    def apply(self, p: Progress) -> None:
        with self.app.batch_update():  # one repaint for all panels (Memray's pattern)
            self._apply(p)

    def _apply(self, p: Progress) -> None:
        self.latest = p
        self.query_one("#mv-title", Static).update(safe.show(
            "[b]$vm[/] $source → $target  [$accent]$phase[/]", vm=p.vm, source=p.source, target=p.target,
            phase=p.phase.value))
        self.query_one(PagePanel).show(p.page_states, p.page_map_exact, p.page_size)
        self.query_one(TransferPanel).show(p)
        self.query_one(FirmwarePanel).show(p.source_fw, p.target_fw, p.sev_log)
        log = self.query_one("#events", RichLog)
        # events and errors are host sentences: Rich Text, never markup (a `[` in one crashed the log)
        for event in p.events[self._events_seen :]:
            log.write(safe.rich(self.app, safe.plain(event)))
        for error in p.errors[self._errors_seen :]:
            log.write(safe.rich(self.app, safe.plain(error, "$error")))
        self._events_seen, self._errors_seen = len(p.events), len(p.errors)
