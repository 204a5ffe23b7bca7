"""Guide mode: a walkthrough of a lab migration, explaining each SEV step as it happens, pausing
between steps, then the failure demos. The script is in guide_steps.py."""

from __future__ import annotations

import asyncio

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Header, Static

from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.replay import Tape
from sevconsole.engine.run import Outcome, Result
from sevconsole.hosts.report import HostReport
from sevconsole.tui import safe
from sevconsole.tui.backend import RUNNABLE, MigrationHandle, find_vm
from sevconsole.tui.guide_steps import PHASE_NOTES, STEPS, Step
from sevconsole.tui.messages import HostProbed, MigrationEnded, ProgressPosted
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.screens.migrate import checklist, first_failure
from sevconsole.tui.screens.result import result_lines
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.replay_view import ReplayView


class GuideScreen(ConsoleScreen):
    BINDINGS = [
        Binding("space,n", "next", "Next step", id="guide.next"),
        Binding("c", "cancel", "Cancel migration", id="guide.cancel"),
        Binding("escape", "leave", "Leave guide", id="guide.leave"),
    ]

    def __init__(self, steps: tuple[Step, ...] = STEPS) -> None:
        super().__init__()
        self.steps = steps
        self.index = -1
        self.busy = False
        self.handle: MigrationHandle | None = None
        self.narration: list[str] = []  # plain text of what was said, oldest first (tests)
        self.phases_seen: set[Phase] = set()
        self._pending: Progress | None = None
        self.outcomes: list[str] = []  # result per action step, for tests and the last page
        self._cancel_sent = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="guide-box"):
            yield Static(id="guide-text")
            yield Static(id="guide-now")
        yield ReplayView()  # live during a step, its replay between steps
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = "guided tour"
        self.query_one(ReplayView).go_live("each migration step shows here live, then its replay until the next step")
        self.action_next()

    # -- narration
    def say(self, *lines: Content, reset: bool = False) -> None:
        """The step's own text (reset=True) or what is happening now (replaces the last)."""
        plain = [line.plain for line in lines]
        if reset:
            self.narration = plain
            self.query_one("#guide-text", Static).update(safe.lines(lines))
            self.query_one("#guide-now", Static).update("")
        else:
            self.narration += plain
            self.query_one("#guide-now", Static).update(safe.lines(lines))
        self.query_one("#guide-box", VerticalScroll).scroll_home(animate=False)

    @property
    def step(self) -> Step:
        return self.steps[self.index]

    def action_next(self) -> None:
        if self.busy:
            self.notify("This step is still running; wait for it, or c cancels the migration.")
            return
        if self.index + 1 >= len(self.steps):
            self.notify("That was the last step; Esc leaves the guide.")
            return
        self.index += 1
        step = self.step
        self.say(safe.show("[b]$title[/]  [$text-muted]($n/$total)[/]", title=step.title, n=self.index + 1,
                           total=len(self.steps)), safe.plain(step.text), reset=True)
        if step.action == "read":
            self.say(safe.show("[$accent]Space: next step[/]") if self.index + 1 < len(self.steps) else Content())
            return
        self.busy = True
        self.run_step(step)

    @work(exclusive=True, group="guide", exit_on_error=False)
    async def run_step(self, step: Step) -> None:
        backend = self.app.backend  # type: ignore[attr-defined]
        try:
            source, target = await asyncio.gather(asyncio.to_thread(backend.probe, step.source),
                                                  asyncio.to_thread(backend.probe, step.target))
        except Exception as exc:
            self.finish_step(safe.show("[$warning]This step needs $source and $target: $why. Skipped.[/]",
                                       source=step.source, target=step.target, why=exc))
            return
        for report in (source, target):
            self.app.post_message(HostProbed(report))
        vm = find_vm(source, step.vm)
        there = find_vm(target, step.vm)
        if (vm is None or vm.status not in RUNNABLE) and there is not None and there.status in RUNNABLE:
            # an earlier migration (this tour's or the operator's) moved it: go the other way
            source, target, vm = target, source, there
            self.say(safe.show("[$text-muted]$vm now runs on $source, so this step goes $source -> $target.[/]",
                               vm=step.vm, source=source.name, target=target.name))
        if vm is None:
            self.finish_step(safe.show("[$warning]$vm is not on $source in this lab; skipped.[/]",
                                       vm=step.vm, source=step.source))
            return
        checks = tuple(await asyncio.to_thread(backend.preflight, vm, source, target, 300))
        bad = first_failure(checks)
        if step.action == "preflight":
            verdict = (safe.show("[$error]Refused: $why[/]", why=bad.sentence) if bad else
                       safe.show("[$success]Every check allows it.[/]"))
            self.outcomes.append("refused" if bad else "allowed")
            self.finish_step(verdict, checklist(checks))
            return
        if bad is not None:
            self.outcomes.append("refused")
            self.finish_step(safe.show("[$error]Preflight refused it: $why[/]", why=bad.sentence))
            return
        for command, args in step.lab_commands:
            try:
                await backend.lab_command(source, vm, command, args)
            except Exception as exc:
                self.finish_step(safe.show("[$warning]The lab did not take $command: $why; skipped.[/]",
                                           command=command, why=exc))
                return
            self.say(safe.show("[$text-muted]lab: $command $args[/]", command=command, args=args))
        self.phases_seen = set()
        try:
            self.handle = backend.migration(vm, source, target, 300, checks, self.post_progress,
                                            bandwidth_bps=step.bandwidth_bps)
            result = await self.handle.run()
        except Exception as exc:
            result = Outcome(result=Result.FAILED, message=str(exc) or type(exc).__name__)
        self.post_message(MigrationEnded(result))

    def post_progress(self, progress: Progress) -> None:
        self._pending = progress
        self.post_message(ProgressPosted(progress))

    def on_progress_posted(self, message: ProgressPosted) -> None:
        p = message.progress
        if p.phase not in self.phases_seen and p.phase in PHASE_NOTES:
            self.phases_seen.add(p.phase)
            self.say(safe.show("[$accent]▸ $phase[/]: $note", phase=p.phase.value, note=PHASE_NOTES[p.phase]))
        if (self.step.cancel_if_not_converging and p.converging is False and self.handle is not None
                and not self._cancel_sent):
            self._cancel_sent = True
            self.say(safe.show("[$warning]The prediction is clear: it cannot converge. The guide cancels.[/]"))
            self.handle.cancel("cancelled by the guide: the migration could not converge")
        if p is self._pending:
            self.query_one(ReplayView).show_live(p)

    def on_migration_ended(self, message: MigrationEnded) -> None:
        self.handle = None
        self._cancel_sent = False
        if self._pending is not None:
            self.query_one(ReplayView).show_live(self._pending)
        self.outcomes.append(message.result.result)
        lines = [line for line in result_lines(message.result, self._pending)[:6] if line]
        if self.step.expect:
            lines.append(safe.show("[$text-muted]expected: $expect[/]", expect=self.step.expect))
        if message.result.migration_id is not None:
            lines.append(safe.show("[$accent]Replay it: ←/→ frame by frame, p plays it slowly, Home/End.[/]"))
            self._load_tape(message.result.migration_id)
        self.finish_step(Content(), *lines)

    @work(thread=True, exclusive=True, group="guide-replay", exit_on_error=False)
    def _load_tape(self, migration_id: str) -> None:
        """The step's migration as recorded, for the pause before the next step."""
        try:
            tape = self.app.backend.replay(migration_id)  # type: ignore[attr-defined]
        except Exception as exc:  # no snapshots: the panels keep the last moment
            self.app.call_from_thread(self.query_one(ReplayView).go_live, f"no replay: {exc}")
            return
        self.app.call_from_thread(self._tape_loaded, tape)

    def _tape_loaded(self, tape: Tape) -> None:
        if self.busy:
            return  # the next step already runs
        view = self.query_one(ReplayView)
        view.load(tape)
        view.focus()

    def finish_step(self, *lines: Content) -> None:
        self.busy = False
        more = self.index + 1 < len(self.steps)
        self.say(*lines, safe.show("[$accent]Space: next step[/]" if more else "[$accent]Esc: back to the hosts[/]"))
        if self.step.source:
            for name in (self.step.source, self.step.target):
                if name in self.app.reports:  # type: ignore[attr-defined]
                    self.app.probe(name)  # type: ignore[attr-defined]

    def action_cancel(self) -> None:
        if self.handle is None:
            self.notify("No migration is running.")
            return
        self.handle.cancel("cancelled by the operator during the guide")

    def action_leave(self) -> None:
        if self.handle is not None:
            self.handle.cancel("the operator left the guide")
        self.app.pop_screen()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        return [
            ("Guide: next step", "Go on with the tour (Space)", self.action_next),
            ("Guide: cancel the running migration", "SEND_CANCEL on the source (c)", self.action_cancel),
            ("Leave the guide", "Back to the hosts (Esc)", self.action_leave),
        ]

    def report_updated(self, report: HostReport) -> None:
        pass  # the guide probes what it needs itself
