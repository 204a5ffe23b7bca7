"""Plan a migration: pick the target (compatible ones first, others with the reason), read the
preflight checklist, confirm."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Header, Static

from sevconsole.engine.checks import Check, CheckStatus
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt
from sevconsole.tui import safe
from sevconsole.tui.backend import find_vm
from sevconsole.tui.messages import PreflightDone
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.line_table import LineTable

MARKS = {"pass": "[$success]✓[/]", "warn": "[$warning]![/]", "fail": "[$error]✗[/]"}
DOWNTIME_STEPS = (100, 300, 1000, 3000, 10000)


def first_failure(checks: tuple[Check, ...]) -> Check | None:
    return next((c for c in checks if c.status == "fail"), None)


def checklist(checks: tuple[Check, ...]) -> Content:
    return safe.lines(safe.show(f"{MARKS.get(c.status, '?')} [b]$title[/]: $sentence", title=c.title,
                                sentence=c.sentence) for c in checks)


class MigrateScreen(ConsoleScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="migrate.back"),
        Binding("enter", "start", "Migrate", id="migrate.start"),
        Binding("plus", "downtime(1)", "Downtime +", id="downtime_up"),
        Binding("minus", "downtime(-1)", "Downtime -", id="downtime_down"),
    ]

    def __init__(self, source: str, vm: str, vm_info: VmInfo | None = None) -> None:
        super().__init__()
        self.source_name, self.vm_name = source, vm
        self._vm = vm_info
        self.downtime_ms = 300
        self._source: HostReport | None = None
        self.results: dict[str, tuple[Check, ...]] = {}

    @property
    def source(self) -> HostReport:
        """The source as it was when this plan began (a later probe must not change the plan)."""
        if self._source is None:
            self._source = self.app.reports[self.source_name]  # type: ignore[attr-defined]
        return self._source

    @property
    def vm(self) -> VmInfo:
        vm = self._vm or find_vm(self.source, self.vm_name)
        if vm is None:  # cannot happen for a plan started from a report; keep it a sentence anyway
            raise LookupError(f"{self.vm_name} is not on {self.source_name} any more; re-probe it")
        return vm

    def targets(self) -> list[HostReport]:
        from sevconsole.hosts.identity import same_machine

        # another name of the source's own machine is never offered as a target
        return [r for n, r in self.app.reports.items()  # type: ignore[attr-defined]
                if n != self.source_name and same_machine(self.source, r) is None]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="migrate-top"):
            with Vertical(id="migrate-left"):
                yield Static(id="plan")
                yield LineTable((("target", "Target"), ("verdict", "Verdict")), id="targets")
            with VerticalScroll(id="checks-box"):
                yield Static(id="checks")
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = escape_controls(f"migrate {self.vm_name}")
        table = self.query_one("#targets", LineTable)
        self.show_plan()
        self.run_preflight()
        table.focus()

    def show_plan(self) -> None:
        vm = self.vm
        mem = "-" if vm.memory_mib is None else fmt.size(vm.memory_mib * 1024 * 1024)
        self.query_one("#plan", Static).update(safe.show(
            "[b]$vm[/] on $source, $mem, policy $policy\n"
            "downtime limit [b]$downtime ms[/] (+/- to change). Pick a target:",
            vm=vm.name, source=self.source_name, mem=mem, policy=fmt.policy(vm.policy), downtime=self.downtime_ms))

    def run_preflight(self) -> None:
        self.results.clear()
        self.fill_targets()
        for target in self.targets():
            self._preflight(target)

    @work(thread=True, group="preflight", exit_on_error=False)
    def _preflight(self, target: HostReport) -> None:
        try:
            checks = self.app.backend.preflight(self.vm, self.source, target, self.downtime_ms)  # type: ignore[attr-defined]
        except Exception as exc:
            checks = [Check("preflight", "Preflight", CheckStatus.FAIL, f"the checks could not run for {target.name}: {exc}")]
        self.post_message(PreflightDone(target.name, tuple(checks)))

    def on_preflight_done(self, message: PreflightDone) -> None:
        self.results[message.target] = message.checks
        self.fill_targets()

    def ordered(self) -> list[tuple[HostReport, tuple[Check, ...] | None]]:
        rows = [(t, self.results.get(t.name)) for t in self.targets()]
        def rank(row: tuple[HostReport, tuple[Check, ...] | None]) -> tuple[int, str]:
            checks = row[1]
            if checks is None:
                return (1, row[0].name)
            return (2 if first_failure(checks) else 0, row[0].name)
        return sorted(rows, key=rank)

    def refresh_cells(self) -> None:
        self.fill_targets()

    def fill_targets(self) -> None:
        """Every target with its verdict so far. Column widths come from these cells each time (the
        verdicts arrive one by one, in any order, and the longest one is never cut)."""
        table = self.query_one("#targets", LineTable)
        rows = []
        for target, checks in self.ordered():
            bad = first_failure(checks) if checks is not None else None
            if checks is None:
                verdict = safe.cell(self.app, "[$text-muted]checking…[/]")
            elif bad is not None:
                verdict = safe.cell(self.app, "[$error]✗ $title[/]", title=bad.title)
            elif any(c.status == "warn" for c in checks):
                verdict = safe.cell(self.app, "[$warning]! allowed (warnings)[/]")
            else:
                verdict = safe.cell(self.app, "[$success]✓ allowed[/]")
            rows.append((target.name, [safe.cell(self.app, "$name", name=target.name), verdict]))
        table.set_rows(rows, keep=self.selected_target())
        self.show_checks()

    def selected_target(self) -> str | None:
        return self.query_one("#targets", LineTable).row_key()

    def show_checks(self) -> None:
        name = self.selected_target()
        box = self.query_one("#checks", Static)
        if name is None:
            box.update(safe.show("[$warning]No other host is known: nothing to migrate to.[/]"))
            return
        checks = self.results.get(name)
        if checks is None:
            box.update(safe.show("Preflight for $target: checking…", target=name))
            return
        bad = first_failure(checks)
        verdict = (safe.show("[$error]Refused: $why[/]", why=bad.sentence) if bad else
                   safe.show("[$success]All checks allow it.[/] Enter starts (you will confirm)."))
        title = safe.show("[b]Preflight $vm → $target[/]", vm=self.vm_name, target=name)
        box.update(safe.lines([title, verdict, Content(), checklist(checks)]))

    def on_line_table_row_highlighted(self, event: LineTable.RowHighlighted) -> None:
        self.show_checks()

    def on_line_table_row_selected(self, event: LineTable.RowSelected) -> None:
        self.action_start()

    def action_downtime(self, step: int) -> None:
        index = min(range(len(DOWNTIME_STEPS)), key=lambda i: abs(DOWNTIME_STEPS[i] - self.downtime_ms))
        self.downtime_ms = DOWNTIME_STEPS[max(0, min(len(DOWNTIME_STEPS) - 1, index + step))]
        self.show_plan()
        self.run_preflight()

    def action_start(self) -> None:
        name = self.selected_target()
        checks = self.results.get(name or "")
        if name is None or checks is None:
            self.notify("Wait for the preflight checks of a target.", severity="warning")
            return
        bad = first_failure(checks)
        if bad is not None:
            self.notify(f"Refused: {bad.sentence}", severity="error", timeout=8, markup=False)
            return
        from sevconsole.tui.screens.modals import ConfirmScreen

        body = (f"{self.vm_name} moves from {self.source_name} to {name}. On success the source "
                "guest ends SENT (only DECOMMISSION left), so exactly one copy can run. "
                "A cancel or a failure brings the source back to RUNNING.")
        if not self.vm.sev_enabled:  # a plain guest: QEMU's own migration, no firmware words
            body = (f"{self.vm_name} moves from {self.source_name} to {name} (a plain guest: QEMU's own "
                    "live migration). On success the source QEMU stops and is quit, so exactly one copy "
                    "can run. A cancel or a failure leaves the guest running on the source.")

        def go(ok: bool | None) -> None:
            if ok:
                from sevconsole.tui.screens.live import LiveScreen

                self.app.switch_screen(LiveScreen(self.vm, self.source, self.app.reports[name],  # type: ignore[attr-defined]
                                                  checks, self.downtime_ms))

        self.app.push_screen(ConfirmScreen(f"Migrate {self.vm_name} to {name}?", body, yes="Migrate (y)"), go)

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Start migration to selected target", "After confirmation (Enter)", self.action_start),
            ("Raise downtime limit", "Next step up (+)", lambda: self.action_downtime(1)),
            ("Lower downtime limit", "Next step down (-)", lambda: self.action_downtime(-1)),
        ]
