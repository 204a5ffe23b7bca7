"""Hosts: one row per inventory host, filled as each probe finishes."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Header, Input, Static

from sevconsole.hosts.report import HostReport
from sevconsole.tui import format as fmt
from sevconsole.tui import safe
from sevconsole.tui.backend import RUNNABLE
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.line_table import LineTable

COLUMNS = (("host", "Host"), ("state", "State"), ("sev", "SEV API"), ("platform", "Platform"),
           ("chain", "Chain"), ("vms", "VMs"), ("latency", "Latency"), ("note", "Note"))


def chain_cell(report: HostReport) -> Content:
    caps = report.capabilities
    if caps is None:
        return Content("-")
    chain = caps.chain_report
    if chain is None:
        return safe.show("[$warning]unchecked[/]")
    if chain.ok:
        root = chain.root
        return safe.show("[$success]ok[/] $generation", generation=root.generation if root else "")
    return safe.show("[$error]$count bad[/]", count=len(chain.failures))


def row_cells(report: HostReport) -> list[Content]:
    """One row; host strings are values of constant templates, never markup."""
    sev = report.sev
    api = "-" if sev is None or sev.api is None else f"{sev.api[0]}.{sev.api[1]}"
    no_sev = sev is None or (not report.lab and not sev.dev_sev and sev.kernel_sev is not True)
    platform = "-" if no_sev or sev is None else fmt.platform_state(sev.platform_state)
    state = safe.show("[$success]up[/]" if report.reachable else "[$error]down[/]")
    key = getattr(report, "host_key", None)
    if key is not None:  # a changed key is refused, never up; an unknown one waits for the operator
        state = safe.show("[$error]refused[/]" if key.status == "changed" else "[$warning]key?[/]")
    if report.lab:
        state += " lab"
    latency = "-" if report.latency_ms is None else f"{report.latency_ms:.0f} ms"
    note = report.errors[0] if report.errors else ""
    return [safe.plain(report.name), state, safe.plain(api), safe.plain(platform), chain_cell(report),
            Content(str(len(report.vms))), Content(latency), safe.plain(note)]


def probing_cells(report: HostReport) -> list[Content]:
    return [safe.plain(report.name), safe.show("[$text-muted]probing…[/]"), *(Content(),) * 6]


class HostsScreen(ConsoleScreen):
    BINDINGS = [
        Binding("enter", "open_host", "Open", id="hosts.open"),
        Binding("r", "reprobe", "Re-probe", id="reprobe"),
        Binding("R", "reprobe_all", "Re-probe all", id="reprobe_all"),
        Binding("slash", "filter", "Filter", id="filter"),
        Binding("m", "migrate", "Migrate", id="hosts.migrate"),
        Binding("E", "app.evacuate", "Evacuate host", id="hosts.evacuate", show=False),
        Binding("escape", "clear_filter", "Clear filter", id="hosts.clear_filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        self.pending: set[str] = set()
        self._built: tuple[tuple[str, int, bool], ...] | None = None  # the rows the table holds

    DEFAULT_CSS = """
    HostsScreen > #hosts { height: auto; max-height: 60%; }
    HostsScreen #hosts-detail-box { height: 1fr; min-height: 4; border: round $panel-lighten-1;
                                    border-title-color: $text-muted; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter hosts (name, VM, note); Enter keeps it, Esc clears", id="filter")
        yield LineTable(COLUMNS, id="hosts")
        with VerticalScroll(id="hosts-detail-box"):  # the highlighted host: no screen of empty lines
            yield Static(id="hosts-detail")
        yield Static(id="hosts-status")
        yield QuickFooter()

    def show_detail(self) -> None:
        """The highlighted host's SEV capabilities and VMs, below the list."""
        if not self.query("#hosts-detail"):
            return  # a screen built on this one without the panel
        from sevconsole.tui.fleet import migratable
        from sevconsole.tui.screens.host import capability_lines

        name = self.selected_host()
        report = self.app.reports.get(name) if name else None  # type: ignore[attr-defined]
        box = self.query_one("#hosts-detail-box")
        box.border_title = name or ""
        if report is None:
            self.query_one("#hosts-detail", Static).update(safe.show(
                "[$text-muted]$what[/]", what=f"{name} is still being probed" if name else "no host"))
            return
        lines = capability_lines(report)
        lines.append(Content())
        if not report.vms:
            lines.append(safe.show("[$text-muted]no VM runs here[/]"))
        for vm in report.vms:
            words, style = migratable(vm)
            lines.append(safe.show(f"[b]$vm[/] $status, $policy, migratable [{style}]$words[/]", vm=vm.name,
                                   status=vm.status or "status unknown", words=words,
                                   policy="plain" if not vm.sev_enabled else fmt.policy(vm.policy)))
        self.query_one("#hosts-detail", Static).update(safe.lines(lines))

    def on_line_table_row_highlighted(self, event: LineTable.RowHighlighted) -> None:
        self.show_detail()

    def on_screen_resume(self) -> None:
        """Opened again (the overview keeps one): probes that ended meanwhile were not fanned out here."""
        if self.is_mounted and self.query("#hosts-detail"):
            self.pending &= set(self.app.backend.host_names()) - set(self.app.reports)  # type: ignore[attr-defined]
            self.rebuild()

    def on_mount(self) -> None:
        self.sub_title = "hosts"
        table = self.query_one("#hosts", LineTable)
        self.pending = set(self.app.backend.host_names())  # type: ignore[attr-defined]
        self.rebuild()
        table.focus()

    # -- data
    def report_updated(self, report: HostReport) -> None:
        self.pending.discard(report.name)
        self.rebuild()

    def refresh_cells(self) -> None:
        self._built = None  # a new theme: every cell again
        self.rebuild()

    def visible_reports(self) -> list[HostReport]:
        names = list(self.app.backend.host_names())  # type: ignore[attr-defined]
        reports = self.app.reports  # type: ignore[attr-defined]
        names += [n for n in reports if n not in names]
        out = []
        for name in names:
            report = reports.get(name) or HostReport(name=name, address="", port=0, reachable=False)
            if self.filter_text and not matches(report, self.filter_text):
                continue
            out.append(report)
        return out

    def same_rows(self, visible: list[HostReport]) -> bool:
        """The table holds these hosts' rows already (reports are immutable: a new one is a new
        object); otherwise they are taken as built from here on."""
        built = tuple((r.name, id(r), r.name in self.pending) for r in visible)
        if built == self._built:
            return True
        self._built = built
        return False

    def rebuild(self) -> None:
        table = self.query_one("#hosts", LineTable)
        visible = self.visible_reports()
        if self.same_rows(visible):  # opened again with nothing new: its rows (and their rendering) stay
            return
        rows = []
        for report in visible:
            probing = report.name in self.pending and report.name not in self.app.reports  # type: ignore[attr-defined]
            cells = probing_cells(report) if probing else row_cells(report)
            rows.append((report.name, [safe.rich(self.app, c) for c in cells]))
        table.set_rows(rows, keep=self.selected_host())  # elsewhere the cursor keeps its place
        total = len(self.app.backend.host_names())  # type: ignore[attr-defined]
        done = total - len(self.pending)
        shown = table.row_count
        filt = f", filter {self.filter_text!r}" if self.filter_text else ""
        self.query_one("#hosts-status", Static).update(safe.show(
            "$done/$total hosts probed, $shown shown$filt. Enter opens a host, m migrates from it.",
            done=done, total=total, shown=shown, filt=filt))
        self.show_detail()

    def selected_host_row(self) -> str | None:
        return self.query_one("#hosts", LineTable).row_key()

    def selected_host(self) -> str | None:
        """The host in view (r re-probes it, m migrates from it): the hosts row here."""
        return self.selected_host_row()

    def host_screen(self, name: str) -> Screen[None]:
        """A host's screen, built once and kept (installed): opening it again costs no new screen;
        it fills itself again when its report changed meanwhile."""
        from sevconsole.tui.screens.host import HostScreen

        key = f"host:{name}"
        if not self.app.is_screen_installed(key):
            self.app.install_screen(HostScreen(name), key)
        return self.app.get_screen(key)

    # -- actions
    def action_open_host(self) -> None:
        name = self.selected_host_row()
        if name is None:
            return
        if name not in self.app.reports:  # type: ignore[attr-defined]
            self.notify(f"{name} is still being probed.", severity="warning")
            return
        self.app.push_screen(self.host_screen(name))

    def on_line_table_row_selected(self, event: LineTable.RowSelected) -> None:
        self.action_open_host()

    def action_reprobe(self) -> None:
        name = self.selected_host()
        if name is not None:
            self.pending.add(name)
            self.app.probe(name)  # type: ignore[attr-defined]
            self.notify(f"Probing {name}…", timeout=2)

    def action_reprobe_all(self) -> None:
        self.pending = set(self.app.backend.host_names())  # type: ignore[attr-defined]
        self.app.probe_all()  # type: ignore[attr-defined]

    def action_migrate(self) -> None:
        name = self.selected_host()
        report = self.app.reports.get(name) if name else None  # type: ignore[attr-defined]
        if report is None or not report.vms:
            self.notify("Pick a probed host that runs a VM.", severity="warning")
            return
        from sevconsole.tui.screens.migrate import MigrateScreen

        vm = next((v for v in report.vms if v.status in RUNNABLE), report.vms[0])
        self.app.push_screen(MigrateScreen(report.name, vm.name, vm))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if not box.display and not box.value and len(self.app.screen_stack) > 2:
            self.app.pop_screen()  # the hosts list opened from the overview: Esc goes back
            return
        box.value = ""
        box.display = False
        self.query_one("#hosts", LineTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.rebuild()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.query_one("#hosts", LineTable).focus()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Open selected host", "Capabilities, certificate chain and VMs", self.action_open_host),
            ("Re-probe selected host", "Run discovery again on this host (r)", self.action_reprobe),
            ("Filter hosts", "Show only hosts matching a text (/)", self.action_filter),
            ("Migrate a VM from the selected host", "Pick a VM and a target (m)", self.action_migrate),
        ]


def matches(report: HostReport, text: str) -> bool:
    text = text.lower()
    hay = [report.name, report.address, report.hostname or "", *report.errors, *report.labels,
           *(vm.name for vm in report.vms)]
    return any(text in h.lower() for h in hay)
