"""The end of a migration: outcome, the one-runnable-copy check, digests, timings, audit line."""

from __future__ import annotations

import json

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Header, Static, TabbedContent, TabPane

from sevconsole.engine.progress import Progress
from sevconsole.engine.replay import Tape
from sevconsole.engine.run import Outcome
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt
from sevconsole.tui import safe
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.replay_view import ReplayView

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
    if result.source_guest_state is None and result.target_guest_state is None:
        # no firmware states (a plain guest): the QEMU run states are all there is to say
        lines.append(safe.show("  source QEMU $ss, target QEMU $ts", ss=result.source_status or "not known",
                               ts=result.target_status or ("not started" if result.result == "refused" else "gone")))
    else:
        lines.append(safe.show(
            "  source guest $sg (QEMU $ss), target guest $tg (QEMU $ts)",
            sg=fmt.guest_state(result.source_guest_state), ss=result.source_status or "?",
            tg=fmt.guest_state(result.target_guest_state), ts=result.target_status or "?"))
    if result.digest_source is None and result.digest_target is None:
        pass  # neither QEMU offers a digest (real QEMU never does): nothing to compare, nothing to say
    elif result.digest_match is None:
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


class ResultScreen(ConsoleScreen):
    """The outcome, and the migration's replay in the next tab (r): a one-second migration is
    over before its panels can be read, so they can be played again, slowly, or scrubbed."""

    BINDINGS = [
        Binding("escape,enter", "done", "Done: overview", id="result.done"),
        Binding("r", "show('result-replay')", "Replay", id="result.replay"),
        Binding("o", "show('result-outcome')", "Outcome", id="result.outcome"),
    ]
    DEFAULT_CSS = """
    ResultScreen > TabbedContent { height: 1fr; }
    ResultScreen TabPane { padding: 0; }
    ResultScreen #result-outcome > VerticalScroll { height: 1fr; }
    """

    def __init__(self, result: Outcome, progress: Progress | None) -> None:
        super().__init__()
        self.result, self.progress = result, progress
        self.tape: Tape | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="result-outcome"):
            with TabPane("Outcome (o)", id="result-outcome"), VerticalScroll():
                yield Static(safe.lines(result_lines(self.result, self.progress)), id="result")
            with TabPane("Replay (r)", id="result-replay"):
                yield ReplayView()
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = escape_controls(f"result: {self.result.result}")
        if self.result.migration_id is not None:
            self._load(self.result.migration_id)
        else:
            self.no_tape("this migration has no id to find its snapshots by")

    @work(thread=True, exclusive=True, group="result-replay", exit_on_error=False)
    def _load(self, migration_id: str) -> None:
        try:
            tape = self.app.backend.replay(migration_id)  # type: ignore[attr-defined]
        except Exception as exc:  # ReplayError's sentence, or why the folder could not be read
            self.app.call_from_thread(self.no_tape, str(exc) or type(exc).__name__)
        else:
            self.app.call_from_thread(self.loaded, tape)

    def loaded(self, tape: Tape) -> None:
        if not self.query(ReplayView):  # its tab is still being mounted
            self.call_after_refresh(self.loaded, tape)
            return
        self.tape = tape
        self.query_one(ReplayView).load(tape)

    def no_tape(self, sentence: str) -> None:
        if not self.query(ReplayView):
            self.call_after_refresh(self.no_tape, sentence)
            return
        view = self.query_one(ReplayView)
        view.empty(sentence)
        if self.progress is not None:  # at least the last moment
            view.show_live(self.progress)

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        if tab == "result-replay":
            self.query_one(ReplayView).focus()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [("Done: back to the overview", "Leave the result and re-probe both hosts (Enter)", self.action_done),
                ("Replay the migration", "Page map, rate and firmware at any moment (r)",
                 lambda: self.action_show("result-replay"))]

    def action_done(self) -> None:
        progress = self.progress
        overview = getattr(self.app, "action_overview", None)
        self.app.pop_screen()
        if overview is not None:
            overview()
        if progress is not None:  # both ends changed: look again
            for name in (progress.source, progress.target):
                if name in self.app.reports:  # type: ignore[attr-defined]
                    self.app.probe(name)  # type: ignore[attr-defined]
