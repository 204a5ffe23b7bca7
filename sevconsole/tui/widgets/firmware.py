"""Firmware panel: both ends' guest and platform state machines, current state lit, SEV log."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.widgets import Static

from sevconsole.engine.progress import FirmwareView, SevLogEntry
from sevconsole.tui import format as fmt

SHORT_GUEST = ("UNINIT", "LUPD", "LSEC", "RUNNING", "SUPDATE", "RUPDATE", "SENT")


def machine(names: Sequence[str], current: int | None) -> str:
    """States in a row, the current one lit (reverse), so it reads without colour too."""
    cells = []
    for i, name in enumerate(names):
        if i == current:
            cells.append(f"[reverse b $accent] {name} [/]")
        else:
            cells.append(f"[$text-muted]{name}[/]")
    return " ".join(cells)


def end_lines(role: str, fw: FirmwareView | None) -> list[str]:
    if fw is None:
        return [f"[b]{role}[/] [$text-muted]not seen yet[/]", ""]
    handle = "" if fw.handle is None else f" handle {fw.handle}"
    last = "" if fw.last_status is None else f"  last {fmt.status(fw.last_status)}"
    return [
        f"[b]{role}[/] {escape(fw.host)}{handle}{escape(last)}  [$text-muted](guest │ platform)[/]",
        " " + machine(SHORT_GUEST, fw.guest_state) + " │ " + machine(fmt.PLATFORM_STATES, fw.platform_state),
    ]


def log_line(entry: SevLogEntry) -> str:
    times = f" ×{entry.count}" if entry.count > 1 else ""
    colour = "$success" if entry.status == 0 else "$error"
    return f"{escape(entry.host)} {entry.command}{times} [{colour}]{escape(fmt.status(entry.status))}[/]"


class FirmwarePanel(VerticalScroll):
    DEFAULT_CSS = """
    FirmwarePanel { height: 1fr; overflow-y: auto; padding: 0 1; }
    FirmwarePanel > #machines { height: auto; }
    FirmwarePanel > #sevlog { height: auto; color: $text; }
    """

    def __init__(self, log_lines: int = 6, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.log_lines = log_lines

    def compose(self) -> ComposeResult:
        yield Static(id="machines")
        yield Static(id="sevlog")

    def show(self, source: FirmwareView | None, target: FirmwareView | None, log: Sequence[SevLogEntry]) -> None:
        self.query_one("#machines", Static).update("\n".join(end_lines("source", source) + end_lines("target", target)))
        recent = list(log)[-self.log_lines :]
        body = "\n".join(log_line(e) for e in recent) or "[$text-muted]no SEV command yet[/]"
        self.query_one("#sevlog", Static).update("[u]SEV commands[/]\n" + body)
