"""The end of a migration: outcome, the one-runnable-copy check, digests, timings, audit line."""

from __future__ import annotations

import json

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from sevconsole.engine.progress import Progress
from sevconsole.engine.run import Outcome
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt
from sevconsole.tui import safe

HEADLINES = {
    "done": "[$success]✓ Migrated[/]",
    "failed": "[$error]✗ Failed[/]",
    "cancelled": "[$warning]■ Cancelled[/]",
    "refused": "[$error]✗ Refused[/]",
}


def result_lines(result: Outcome, progress: Progress | None) -> list[Content]:
    headline = HEADLINES.get(result.result, "$result")
    lines = [safe.show(f"[b]{headline}[/]  $message", result=result.result, message=result.message), Content()]
    if progress is not None:
        lines.append(safe.show("$vm: $source → $target", vm=progress.vm, source=progress.source,
                               target=progress.target))
    runnable = ", ".join(result.runnable) or "none"
    if result.one_copy:
        lines.append(safe.show("[$success]✓ exactly one runnable copy[/]: on $on", on=runnable))
    else:
        lines.append(safe.show("[$error]✗ $count runnable copies[/] (on: $on); check both hosts now",
                               count=len(result.runnable), on=runnable))
    lines.append(safe.show(
        "  source guest $sg (QEMU $ss), target guest $tg (QEMU $ts)",
        sg=fmt.guest_state(result.source_guest_state), ss=result.source_status or "?",
        tg=fmt.guest_state(result.target_guest_state), ts=result.target_status or "?"))
    if result.digest_match is None:
        lines.append(safe.show("[$text-muted]guest digest: not compared (no digest from one end)[/]"))
    elif result.digest_match:
        lines.append(safe.show("[$success]✓ guest memory digests match[/] sha256 $digest…",
                               digest=(result.digest_target or "")[:16]))
    else:
        lines.append(safe.show("[$error]✗ guest memory digests differ[/]: source $source… target $target…",
                               source=(result.digest_source or "")[:16], target=(result.digest_target or "")[:16]))
    avg = result.bytes_transferred / result.duration_s if result.duration_s else None
    lines.append(Content(f"time {fmt.duration(result.duration_s)}, sent {fmt.size(result.bytes_transferred)}"
                         f" (average {fmt.rate(avg)})"))
    if progress is not None:
        lines.append(Content(f"passes {progress.pass_number}, downtime limit {progress.downtime_limit_ms} ms"))
    lines += [safe.plain(error, "$error") for error in result.errors]
    if result.audit:
        lines += [Content(), safe.show("[u]audit log[/]"), safe.plain(audit_summary(result.audit))]
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

    def __init__(self, result: Outcome, progress: Progress | None) -> None:
        super().__init__()
        self.result, self.progress = result, progress

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(safe.lines(result_lines(self.result, self.progress)), id="result")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = escape_controls(f"result: {self.result.result}")

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [("Back to hosts", "Leave the result and re-probe both hosts (Enter)", self.action_done)]

    def action_done(self) -> None:
        progress = self.progress
        self.app.pop_screen()
        if progress is not None:  # both ends changed: look again
            for name in (progress.source, progress.target):
                if name in self.app.reports:  # type: ignore[attr-defined]
                    self.app.probe(name)  # type: ignore[attr-defined]
