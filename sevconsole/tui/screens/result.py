"""The end of a migration: outcome, the one-runnable-copy check, digests, timings, audit line."""

from __future__ import annotations

import json

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from sevconsole.engine.progress import Progress
from sevconsole.tui import format as fmt
from sevconsole.tui.backend import Result

HEADLINES = {
    "done": "[$success]✓ Migrated[/]",
    "failed": "[$error]✗ Failed[/]",
    "cancelled": "[$warning]■ Cancelled[/]",
    "refused": "[$error]✗ Refused[/]",
}


def result_lines(result: Result, progress: Progress | None) -> list[str]:
    lines = [f"[b]{HEADLINES.get(result.result, escape(result.result))}[/]  {escape(result.message)}", ""]
    if progress is not None:
        lines.append(f"{escape(progress.vm)}: {escape(progress.source)} → {escape(progress.target)}")
    runnable = ", ".join(result.runnable) or "none"
    if result.one_copy:
        lines.append(f"[$success]✓ exactly one runnable copy[/]: on {escape(runnable)}")
    else:
        lines.append(f"[$error]✗ {len(result.runnable)} runnable copies[/] (on: {escape(runnable)}); check both hosts now")
    lines.append(f"  source guest {fmt.guest_state(result.source_guest_state)}"
                 f" (QEMU {escape(result.source_status or '?')}),"
                 f" target guest {fmt.guest_state(result.target_guest_state)}"
                 f" (QEMU {escape(result.target_status or '?')})")
    if result.digest_match is None:
        lines.append("[$text-muted]guest digest: not compared (no digest from one end)[/]")
    elif result.digest_match:
        lines.append(f"[$success]✓ guest memory digests match[/] sha256 {escape((result.digest_target or '')[:16])}…")
    else:
        lines.append(f"[$error]✗ guest memory digests differ[/]: source {escape((result.digest_source or '')[:16])}…"
                     f" target {escape((result.digest_target or '')[:16])}…")
    avg = result.bytes_transferred / result.duration_s if result.duration_s else None
    lines.append(f"time {fmt.duration(result.duration_s)}, sent {fmt.size(result.bytes_transferred)}"
                 f" (average {fmt.rate(avg)})")
    if progress is not None:
        lines.append(f"passes {progress.pass_number}, downtime limit {progress.downtime_limit_ms} ms")
    for error in result.errors:
        lines.append(f"[$error]{escape(error)}[/]")
    if result.audit:
        lines += ["", "[u]audit log[/]", escape(audit_summary(result.audit))]
    return lines


def audit_summary(line: str) -> str:
    """The audit line in one readable sentence (the log itself keeps the JSON)."""
    try:
        rec = json.loads(line)
        return (f"#{rec['seq']} {rec.get('time', '')} by {rec.get('operator', '?')}: {rec.get('vm')} "
                f"{rec.get('source')} -> {rec.get('target')} {rec.get('outcome')}, "
                f"{len(rec.get('checks', []))} checks, chained to {str(rec.get('prev', ''))[:12]}…")
    except (ValueError, KeyError, TypeError):
        return line


class ResultScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,enter", "done", "Back to hosts", id="result.done"),
    ]

    def __init__(self, result: Result, progress: Progress | None) -> None:
        super().__init__()
        self.result, self.progress = result, progress

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static("\n".join(result_lines(self.result, self.progress)), id="result")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"result: {self.result.result}"

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [("Back to hosts", "Leave the result and re-probe both hosts (Enter)", self.action_done)]

    def action_done(self) -> None:
        progress = self.progress
        self.app.pop_screen()
        if progress is not None:  # both ends changed: look again
            for name in (progress.source, progress.target):
                if name in self.app.reports:  # type: ignore[attr-defined]
                    self.app.probe(name)  # type: ignore[attr-defined]
