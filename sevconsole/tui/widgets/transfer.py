"""Transfer panel: rates, bytes, passes, dirty rate, downtime against its limit, convergence."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.markup import escape
from textual.widgets import Sparkline, Static

from sevconsole.engine.progress import Phase, Progress
from sevconsole.tui import format as fmt


def convergence_sentence(p: Progress) -> str:
    """The prediction in words; never a bare percentage."""
    if p.phase.terminal:
        return f"finished: {p.phase.value}"
    if p.phase in (Phase.STOP_AND_COPY, Phase.FINISHING):
        return "[$success]converged[/]: guest paused for the last copy"
    if p.converging is None:
        return "[$text-muted]measuring: too early to predict[/]"
    if p.converging:
        eta = f", done in ~{fmt.duration(p.eta_s)}" if p.eta_s is not None else ""
        return f"[$success]converging[/]{eta}"
    dirty_bps = p.dirty_pages_per_s * p.page_size
    return (f"[$error]NOT converging[/]: dirtying {fmt.rate(dirty_bps)} vs sending "
            f"{fmt.rate(p.rate_bps)}: raise the limit or cancel")


class TransferPanel(Vertical):
    DEFAULT_CSS = """
    TransferPanel { height: auto; border: round $panel-lighten-1; border-title-color: $text-muted; }
    TransferPanel > #numbers { height: auto; }
    TransferPanel > Sparkline { height: 3; margin: 0 0; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="numbers")
        yield Sparkline([], id="rate-chart", summary_function=max)

    def on_mount(self) -> None:
        self.border_title = "Transfer"
        self.border_subtitle = "rate history"

    def show(self, p: Progress) -> None:
        downtime = "-" if p.expected_downtime_ms is None else f"{p.expected_downtime_ms:.0f} ms"
        fits = ""
        if p.expected_downtime_ms is not None:
            fits = ": [$success]fits[/]" if p.expected_downtime_ms <= p.downtime_limit_ms else ": [$error]too long[/]"
        phase = p.phase.value + (f", pass {p.pass_number}" if p.pass_number else "")
        lines = [
            f"[b]{escape(phase)}[/] · {fmt.duration(p.elapsed_s)}",
            f"[b]{fmt.rate(p.rate_bps)}[/] · {fmt.count(p.pages_per_s)} pages/s",
            f"sent {fmt.size(p.bytes_transferred)} · left {fmt.size(p.bytes_remaining)} / {fmt.size(p.bytes_total)}",
            f"dirtying {fmt.count(p.dirty_pages_per_s)} pages/s ({fmt.rate(p.dirty_pages_per_s * p.page_size)})",
            f"downtime {downtime} of {p.downtime_limit_ms} ms{fits}",
            convergence_sentence(p),
        ]
        self.query_one("#numbers", Static).update("\n".join(lines))
        self.query_one(Sparkline).data = list(p.rate_history) or [0.0]
