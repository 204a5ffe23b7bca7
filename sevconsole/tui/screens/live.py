"""A running migration: the engine runs in an async worker and posts Progress snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Header

from sevconsole.engine.checks import Check
from sevconsole.engine.progress import Progress
from sevconsole.engine.run import Outcome, Result
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.textsafe import escape_controls
from sevconsole.tui.backend import MigrationHandle
from sevconsole.tui.messages import MigrationEnded, ProgressPosted
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.migration_view import MigrationView


class LiveScreen(ConsoleScreen):
    BINDINGS = [
        Binding("c", "cancel", "Cancel migration", id="live.cancel"),
        Binding("f", "tab('tab-firmware')", "Firmware", id="live.firmware"),
        Binding("e", "tab('tab-events')", "Events", id="live.events"),
    ]

    def __init__(self, vm: VmInfo, source: HostReport, target: HostReport,
                 checks: Sequence[Check], downtime_ms: int, *, start: bool = True,
                 attach_id: str | None = None) -> None:
        super().__init__()
        self.vm, self.source, self.target = vm, source, target
        self.checks, self.downtime_ms = tuple(checks), downtime_ms
        self.start = start
        self.attach_id = attach_id  # re-attach to this migration's runner instead of starting one
        self.handle: MigrationHandle | None = None
        self.snapshots = 0  # how many snapshots were drawn (stale ones are skipped)
        self._pending: Progress | None = None
        self.result: Outcome | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield MigrationView()
        yield QuickFooter()

    @property
    def running(self) -> bool:
        """A migration is attached and has not ended (quitting asks first)."""
        return self.handle is not None and self.result is None

    def on_mount(self) -> None:
        self.sub_title = escape_controls(f"migrating {self.vm.name}")
        if self.start:
            self.run_migration()

    @work(exclusive=True, group="migration", exit_on_error=False)
    async def run_migration(self) -> None:
        backend = self.app.backend  # type: ignore[attr-defined]
        try:
            if self.attach_id is not None:
                self.handle = backend.attach(self.attach_id, self.post_progress)
            else:
                self.handle = backend.migration(self.vm, self.source, self.target, self.downtime_ms,
                                                self.checks, self.post_progress)
            result = await self.handle.run()
        except Exception as exc:  # the engine's own errors carry sentences
            result = Outcome(result=Result.FAILED, message=str(exc) or type(exc).__name__)
        known = getattr(self.handle, "migration_id", None) or self.attach_id
        if result.migration_id is None and known is not None:  # its snapshots can still be replayed
            result = replace(result, migration_id=known)
        self.post_message(MigrationEnded(result))

    def post_progress(self, progress: Progress) -> None:
        """Called by the engine; only the newest snapshot gets drawn (Memray's pattern)."""
        self._pending = progress
        self.post_message(ProgressPosted(progress))

    def on_progress_posted(self, message: ProgressPosted) -> None:
        if message.progress is not self._pending:
            return  # a newer snapshot is queued behind this one
        self.apply(message.progress)

    def apply(self, progress: Progress) -> None:
        self.query_one(MigrationView).apply(progress)
        self.snapshots += 1

    def on_migration_ended(self, message: MigrationEnded) -> None:
        self.result = message.result
        if self._pending is not None:
            self.apply(self._pending)
        from sevconsole.tui.screens.result import ResultScreen

        if getattr(self.app, "quit_when_ended", False):  # the operator chose to cancel, then quit
            self.app.exit()
            return
        self.app.switch_screen(ResultScreen(message.result, self.query_one(MigrationView).latest))

    def action_tab(self, tab: str) -> None:
        self.query_one("TabbedContent").active = tab  # type: ignore[attr-defined]

    def action_cancel(self) -> None:
        from sevconsole.tui.screens.modals import ConfirmScreen

        def answer(ok: bool | None) -> None:
            if ok and self.handle is not None:
                self.handle.cancel("cancelled by the operator")
                self.notify("Cancelling: SEND_CANCEL brings the source guest back to RUNNING." if sev else
                            "Cancelling: the guest keeps running on the source.")

        sev = self.vm.sev_enabled
        body = (f"The source guest on {self.source.name} returns to RUNNING (SEND_CANCEL) and the "
                f"incoming VM on {self.target.name} is stopped." if sev else
                f"QEMU cancels the migration: the guest keeps running on {self.source.name} and the "
                f"incoming VM on {self.target.name} is stopped.")
        self.app.push_screen(ConfirmScreen(f"Cancel the migration of {self.vm.name}?", body,
                                           yes="Cancel it (y)", no="Keep going (n)"), answer)

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Cancel migration", "After confirmation (c)", self.action_cancel),
            ("Show firmware panel", "Both state machines and the SEV command log (f)", lambda: self.action_tab("tab-firmware")),
            ("Show event log", "QEMU and engine events (e)", lambda: self.action_tab("tab-events")),
        ]
