"""The fleet overview, the console's start screen: hosts with their SEV state, every VM across the
fleet (filter with /, sort with s), what needs attention, and the migrations in flight and recent.

It is the hosts list with more beside it (a HostsScreen: Enter on a host opens it, m migrates,
r/R re-probe, E evacuates); Tab moves between the four panels, 1-4 jump to one. Enter does what
the panel's rows are for: a host or VM opens its host, an attention item its safe action, a
migration in flight its live view, a finished one its replay.
"""

from __future__ import annotations

import time
from typing import Any

from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.color import Color
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, Header, Input, Static

from sevconsole.hosts.report import HostReport
from sevconsole.tui import fleet, safe
from sevconsole.tui import format as fmt
from sevconsole.tui.screens.hosts import HostsScreen, row_cells
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.line_table import LineTable

HOST_COLUMNS = (("host", "Host"), ("state", "State"), ("sev", "SEV"), ("chain", "Chain"), ("vms", "VMs"),
                ("note", "Note"))
VM_COLUMNS = (("vm", "VM"), ("host", "Host"), ("status", "Status"), ("mig", "Migratable"), ("mem", "Memory"),
              ("policy", "Policy"))  # the policy last: it is long
ATTENTION_COLUMNS = (("what", "What"), ("problem", "Problem"), ("action", "Safe action"))
MIGRATION_COLUMNS = (("when", "When"), ("vm", "VM"), ("route", "From → To"), ("state", "State"))
PANEL_PARTS = ("#hosts, #ov-hosts-box, #ov-summary, #ov-right, #ov-vms, #ov-vms-box, #ov-vms-empty, #ov-vm-detail, "
               "#ov-attention, #ov-attention-box, #ov-attention-empty, #ov-migrations, #ov-migrations-box, "
               "#ov-migrations-empty")  # what the panels' updates touch
HISTORY_EVERY_S = 2.0  # the migrations panel reads the journal this often while in view
KIND_WORDS = {"host-down": "host down", "host-key-changed": "key changed", "host-key-unknown": "new key",
              "monitor-held": "monitor held", "stale-copy": "stale copy", "guest": "guest"}
STATE_STYLE = {"in flight": "$accent", "done": "$success", "failed": "$error", "refused": "$error",
               "cancelled": "$warning", "rolled-back": "$warning", "needs-operator": "$error"}


def policy_words(policy: int | None) -> str:
    """The policy's flags alone (`NODBG|NOKS|DOMAIN|SEV`); the host screen explains each bit."""
    text = fmt.policy(policy)
    words = text.split(" ", 1)
    return words[1] if len(words) == 2 and words[1] != "none" else text


def theme_color(value: str) -> Color:
    """A theme variable's colour: `#RRGGBB`, a name, or `auto 87%` (white or black, whichever
    contrasts with what is behind, as the stylesheet's `$text`), with an optional opacity."""
    words = value.split()
    alpha = next((float(w[:-1]) / 100 for w in words if w.endswith("%")), 1.0)
    name = next((w for w in words if not w.endswith("%")), "auto")
    return Color.automatic(alpha * 100) if name == "auto" else Color.parse(name).multiply_alpha(alpha)


def migration_key(row: fleet.MigrationRow) -> str:
    return row.id or f"audit\x00{row.started}\x00{row.vm}"


class Note(Widget):
    """A text of fixed height (the stylesheet's) set without a new layout: Static.update lays the
    whole screen out again, which on this screen costs more than everything it draws."""

    DEFAULT_CSS = "Note { height: 1; }"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._content = Content()
        self._key: tuple[str, tuple[Any, ...]] = ("", ())

    def set(self, content: Content) -> None:
        key = (content.plain, tuple(content.spans))  # Content's == looks at the text alone
        if key != self._key:
            self._key, self._content = key, content
            self.refresh()

    def render(self) -> Content:
        return self._content


class HistoryListed(Message):
    """The journal's entries and the audit log's older lines, read in a thread worker."""

    def __init__(self, entries: tuple[Any, ...], audit: tuple[dict[str, Any], ...]) -> None:
        super().__init__()
        self.entries = entries
        self.audit = audit


class OverviewScreen(HostsScreen):
    BINDINGS = [
        Binding("s", "sort", "Sort VMs", id="overview.sort"),
        Binding("A", "app.attention", "Attention", id="overview.attention", show=False),
        Binding("H", "hosts_list", "Hosts list", id="overview.hosts", show=False),
        Binding("1", "panel('hosts')", "Hosts panel", id="overview.panel_hosts", show=False),
        Binding("2", "panel('ov-vms')", "VMs panel", id="overview.panel_vms", show=False),
        Binding("3", "panel('ov-attention')", "Attention panel", id="overview.panel_attention", show=False),
        Binding("4", "panel('ov-migrations')", "Migrations panel", id="overview.panel_migrations", show=False),
    ]
    DEFAULT_CSS = """
    OverviewScreen #ov-summary { height: 1; padding: 0 1; }
    OverviewScreen > #filter { padding: 0 1; }
    OverviewScreen #ov-body { height: 1fr; }
    OverviewScreen #ov-left { height: 1fr; }
    OverviewScreen .ov-box { border: round $panel-lighten-1; border-title-color: $text-muted;
                             border-subtitle-color: $text-muted; }
    OverviewScreen .ov-box > LineTable { height: 1fr; overflow-x: hidden; }
    OverviewScreen .ov-empty { height: auto; padding: 0 1; color: $text-muted; }
    OverviewScreen #ov-hosts-box { max-height: 50%; min-height: 4; }
    OverviewScreen #ov-vms-box { height: 1fr; min-height: 5; }
    OverviewScreen #ov-vm-detail { display: none; height: 10; padding: 0 1; border-top: solid $panel-lighten-1; }
    OverviewScreen.-tall #ov-vm-detail { display: block; }
    OverviewScreen #ov-attention-box, OverviewScreen #ov-migrations-box { width: 1fr; height: 1fr; }
    OverviewScreen.-wide #ov-body { layout: horizontal; }
    OverviewScreen.-wide #ov-left { width: 3fr; }
    OverviewScreen.-wide #ov-right { width: 2fr; height: 1fr; layout: vertical; }
    OverviewScreen.-wide #ov-attention-box { max-height: 50%; min-height: 3; }
    """
    # Heights follow the rows (apply_heights): a panel of three hosts is five lines, not half the
    # screen; the VM list takes the rest. Narrow: attention and migrations share a row under the
    # lists; wide: they are a column beside them, migrations filling it.

    def __init__(self) -> None:
        super().__init__()
        self.sort_key = "host"
        self.vm_rows: list[fleet.VmRow] = []
        self.migration_rows: list[fleet.MigrationRow] = []
        self.entries: tuple[Any, ...] = ()
        self.audit: tuple[dict[str, Any], ...] = ()
        self.history_loaded = False
        self._vms_pending = False
        self._heights: dict[str, int | None] = {}
        self._filled = False  # on_mount has built the panels
        self._all_vm_rows: list[fleet.VmRow] = []
        self._vm_cells: dict[str, list[Any]] = {}
        self._panel_marks: dict[str, tuple[bool, str, str, str]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="/ filters hosts and VMs (name, host, state, policy, migratable)", id="filter",
                    compact=True)
        yield Note(id="ov-summary")
        with Vertical(id="ov-body"):
            with Vertical(id="ov-left"):
                with Vertical(id="ov-hosts-box", classes="ov-box"):
                    yield LineTable(HOST_COLUMNS, id="hosts")
                with Vertical(id="ov-vms-box", classes="ov-box"):
                    yield LineTable(VM_COLUMNS, id="ov-vms")
                    yield Static(id="ov-vms-empty", classes="ov-empty")
                    yield Note(id="ov-vm-detail")
            with Horizontal(id="ov-right"):
                with Vertical(id="ov-attention-box", classes="ov-box"):
                    yield LineTable(ATTENTION_COLUMNS, id="ov-attention")
                    yield Static(id="ov-attention-empty", classes="ov-empty")
                with Vertical(id="ov-migrations-box", classes="ov-box"):
                    yield LineTable(MIGRATION_COLUMNS, id="ov-migrations")
                    yield Static(id="ov-migrations-empty", classes="ov-empty")
        yield Static(id="hosts-status")
        yield QuickFooter()

    def on_mount(self, event: events.Mount) -> None:  # type: ignore[override]
        event.prevent_default()  # not HostsScreen's on_mount: this screen builds its own panels
        self.query_one("#hosts-status").display = False  # the summary line says it at the top
        for box, title in (("#ov-hosts-box", "1 Hosts"), ("#ov-vms-box", "2 VMs"),
                           ("#ov-attention-box", "3 Attention"), ("#ov-migrations-box", "4 Migrations")):
            self.query_one(box).border_title = title
        hosts = self.query_one("#hosts", LineTable)
        self.pending = set(self.app.backend.host_names())  # type: ignore[attr-defined]
        self.rebuild()
        hosts.focus()
        self.mark_focused_panel()
        self.sub_title = "fleet overview"
        self.fill_vms()
        self.fill_attention()
        self.fill_migrations()
        self._filled = True
        self.load_history()
        self.set_interval(HISTORY_EVERY_S, self._tick_history)

    # -- data in (the app fans these out to every screen in the stack: this one may not be built yet,
    # a host-key question pushed over it at start; on_mount fills every panel anyway)
    @property
    def ready(self) -> bool:
        """Built, and not being taken down: an answer may arrive as the app exits, when any of the
        panels may be gone already (whichever the teardown removed first)."""
        return self._filled and self._whole()

    def _whole(self) -> bool:
        return self.is_mounted and len(self.query(PANEL_PARTS)) == PANEL_PARTS.count(",") + 1

    def report_updated(self, report: HostReport) -> None:
        self.pending.discard(report.name)
        if self.ready:
            self.rebuild()
            self._vms_later()

    def refresh_cells(self) -> None:
        if not self.ready:
            return
        super().refresh_cells()  # every host cell again (a new theme)
        self.mark_focused_panel()
        self.fill_vms()
        self.fill_attention()
        self.fill_migrations()

    def rebuild(self) -> None:
        """The hosts panel: name, state, SEV in a few words, chain, VMs, note (the hosts list's
        cells, fewer of them: the panel shares the width)."""
        table = self.query_one("#hosts", LineTable)
        visible = self.visible_reports()
        if self.same_rows(visible):  # a keystroke that keeps the same hosts
            self.fill_summary()
            return
        selected = self.selected_host_row() if table.cursor_row > 0 else None  # at the top, the top stays
        rows = []
        for report in visible:
            probing = report.name in self.pending and report.name not in self.app.reports  # type: ignore[attr-defined]
            if probing:
                cells = [safe.plain(report.name), safe.show("[$text-muted]probing…[/]"), *(Content(),) * 4]
            else:
                full = row_cells(report)
                sev, style = fleet.sev_words(report)
                cells = [full[0], full[1], safe.plain(sev, style), full[4], full[5], full[7]]
            rows.append((report.name, [safe.rich(self.app, c) for c in cells]))
        table.set_rows(rows, keep=selected)
        if self.is_mounted:
            self.fill_summary()
            self.apply_heights()

    def attention_updated(self) -> None:
        if self.ready:
            self.fill_attention()
            self.fill_summary()

    def _vms_later(self) -> None:
        """Many probes finish together on a large fleet: one VM table rebuild for all of them."""
        if not self._vms_pending:
            self._vms_pending = True
            self.call_after_refresh(self._vms_now)

    def _vms_now(self) -> None:
        self._vms_pending = False
        if not self.ready:
            return
        self.fill_vms()
        self.fill_summary()

    def _tick_history(self) -> None:
        if self.is_current:
            self.load_history()

    @work(thread=True, exclusive=True, group="overview-history", exit_on_error=False)
    def load_history(self) -> None:
        backend = self.app.backend  # type: ignore[attr-defined]
        lister = getattr(backend, "migrations", None)
        tail = getattr(backend, "audit_tail", None)
        try:
            entries = tuple(lister()) if lister is not None else ()
        except Exception:  # a journal problem is shown by M and recover; the overview keeps going
            entries = ()
        try:
            audit = tuple(tail(50)) if tail is not None else ()
        except Exception:
            audit = ()
        self.post_message(HistoryListed(entries, audit))

    def on_history_listed(self, message: HistoryListed) -> None:
        if not self.ready:
            return
        rows = fleet.migration_rows(message.entries, message.audit)
        if self.history_loaded and rows == self.migration_rows:
            self.entries = message.entries  # the same rows: no redraw every two seconds
            return
        self.history_loaded = True
        self.entries, self.audit = message.entries, message.audit
        self.migration_rows = rows
        self.fill_migrations()
        self.fill_summary()

    # -- drawing
    def fill_summary(self) -> None:
        reports = self.app.reports  # type: ignore[attr-defined]
        names = list(self.app.backend.host_names())  # type: ignore[attr-defined]
        up = sum(1 for r in reports.values() if r.reachable)
        vms = [v for r in reports.values() for v in r.vms]
        sev = sum(1 for v in vms if v.sev_enabled)
        attention = len(getattr(self.app, "attention", ()))
        flying = sum(1 for r in self.migration_rows if r.in_flight)
        probed = sum(1 for n in names if n in reports)
        parts = [f"{probed}/{len(names)} hosts probed, {up} up", f"{len(vms)} VMs, {sev} SEV"]
        summary = Content(" · ").join([safe.plain(p) for p in parts] + [
            safe.show("[$warning]$n need attention[/]" if attention else "[$success]attention: none[/]",
                      n=attention),
            safe.show("[$accent]$n migrating[/]" if flying else "$n migrating", n=flying)])
        if self.filter_text:
            summary += safe.show(" · filter $text", text=repr(self.filter_text))
        self._update("#ov-summary", summary)

    def vm_cells(self, row: fleet.VmRow) -> list[Any]:
        """A VM row's cells, made once per report (a sort or a filter only moves them: the table
        measures every cell it is given, which costs more than the drawing)."""
        cells = self._vm_cells.get(row.key)
        if cells is None:
            vm = row.vm
            words, style = fleet.migratable(vm)
            mem = "-" if vm.memory_mib is None else fmt.size(vm.memory_mib * 1024 * 1024)
            policy = "plain" if not vm.sev_enabled else policy_words(vm.policy)
            parts = (safe.plain(vm.name), safe.plain(row.host), safe.plain(vm.status or "?"), safe.plain(words, style),
                     Content(mem), safe.plain(policy, "" if vm.sev_enabled else "$text-muted"))
            cells = [safe.rich(self.app, c) for c in parts]
            self._vm_cells[row.key] = cells
        return cells

    def fill_vms(self, rebuild: bool = True) -> None:
        """`rebuild`: the reports (or the theme) changed; otherwise only the filter or the order did,
        and the rows' cells are reused."""
        table = self.query_one("#ov-vms", LineTable)
        reports = self.app.reports  # type: ignore[attr-defined]
        order = list(self.app.backend.host_names())  # type: ignore[attr-defined]
        if rebuild or not self._all_vm_rows:
            self._all_vm_rows = fleet.vm_rows(reports, order)
            self._vm_cells = {}
        rows = [r for r in self._all_vm_rows if fleet.matches(r, self.filter_text)]
        # the row under the cursor stays under it; at the top, the top stays (rows arrive as probes end)
        keep = self.selected_vm_row() if table.cursor_row > 0 else None
        self.vm_rows = fleet.sort_rows(rows, self.sort_key, order)
        table.set_rows([(r.key, self.vm_cells(r)) for r in self.vm_rows], keep=keep.key if keep else None)
        self.show_vm_detail()
        total = len(self._all_vm_rows)
        subtitle = (f"{len(self.vm_rows)} of {total}" if self.filter_text else f"{total}") + f" · by {self.sort_key} (s)"
        box = self.query_one("#ov-vms-box")
        if box.border_subtitle != subtitle:
            box.border_subtitle = subtitle
        empty = self.query_one("#ov-vms-empty", Static)
        empty.display = not self.vm_rows
        table.display = bool(self.vm_rows)
        if not self.vm_rows:
            empty.update(safe.show("No VM matches $text; Esc clears the filter.", text=repr(self.filter_text))
                         if self.filter_text and total else
                         Content("No VM on the probed hosts yet." if len(reports) < len(order) else
                                 "No VM runs on any host."))

    def fill_attention(self) -> None:
        table = self.query_one("#ov-attention", LineTable)
        items = list(getattr(self.app, "attention", ()))
        rows = []
        for index, item in enumerate(items):
            what = item.vm or item.host or "?"
            kind = KIND_WORDS.get(getattr(item, "kind", "guest"), "")
            action = item.action.sentence if item.action is not None else "none: check by hand"
            rows.append((str(index), (
                safe.cell(self.app, "[b]$what[/]", what=what) if kind == "guest" else
                safe.cell(self.app, "[b]$what[/] [$warning]($kind)[/]", what=what, kind=kind),
                safe.rich(self.app, safe.plain(item.problem)), safe.rich(self.app, safe.plain(action)))))
        table.set_rows(rows)
        box = self.query_one("#ov-attention-box")
        box.border_subtitle = f"{len(items)} · A for all" if items else ""
        empty = self.query_one("#ov-attention-empty", Static)
        empty.display = not items
        table.display = bool(items)
        if not items:
            names = list(self.app.backend.host_names())  # type: ignore[attr-defined]
            done = set(names) <= set(self.app.reports)  # type: ignore[attr-defined]
            empty.update(safe.show("[$success]✓ Nothing needs attention.[/]" if done else
                                   "[$text-muted]Checked once every host has answered.[/]"))
        self.apply_heights()

    def fill_migrations(self) -> None:
        table = self.query_one("#ov-migrations", LineTable)
        keep = self.selected_migration()
        now = time.time()
        rows = []
        for row in self.migration_rows:
            style = STATE_STYLE.get(row.state, "$error" if row.unfinished else "")
            rows.append((migration_key(row), (
                safe.rich(self.app, Content(fleet.when(row.started, now))), safe.rich(self.app, safe.plain(row.vm)),
                safe.rich(self.app, safe.show("$source → $target", source=row.source, target=row.target)),
                safe.rich(self.app, safe.plain(row.state, style)))))
        table.set_rows(rows, keep=migration_key(keep) if keep is not None else None)
        flying = sum(1 for r in self.migration_rows if r.in_flight)
        box = self.query_one("#ov-migrations-box")
        box.border_subtitle = (f"{flying} in flight · " if flying else "") + "Enter: watch or replay"
        empty = self.query_one("#ov-migrations-empty", Static)
        empty.display = not self.migration_rows
        table.display = bool(self.migration_rows)
        if not self.migration_rows:
            empty.update(Content("Reading the journal…" if not self.history_loaded else
                                 "No migration yet: m on a host or VM starts one."))
        self.apply_heights()

    def apply_heights(self) -> None:
        if not self._whole():  # on_mount calls it before `ready`; a teardown may have begun
            return
        wide, tall = self.has_class("-wide"), self.has_class("-tall")

        def needed(table_id: str, empty_id: str) -> int:
            table = self.query_one(f"#{table_id}", LineTable)
            if table.display:
                return table.row_count + 3  # the header and the border
            box_width = max(10, self.query_one(f"#{empty_id}").parent.size.width - 4)  # type: ignore[union-attr]
            text = str(self.query_one(f"#{empty_id}", Static).render())
            return 2 + max(1, -(-len(text) // box_width))

        hosts = self.query_one("#hosts", LineTable)
        attention = needed("ov-attention", "ov-attention-empty")
        migrations = needed("ov-migrations", "ov-migrations-empty")
        heights = {"#ov-hosts-box": max(1, hosts.row_count) + 3,
                   "#ov-right": None if wide else min(max(attention, migrations), 14 if tall else 7),
                   "#ov-attention-box": attention if wide else None}  # None: the stylesheet's
        for selector, height in heights.items():
            if self._heights.get(selector, -1) != height:  # a new height is a new layout: only when it changes
                self._heights[selector] = height
                self.query_one(selector).styles.height = height

    # -- the panel with the focus: its border in the accent colour, its title bright. Set inline, not
    # by a :focus-within rule: restyling a box restyles its table's scrollbar, which lays the
    # whole screen out again (tens of ms a focus change on a fleet).
    def mark_focused_panel(self) -> None:
        if not self.is_mounted:
            return
        variables = self.app.theme_variables
        focused = self.focused
        for box in self.query(".ov-box"):
            active = focused is not None and box in focused.ancestors
            mark = (active, variables["accent"], variables["panel-lighten-1"], variables["text"])
            if self._panel_marks.get(box.id or "") == mark:
                continue
            self._panel_marks[box.id or ""] = mark
            box.styles.border = ("round", theme_color(mark[1] if active else mark[2]))
            box.styles.border_title_color = theme_color(mark[3]) if active else None  # None: the stylesheet's

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        self.mark_focused_panel()

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        self.call_after_refresh(self.mark_focused_panel)  # the focus may be on its way to another panel

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self.apply_heights)  # the breakpoint classes change with the size

    def _update(self, selector: str, content: Content) -> None:
        self.query_one(selector, Note).set(content)

    def show_vm_detail(self) -> None:
        """The highlighted VM: its flags in one line and what the ones that matter to a migration
        do (tall screens: the room is there; the host screen explains every bit)."""
        row = self.selected_vm_row()
        if row is None:
            self._update("#ov-vm-detail", Content())
            return
        vm = row.vm
        words, style = fleet.migratable(vm)
        lines = [safe.show(f"[b]$vm[/] on $host: $status, migratable [{style}]$words[/]", vm=vm.name,
                           host=row.host, status=vm.status or "status unknown", words=words)]
        if vm.stale:
            lines.append(safe.plain(vm.stale, "$text-muted"))
        if vm.policy is None:
            lines.append(safe.plain("not an SEV guest: its memory travels as QEMU sends it (plain migration)"))
        else:
            from sevconsole.sev.policy import GuestPolicy

            try:
                infos = GuestPolicy.from_u32(vm.policy).explain()
            except ValueError as exc:
                infos = []
                lines.append(safe.show("[$warning]cannot explain the policy: $why[/]", why=exc))
            flags = " ".join(("■ " if i.set else "□ ") + i.name for i in infos[:6])
            lines.append(safe.show("policy $hex: $flags", hex=f"0x{vm.policy:08X}", flags=flags))
            lines += [safe.show("[$text-muted]$name:[/] $why", name=i.name, why=i.migration)
                      for i in infos if i.set and i.name in ("ES", "NOSEND", "DOMAIN", "SEV")]
        if vm.migration_blocker:
            lines.append(safe.show("[$error]QEMU: $blocker[/]", blocker=vm.migration_blocker))
        lines += [safe.plain(e, "$error") for e in vm.errors[:2]]
        self._update("#ov-vm-detail", safe.lines(lines))

    def on_line_table_row_highlighted(self, event: LineTable.RowHighlighted) -> None:
        event.prevent_default()  # HostsScreen's detail panel is not on this screen
        if event.table.id == "ov-vms":
            self.show_vm_detail()

    def on_line_table_row_selected(self, event: LineTable.RowSelected) -> None:
        event.stop()
        event.prevent_default()  # not HostsScreen's too: the panel decides what Enter opens
        self.call_next(self.action_open)

    # -- selection
    def selected_vm_row(self) -> fleet.VmRow | None:
        table = self.query_one("#ov-vms", LineTable)
        if not table.row_count or not self.vm_rows:
            return None
        row = table.cursor_row
        return self.vm_rows[row] if 0 <= row < len(self.vm_rows) else None

    def selected_migration(self) -> fleet.MigrationRow | None:
        table = self.query_one("#ov-migrations", LineTable)
        if not table.row_count or not self.migration_rows:
            return None
        row = table.cursor_row
        return self.migration_rows[row] if 0 <= row < len(self.migration_rows) else None

    def focused_panel(self) -> str:
        focused = self.focused
        return focused.id if isinstance(focused, LineTable) and focused.id else "hosts"

    def selected_host(self) -> str | None:
        """The host in view: the hosts row, or the VM row's host (E evacuates it)."""
        if self.focused_panel() == "ov-vms":
            row = self.selected_vm_row()
            return row.host if row is not None else None
        return self.selected_host_row()

    # -- keys
    async def action_open(self) -> None:
        panel = self.focused_panel()
        if panel == "ov-vms":
            row = self.selected_vm_row()
            if row is None:
                return
            screen = self.host_screen(row.host)
            await self.app.push_screen(screen)
            vms = screen.query_one("#vms", DataTable)
            if row.index < vms.row_count:
                vms.move_cursor(row=row.index, animate=False)
        elif panel == "ov-attention":
            from sevconsole.tui.screens.attention import AttentionScreen

            self.app.push_screen(AttentionScreen(select=self.query_one("#ov-attention", LineTable).cursor_row))
        elif panel == "ov-migrations":
            self.open_migration(self.selected_migration())
        else:
            self.action_open_host()

    def open_migration(self, row: fleet.MigrationRow | None) -> None:
        if row is None:
            return
        if row.in_flight and row.id is not None:
            from sevconsole.tui.screens.migrations import attach_screen

            entry = next((e for e in self.entries if e.id == row.id), None)
            if entry is not None:
                self.app.push_screen(attach_screen(self.app, entry))
                return
        if row.replayable and row.id is not None:
            from sevconsole.tui.screens.replay import ReplayScreen

            self.app.push_screen(ReplayScreen(row.id, title=f"{row.vm} {row.source} → {row.target}"))
            return
        what = row.message or ("its runner is gone: recover finishes it" if row.unfinished else
                               "recorded in the audit log only (its journal folder is gone): nothing to replay")
        self.notify(f"{row.vm} ({row.source} → {row.target}), {row.state}: {what}")

    def action_migrate(self) -> None:
        if self.focused_panel() != "ov-vms":
            super().action_migrate()
            return
        row = self.selected_vm_row()
        if row is None:
            self.notify("No VM selected.", severity="warning")
            return
        from sevconsole.tui.screens.migrate import MigrateScreen

        self.app.push_screen(MigrateScreen(row.host, row.vm.name, row.vm))

    def action_sort(self) -> None:
        order = fleet.SORTS
        self.sort_key = order[(order.index(self.sort_key) + 1) % len(order)]
        self.fill_vms(rebuild=False)

    def on_line_table_header_selected(self, event: LineTable.HeaderSelected) -> None:
        """A click on a VM column header sorts by it, where that column is a sort key."""
        key = {"host": "host", "status": "state", "policy": "policy", "mem": "memory"}.get(event.column_key)
        if key is not None:
            self.sort_key = key
            self.fill_vms(rebuild=False)

    def action_panel(self, panel: str) -> None:
        table = self.query_one(f"#{panel}")
        if table.display:
            table.focus()
        else:
            self.notify("That panel is empty.", timeout=2)

    def action_hosts_list(self) -> None:
        """The hosts list, kept once built (installed): opening it again costs no new screen."""
        if not self.app.is_screen_installed("hosts-list"):
            self.app.install_screen(HostsScreen(), "hosts-list")
        self.app.push_screen("hosts-list")

    def on_input_changed(self, event: Input.Changed) -> None:
        event.prevent_default()
        super().on_input_changed(event)
        self.fill_vms(rebuild=False)
        self.fill_summary()

    # the filter bar stays in place (showing and hiding it laid the whole screen out again)
    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        self.query_one("#hosts", LineTable).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.prevent_default()
        self.query_one("#hosts", LineTable).focus()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [*super().palette_commands(),
                ("Sort VMs", "By host, state, policy, memory in turn (s)", self.action_sort),
                ("Hosts list", "The hosts alone, with the selected host's details (H)", self.action_hosts_list)]
