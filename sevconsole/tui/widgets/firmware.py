"""Firmware panel: both ends' guest and platform state machines, current state lit, SEV log."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Static

from sevconsole.engine.progress import FirmwareView, SevLogEntry
from sevconsole.tui import format as fmt
from sevconsole.tui import safe

SHORT_GUEST = ("UNINIT", "LUPD", "LSEC", "RUNNING", "SUPDATE", "RUPDATE", "SENT")


def machine(names: Sequence[str], current: int | None) -> Content:
    """States in a row, the current one lit (reverse), so it reads without colour too."""
    cells = [Content.styled(f" {name} ", "reverse b $accent") if i == current else Content.styled(name, "$text-muted")
             for i, name in enumerate(names)]
    return Content(" ").join(cells)


def end_lines(role: str, fw: FirmwareView | None) -> list[Content]:
    # one styled run per label, never a style change beside a space: a reader that takes the
    # runs apart (a screen reader, text pulled out of a screenshot) keeps "source: lab-1"
    if fw is None:
        return [safe.show("[b]$role:[/] [$text-muted]firmware not read yet[/]", role=role), Content()]
    handle = "" if fw.handle is None else f", handle {fw.handle}"
    last = "" if fw.last_status is None else f", last {fmt.status(fw.last_status)}"
    head = safe.show("[b]$role: $host[/]$handle$last", role=role, host=fw.host, handle=handle, last=last)
    states = Content.assemble(" ", machine(SHORT_GUEST, fw.guest_state), " │ ",
                              machine(fmt.PLATFORM_STATES, fw.platform_state))
    return [head, states]


def log_line(entry: SevLogEntry) -> Content:
    times = f" ×{entry.count}" if entry.count > 1 else ""
    if entry.status < 0:  # known from the firmware's counts only: it ran, its status scrolled away
        return safe.show("$host $command$times [$text-muted]ran (status not logged)[/]", host=entry.host,
                         command=entry.command, times=times)
    colour = "$success" if entry.status == 0 else "$error"
    return safe.show(f"$host $command$times [{colour}]$status[/]", host=entry.host, command=entry.command,
                     times=times, status=fmt.status(entry.status))


class FirmwarePanel(VerticalScroll):
    DEFAULT_CSS = """
    FirmwarePanel { height: 1fr; overflow-y: auto; padding: 0 1; }
    FirmwarePanel > #machines { height: auto; }
    FirmwarePanel > #sevlog { height: auto; color: $text; }
    """

    def __init__(self, log_lines: int = 6, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.log_lines = log_lines

    def compose(self) -> ComposeResult:  # before the first snapshot: what will be here, said so
        yield Static(safe.lines([*end_lines("source", None), *end_lines("target", None)]), id="machines")
        yield Static(safe.lines([safe.show("[u]SEV commands[/]"), safe.show("[$text-muted]no SEV command yet[/]")]),
                     id="sevlog")

    def show(self, source: FirmwareView | None, target: FirmwareView | None, log: Sequence[SevLogEntry]) -> None:
        legend = safe.show("[$text-muted]guest states │ platform states, the current one lit[/]")
        self.query_one("#machines", Static).update(
            safe.lines([*end_lines("source", source), *end_lines("target", target), legend]))
        recent = list(log)[-self.log_lines :]
        body = [log_line(e) for e in recent] or [safe.show("[$text-muted]no SEV command yet[/]")]
        self.query_one("#sevlog", Static).update(safe.lines([safe.show("[u]SEV commands[/]"), *body]))
