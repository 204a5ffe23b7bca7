"""Evacuate a host from the console: the plan (targets, reasons, blockers), a confirmation, then
the fleet view (one row per guest, the totals) while engine/evacuate.py runs the migrations,
each in its runner. `E` on the hosts or host screen, or the palette, opens it for that host.

The evacuation is driven from this screen's worker: leaving the console mid-way leaves the
running migrations to their runners, and `sevconsole evacuate HOST` continues the rest.
Every host string is shown through `safe`, never as markup.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Header, Static

from sevconsole.tui import safe
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter

STATUS_STYLE = {"moved": "$success", "failed": "$error", "needs-operator": "$error", "blocked": "$warning",
                "skipped": "$text-muted", "waiting": "$text-muted", "starting": "$accent", "migrating": "$accent"}


def selected_host(screen: Any) -> str | None:
    """The host the operator is on: the host screen's, or the hosts list's selected row."""
    name = getattr(screen, "host_name", None)
    if isinstance(name, str):
        return name
    pick = getattr(screen, "selected_host", None)
    return pick() if callable(pick) else None


def start_evacuation(app: Any) -> None:
    """The app's `evacuate` action: open the evacuation of the host in view."""
    host = selected_host(app.screen)
    if host is None:
        app.notify("Select a host in the hosts list (or open one), then press E.", severity="warning")
        return
    fleet = getattr(app.backend, "fleet", None)
    if fleet is None:
        app.notify("This console was opened without a fleet its runners could reach; use "
                   "`sevconsole evacuate HOST` with --inventory or --lab.", severity="error")
        return
    app.push_screen(EvacuateScreen(host, fleet))


class EvacuateScreen(ConsoleScreen):
    BINDINGS = [
        Binding("enter,y", "start", "Start", id="evacuate.start"),
        Binding("c", "cancel", "Cancel evacuation", id="evacuate.cancel"),
        Binding("escape", "back", "Back", id="evacuate.back"),
    ]
    DEFAULT_CSS = """
    EvacuateScreen #evac-plan { height: 1fr; min-height: 6; border: round $primary; padding: 0 1; }
    EvacuateScreen #evac-fleet { height: 2fr; }
    EvacuateScreen #evac-summary { height: auto; padding: 0 1; }
    """

    def __init__(self, host: str, fleet: Any, *, skip_blocked: bool = True, parallel: int = 4) -> None:
        super().__init__()
        self.host_name_evacuated = host
        self.fleet = fleet
        self.skip_blocked = skip_blocked
        self.parallel = parallel
        self.state = "planning"  # planning | refused | ready | running | done | failed
        self.prepared: Any = None
        self.evacuation: Any = None
        self.view: Any = None
        self.log_lines: list[Any] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="evac-plan"):
            yield Static(id="evac-plan-text")
        yield DataTable(id="evac-fleet", cursor_type="row", zebra_stripes=True)
        yield Static(id="evac-summary")
        yield QuickFooter()

    def on_mount(self) -> None:
        from sevconsole.engine.evac_view import HEADER

        self.sub_title = f"evacuate {self.host_name_evacuated}"
        self.query_one(DataTable).add_columns(*(h.title() for h in HEADER))
        self.say(safe.show("[b]Evacuating $host[/]: cordoning it, probing the fleet, measuring dirty rates…",
                           host=self.host_name_evacuated))
        self.plan()

    # -- text
    def say(self, line: Any) -> None:
        self.log_lines.append(line if not isinstance(line, str) else safe.plain(line))
        self.query_one("#evac-plan-text", Static).update(safe.lines(self.log_lines))

    def status(self, template: str, **values: object) -> None:
        self.query_one("#evac-summary", Static).update(safe.show(template, **values))

    # -- plan
    @work(exclusive=True, group="evacuate", exit_on_error=False)
    async def plan(self) -> None:
        from sevconsole.engine.evac_view import plan_lines
        from sevconsole.engine.evacuate import EvacError, EvacOptions, prepare
        from sevconsole.hosts.chains import trust_with_lab_root

        options = EvacOptions(host=self.host_name_evacuated, skip_blocked=self.skip_blocked, parallel=self.parallel)
        try:
            self.prepared = await prepare(self.fleet, options, trust=trust_with_lab_root(self.fleet.lab_root),
                                          say=self.say)
        except EvacError as exc:
            self.state = "failed"
            self.say(safe.plain(str(exc), "$error"))
            self.status("[$error]Nothing was started.[/] Esc goes back.")
            return
        except Exception as exc:  # a problem of the fleet must not kill the console
            self.state = "failed"
            self.say(safe.plain(f"the evacuation could not be planned: {exc}", "$error"))
            self.status("[$error]Nothing was started.[/] Esc goes back.")
            return
        for line in plan_lines(self.prepared.plan):
            self.say(line)
        for vm, (mid, target, _guest) in self.prepared.adopted.items():
            self.say(f"  {vm} -> {target}: already migrating (migration {mid}); followed, not started again")
        refusal = self.prepared.refusal
        if refusal is not None:
            self.state = "refused"
            self.say(safe.plain(f"refused: {refusal}.", "$error"))
            self.status("[$error]Refused at plan.[/] Esc goes back (the cordon this made is lifted).")
        elif not self.prepared.plan.moves and not self.prepared.adopted:
            self.state = "refused"
            self.status("Nothing to move: $host runs no guest that can move. Esc goes back.",
                        host=self.host_name_evacuated)
        else:
            self.state = "ready"
            self.status("[b]Enter[/] starts the evacuation ($count migrations); Esc goes back without "
                        "starting.", count=len(self.prepared.plan.moves))

    # -- run
    def action_start(self) -> None:
        if self.state != "ready":
            return
        from sevconsole.tui.screens.modals import ConfirmScreen

        plan = self.prepared.plan
        stay = ", ".join(b.vm for b in plan.blockers)
        body = (f"{len(plan.moves)} migration(s) off {self.host_name_evacuated}, which stays cordoned."
                + (f" These cannot move and stay on it: {stay}." if stay else ""))

        def answered(yes: bool | None) -> None:
            if yes and self.state == "ready":
                self.state = "running"
                self.run_evacuation()

        self.app.push_screen(ConfirmScreen(f"Evacuate {self.host_name_evacuated}?", body), answered)

    @work(exclusive=True, group="evacuate", exit_on_error=False)
    async def run_evacuation(self) -> None:
        from sevconsole.engine.evacuate import Evacuation

        self.evacuation = Evacuation(self.prepared, self.show_view)
        try:
            code = await self.evacuation.run()
        except Exception as exc:
            self.state = "failed"
            self.say(safe.plain(f"the evacuation stopped: {exc}", "$error"))
            return
        self.state = "done"
        if code == 0:
            self.notify(f"{self.host_name_evacuated} is evacuated; it stays cordoned "
                        f"(`sevconsole uncordon {self.host_name_evacuated}`).", title="Evacuation done")
        else:
            self.notify(f"Some guests did not move off {self.host_name_evacuated}: see their rows.",
                        title="Evacuation ended", severity="warning")
        for name in self.app.backend.host_names():  # type: ignore[attr-defined]
            self.app.probe(name)  # type: ignore[attr-defined]

    def show_view(self, view: Any) -> None:
        from sevconsole.engine.evac_view import row_cells, summary_line

        self.view = view
        table = self.query_one(DataTable)
        for row in view.rows:
            cells = row_cells(row)
            texts = [safe.rich(self.app, safe.plain(c)) for c in cells]
            texts[3] = safe.cell(self.app, f"[{STATUS_STYLE.get(row.status, '$text')}]$status[/]",
                                 status=row.status)
            if row.vm in table.rows:
                for column, text in zip(table.columns, texts, strict=False):
                    table.update_cell(row.vm, column, text)
            else:
                table.add_row(*texts, key=row.vm)
        done = " [b]Done.[/] Esc goes back." if view.done else " c cancels."
        self.status("$line" + done, line=summary_line(view))
        if view.notes:
            self.query_one("#evac-plan-text", Static).update(
                safe.lines([*self.log_lines, *(safe.plain(f"note: {n}") for n in view.notes)]))

    # -- leaving
    def action_cancel(self) -> None:
        if self.state != "running" or self.evacuation is None:
            return
        from sevconsole.tui.screens.modals import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes and self.evacuation is not None:
                self.evacuation.cancel("cancelled by the operator (console)")

        self.app.push_screen(ConfirmScreen(
            f"Cancel the evacuation of {self.host_name_evacuated}?",
            "Nothing more starts; running migrations roll back (their guests stay on the host)."), answered)

    def action_back(self) -> None:
        if self.state in ("running", "planning"):
            self.notify("The evacuation is under way: c cancels it; wait for its end to leave.", severity="warning")
            return
        if self.state in ("ready", "refused") and self.prepared is not None:
            from sevconsole.engine.evacuate import abandon

            sentence = abandon(self.prepared, 2 if self.state == "refused" else 1)
            if sentence:
                self.notify(sentence)
        self.app.pop_screen()

    def report_updated(self, report: Any) -> None:
        pass  # the evacuation probes what it needs itself

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Start the evacuation", "After confirmation (Enter)", self.action_start),
            ("Cancel the evacuation", "Nothing more starts, running migrations roll back (c)", self.action_cancel),
        ]
