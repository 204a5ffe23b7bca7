"""Transfer panel: rates, bytes, passes, dirty rate, downtime against its limit, convergence."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.markup import escape
from textual.widgets import Static

from sevconsole.engine.progress import Phase, Progress
from sevconsole.tui import format as fmt
from sevconsole.tui.widgets.rate_chart import RateChart


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
    SCOPED_CSS = False  # its rules name the screen's breakpoint classes (-tall, -wide)
    DEFAULT_CSS = """
    TransferPanel { height: auto; border: round $panel-lighten-1; border-title-color: $text-muted; }
    TransferPanel > #numbers { height: auto; }
    TransferPanel > RateChart { height: 3; }
    .-tall TransferPanel > RateChart { height: 5; }
    """

    def compose(self) -> ComposeResult:
        yield Static("[$text-muted]waiting for the first snapshot…[/]", id="numbers")
        yield RateChart(id="rate-chart")

    def on_mount(self) -> None:
        self.border_title = "Transfer"
        self.border_subtitle = "rate history"

    def show(self, p: Progress) -> None:
        phase = p.phase.value + (f", pass {p.pass_number}" if p.pass_number else "")
        head = f"[b]{escape(phase)}[/] · {fmt.duration(p.elapsed_s)}"
        if not p.bytes_total and not p.bytes_transferred and not p.phase.terminal:
            lines = [head, "[$text-muted]no bytes sent yet[/]",
                     f"downtime limit {p.downtime_limit_ms} ms",
                     "[$text-muted]prediction: once pages move[/]"]
        else:
            downtime = "-" if p.expected_downtime_ms is None else f"{p.expected_downtime_ms:.0f} ms"
            fits = ""
            if p.expected_downtime_ms is not None:
                fits = ": [$success]fits[/]" if p.expected_downtime_ms <= p.downtime_limit_ms else ": [$error]too long[/]"
            lines = [
                head,
                f"[b]{fmt.rate(p.rate_bps)}[/] · {fmt.count(p.pages_per_s)} pages/s",
                f"sent {fmt.size(p.bytes_transferred)} · left {fmt.size(p.bytes_remaining)} / {fmt.size(p.bytes_total)}",
                f"dirtying {fmt.count(p.dirty_pages_per_s)} pages/s ({fmt.rate(p.dirty_pages_per_s * p.page_size)})",
                f"downtime {downtime} of {p.downtime_limit_ms} ms{fits}",
                convergence_sentence(p),
            ]
        self.query_one("#numbers", Static).update("\n".join(lines))
        self.query_one(RateChart).data = tuple(p.rate_history)
