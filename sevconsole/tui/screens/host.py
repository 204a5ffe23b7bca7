"""One host: SEV capabilities, the certificate chain as a tree, and its VMs with their policies."""

from __future__ import annotations

import base64

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import DataTable, Header, Static, Tree

from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt
from sevconsole.tui import safe
from sevconsole.tui.fleet import migratable
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.chain_tree import fill_chain_tree
from sevconsole.tui.widgets.footer import QuickFooter


def capability_lines(report: HostReport) -> list[Content]:
    lines = [safe.show("[b]$name[/] $address:$port" + (" [$accent]lab[/]" if report.lab else ""),
                       name=report.name, address=report.address, port=report.port)]
    if report.hostname or report.kernel:
        lines.append(safe.show("$hostname  kernel $kernel", hostname=report.hostname or "?",
                               kernel=report.kernel or "?"))
    if report.cpu:
        lines.append(safe.plain(report.cpu))
    sev = report.sev
    if sev is None:
        lines.append(safe.show("[$error]no SEV information[/]"))
    elif not report.lab and not sev.dev_sev and sev.kernel_sev is not True:
        # no SEV here at all: say so once instead of a row of question marks
        lines.append(safe.show("no SEV on this host (kvm_amd sev $sev, no /dev/sev): plain guests only",
                               sev="not loaded" if sev.kernel_sev is None else "off"))
    else:
        api = "-" if sev.api is None else f"{sev.api[0]}.{sev.api[1]} build {sev.build}"
        owner = {None: "?", False: "self-owned", True: "externally owned"}[sev.owner_external]
        guests = sev.guest_count if sev.guest_count is not None else "?"
        lines.append(safe.plain(f"kvm_amd sev={_yn(sev.kernel_sev)} sev_es={_yn(sev.kernel_sev_es)} "
                                f"/dev/sev={_yn(sev.dev_sev)}"))
        lines.append(safe.show("firmware API $api, platform $platform, $owner", api=api,
                               platform=fmt.platform_state(sev.platform_state), owner=owner))
        lines.append(safe.show("ES configured $es, guests $guests", es=_yn(sev.es_configured), guests=guests))
    caps = report.capabilities
    if caps is not None:
        lines.append(safe.show("cbitpos $cbitpos, reduced-phys-bits $bits", cbitpos=caps.cbitpos,
                               bits=caps.reduced_phys_bits))
    lines += [safe.plain(error, "$error") for error in report.errors]
    return lines


def _yn(value: bool | None) -> str:
    return {None: "?", True: "yes", False: "no"}[value]


def policy_lines(vm: VmInfo) -> list[Content]:
    if vm.policy is None:
        return [safe.show("[b]$vm[/]: not an SEV guest (no policy)", vm=vm.name)]
    lines = [safe.show("[b]$vm[/] policy $policy", vm=vm.name, policy=fmt.policy(vm.policy))]
    try:
        from sevconsole.sev.policy import GuestPolicy

        infos = GuestPolicy.from_u32(vm.policy).explain()
    except (ImportError, ValueError) as exc:
        return [*lines, safe.show("[$warning]cannot explain the policy: $why[/]", why=exc)]
    for info in infos:
        mark = "[$success]■[/]" if info.set else "[$text-muted]□[/]"
        lines.append(safe.show(f"{mark} $name $migration", name=f"{info.name!s:<8}", migration=info.migration))
    if vm.migration_blocker:
        lines.append(safe.show("[$error]QEMU: $blocker[/]", blocker=vm.migration_blocker))
    return lines


class HostScreen(ConsoleScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="host.back"),
        Binding("m", "migrate", "Migrate VM", id="host.migrate"),
        Binding("E", "app.evacuate", "Evacuate host", id="host.evacuate", show=False),
        Binding("r", "reprobe", "Re-probe", id="host.reprobe"),
        Binding("c", "copy_pdh", "Copy PDH", id="copy_pdh"),
        Binding("C", "copy_chain", "Copy chain", id="copy_chain"),
        Binding("tab", "app.focus_next", "Next pane", show=False),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.host_name = name
        self._shown: HostReport | None = None  # the report the screen was last filled from

    @property
    def report(self) -> HostReport:
        return self.app.reports[self.host_name]  # type: ignore[attr-defined,no-any-return]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="host-top"):
            yield Static(id="caps")
            yield Tree("chain", id="chain")
        with Vertical(id="host-vms"):
            yield DataTable(id="vms", cursor_type="row", zebra_stripes=True)
            yield Static(id="policy")
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = escape_controls(self.host_name)
        table = self.query_one("#vms", DataTable)
        for key, label in (("vm", "VM"), ("status", "Status"), ("mem", "Memory"), ("policy", "Policy"),
                           ("state", "Guest state"), ("mig", "Migratable")):
            table.add_column(label, key=key)
        self.fill()
        table.focus()

    def report_updated(self, report: HostReport) -> None:
        if report.name == self.host_name:
            self.fill()

    def refresh_cells(self) -> None:
        self.fill()

    def on_screen_resume(self) -> None:
        """Shown again (the overview keeps a host's screen once built): a probe that ended while it
        was not in view was not fanned out here."""
        if self.is_mounted and self.query("#vms") and self.app.reports.get(self.host_name) is not self._shown:  # type: ignore[attr-defined]
            self.fill()

    def fill(self) -> None:
        report = self._shown = self.report
        self.query_one("#caps", Static).update(safe.lines(capability_lines(report)))
        tree = self.query_one("#chain", Tree)
        fill_chain_tree(tree, report.capabilities)
        table = self.query_one("#vms", DataTable)
        table.clear()
        for index, vm in enumerate(report.vms):
            state = vm.firmware_guest_state
            sev_state = fmt.guest_state(state) if state is not None else (vm.sev_state or "-")
            words, style = migratable(vm)  # the policy and QEMU's blocker count, not only QEMU's support
            mem = "-" if vm.memory_mib is None else fmt.size(vm.memory_mib * 1024 * 1024)
            cells = (safe.plain(vm.name), safe.plain(vm.status or "?"), Content(mem),
                     safe.plain(fmt.policy(vm.policy)), safe.plain(sev_state), safe.plain(words, style))
            table.add_row(*(safe.rich(self.app, c) for c in cells), key=str(index))  # names can repeat
        self.show_policy()

    def selected_vm(self) -> VmInfo | None:
        table = self.query_one("#vms", DataTable)
        if not table.row_count:
            return None
        index = int(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))
        vms = self.report.vms
        return vms[index] if index < len(vms) else None

    def show_policy(self) -> None:
        vm = self.selected_vm()
        text = safe.lines(policy_lines(vm)) if vm else safe.show("[$text-muted]no VM on this host[/]")
        self.query_one("#policy", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_policy()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_migrate()

    def action_migrate(self) -> None:
        vm = self.selected_vm()
        if vm is None:
            self.notify(f"{self.host_name} runs no VM to migrate.", severity="warning")
            return
        from sevconsole.tui.screens.migrate import MigrateScreen

        self.app.push_screen(MigrateScreen(self.host_name, vm.name, vm))

    def action_reprobe(self) -> None:
        self.app.probe(self.host_name)  # type: ignore[attr-defined]
        self.notify(f"Probing {self.host_name}…", timeout=2)

    def _copy(self, what: str, data: bytes | None) -> None:
        if not data:
            self.notify(f"{self.host_name} reported no {what}.", severity="warning")
            return
        self.app.copy_to_clipboard(base64.b64encode(data).decode("ascii"))
        self.notify(f"{what} of {self.host_name} copied as base64 ({len(data)} bytes).")

    def action_copy_pdh(self) -> None:
        caps = self.report.capabilities
        self._copy("PDH certificate", caps.pdh if caps else None)

    def action_copy_chain(self) -> None:
        caps = self.report.capabilities
        self._copy("platform chain (PEK||OCA||CEK)", caps.cert_chain if caps else None)

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Copy PDH (base64)", "Copy this host's PDH certificate to the clipboard (c)", self.action_copy_pdh),
            ("Copy platform chain (base64)", "PEK||OCA||CEK to the clipboard (C)", self.action_copy_chain),
            ("Migrate selected VM", "Pick a target and run the preflight checks (m)", self.action_migrate),
            ("Re-probe this host", "Run discovery again (r)", self.action_reprobe),
        ]
