"""The console application: hosts, host, migrate, live and result screens over one backend."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from textual import events, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.content import Content
from textual.notifications import SeverityLevel
from textual.screen import Screen

from sevconsole.engine.attention import Attention
from sevconsole.hosts.report import HostReport
from sevconsole.textsafe import escape_controls, escape_lines
from sevconsole.tui.backend import ConsoleBackend, HostKeyPending
from sevconsole.tui.collector import IdleCollector
from sevconsole.tui.config import ConsoleConfig
from sevconsole.tui.messages import (
    AttentionFound,
    HostKeyAsked,
    HostProbed,
    HostProbeFailed,
    RecoverDone,
)
from sevconsole.tui.themes import DEFAULT, NamedTheme, load_themes


@runtime_checkable
class ShowsReports(Protocol):
    """A screen that redraws a host when its report changes."""

    def report_updated(self, report: HostReport) -> None: ...


@runtime_checkable
class RecolorsCells(Protocol):
    """A screen whose table cells hold resolved theme colours."""

    def refresh_cells(self) -> None: ...


@runtime_checkable
class ShowsAttention(Protocol):
    """A screen that shows the attention list."""

    def attention_updated(self) -> None: ...


class SevConsoleApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "sevconsole"
    ENABLE_COMMAND_PALETTE = True
    # screen classes for layouts that use the room: -wide / -tall
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [
        Binding("question_mark", "help", "Help", id="help"),
        Binding("f8", "screenshot", "Screenshot", id="screenshot", show=False),
        Binding("ctrl+t", "next_theme", "Theme", id="theme", show=False),
        Binding("ctrl+g", "guide", "Guide", id="guide", show=False),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        # not in the footer (80 columns are full); in `?`, the palette, and the notifications that need them
        Binding("M", "migrations", "Migrations", id="migrations", show=False),
        Binding("A", "attention", "Attention", id="attention", show=False),
    ]

    def __init__(self, backend: ConsoleBackend, *, config: ConsoleConfig | None = None,
                 theme: str | None = None, guide: bool = False, probe_on_start: bool = True,
                 screenshot_dir: Path | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.config = config if config is not None else ConsoleConfig.load()
        self.reports: dict[str, HostReport] = {}
        self.probe_log: list[str] = []  # one line per probe message, oldest first
        self.themes, self.theme_problems = load_themes()
        self.requested_theme = theme or self.config.theme or DEFAULT
        self.start_guide = guide
        self.probe_on_start = probe_on_start
        self.screenshot_dir = screenshot_dir or Path.cwd()
        self._heap_frozen = False
        self.collector = IdleCollector()  # full collections between keys (tui/collector.py)
        self.quit_when_ended = False  # set when the operator cancels running migrations to quit
        self.attention: tuple[Attention, ...] = ()  # engine.attention.Attention items, after each full probe

    # -- start
    def on_mount(self) -> None:
        self.collector.start()
        self.set_interval(0.5, self.collector.tick, name="idle-collector")
        for named in self.themes.values():
            self.register_theme(named.theme)
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        if not self.apply_theme(self.requested_theme, save=False):
            self.apply_theme(DEFAULT, save=False)
        if self.config.keys:
            self.set_keymap(self.config.keys)
        for problem in (*self.config.problems, *self.theme_problems):
            self.notify(problem, severity="warning", timeout=8)
        from sevconsole.hosts import passphrases
        from sevconsole.tui.screens.passphrase import asker_for

        passphrases.set_asker(asker_for(self))  # a protected identity the agent lacks: asked here
        from sevconsole.tui.screens.overview import OverviewScreen

        self.push_screen(OverviewScreen())  # the fleet at a glance; Enter on a host opens it
        if self.probe_on_start:
            self.probe_all()
            self._recover()
        if self.start_guide:
            self.action_guide()

    def format_title(self, title: str, sub_title: str) -> Content:
        """`sevconsole — hosts` as one run of text: Textual dims the sub-title, and a style change
        beside a space reads as a missing space to whatever takes the runs apart."""
        return Content(f"{title} — {sub_title}" if sub_title else title)

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Every notification is plain text, whatever the caller asks: messages carry host names and
        sentences, whose brackets must not be parsed (a `[/` killed the console); control
        characters show escaped."""
        super().notify(escape_lines(message), title=escape_controls(title), severity=severity,
                       timeout=timeout, markup=False)

    def apply_theme(self, label: str, *, save: bool = True) -> bool:
        named: NamedTheme | None = self.themes.get(label)
        if named is None:
            known = ", ".join(sorted(self.themes)) or "none found"
            self.notify(f"No theme called {label!r} (known: {known}); keeping {self.theme}.", severity="warning")
            return False
        self.theme = named.theme.name
        if save:
            try:
                self.config = self.config.with_theme(label)
                self.config.save()
            except OSError as exc:
                self.notify(f"Theme {label} is on, but it could not be saved: {exc}", severity="warning")
        return True

    def _theme_changed(self, _theme: object) -> None:
        # DataTable cells hold resolved colours: rebuild them in the new theme's
        for screen in self.screen_stack:
            if isinstance(screen, RecolorsCells):
                screen.refresh_cells()

    @property
    def theme_label(self) -> str:
        return next((k for k, v in self.themes.items() if v.theme.name == self.theme), self.theme)

    # -- probing (SSH is blocking: thread workers post immutable reports)
    def probe_all(self) -> None:
        for name in self.backend.host_names():
            self.probe(name)

    def probe(self, name: str) -> None:
        self._probe(name)

    @work(thread=True, group="probe", exit_on_error=False)
    def _probe(self, name: str) -> None:
        try:
            report = self.backend.probe(name)
        except HostKeyPending as pending:
            self.post_message(HostKeyAsked(pending.question))
        except Exception as exc:  # every failure becomes a sentence on the host's row
            self.post_message(HostProbeFailed(name, str(exc) or type(exc).__name__))
        else:
            self.post_message(HostProbed(report))

    def on_unmount(self) -> None:
        self.collector.stop()  # CPython's own thresholds again (tests run many consoles in one process)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key | events.MouseDown | events.MouseScrollUp | events.MouseScrollDown):
            self.collector.input()
        await super().on_event(event)

    def _freeze_startup_heap(self) -> None:
        """Once every host has answered: start-up garbage (imports, first probes) would otherwise
        be walked by every full collection, a 100+ ms pause mid-migration. Collect it, freeze it."""
        if not self._heap_frozen and set(self.backend.host_names()) <= set(self.reports):
            self._heap_frozen = True
            gc.collect()
            gc.freeze()

    def on_host_probed(self, message: HostProbed) -> None:
        report = message.report
        self.reports[report.name] = report
        self.probe_log.append(f"{report.name}: probed ({'reachable' if report.reachable else 'unreachable'})")
        key = getattr(report, "host_key", None)
        if key is not None and key.status == "changed":  # refused, always: say so loudly
            self.notify(report.errors[0] if report.errors else f"{report.name}: host key changed",
                        title="Host key changed: refused", severity="error", timeout=20)
        for screen in self.screen_stack:
            if isinstance(screen, ShowsReports):
                screen.report_updated(report)
        self._freeze_startup_heap()
        self._check_attention()

    def on_host_probe_failed(self, message: HostProbeFailed) -> None:
        self.probe_log.append(f"{message.host}: failed: {message.sentence}")
        report = HostReport(name=message.host, address="", port=0, reachable=False,
                            errors=(message.sentence,), probed_at=time.time())
        old = self.reports.get(message.host)
        if old is not None:
            report = HostReport(name=old.name, address=old.address, port=old.port, reachable=False,
                                lab=old.lab, errors=(message.sentence,), probed_at=report.probed_at)
        self.reports[message.host] = report
        for screen in self.screen_stack:
            if isinstance(screen, ShowsReports):
                screen.report_updated(report)
        self._freeze_startup_heap()
        self._check_attention()

    def on_host_key_asked(self, message: HostKeyAsked) -> None:
        from sevconsole.tui.screens.modals import HostKeyScreen

        question = message.question
        self.probe_log.append(f"{question.host}: unknown host key {question.fingerprint}")

        def answered(accept: bool | None) -> None:
            if accept:
                self._accept_key(question)
            else:
                self.on_host_probe_failed(HostProbeFailed(
                    question.host, f"host key {question.fingerprint} of {question.host} was refused; "
                                   "press r on the host to be asked again"))

        self.push_screen(HostKeyScreen(question), answered)

    @work(thread=True, group="probe", exit_on_error=False)
    def _accept_key(self, question) -> None:  # type: ignore[no-untyped-def]
        try:
            self.backend.accept_host_key(question)
        except Exception as exc:
            self.post_message(HostProbeFailed(question.host, f"could not record the key: {exc}"))
            return
        self.call_from_thread(self.probe, question.host)

    # -- durable migrations: recover at start, list, re-attach, quit without stopping them
    @work(thread=True, group="recover", exit_on_error=False)
    def _recover(self) -> None:
        """What `sevconsole recover` does, for this console's fleet, and say so."""
        recover = getattr(self.backend, "recover", None)
        lister = getattr(self.backend, "migrations", None)
        if recover is None or lister is None:
            return
        try:
            results = recover()
            in_flight = [e for e in lister() if e.in_flight]
        except Exception as exc:  # a journal or lock problem must not stop the console
            self.post_message(RecoverDone((), ()))
            self.call_from_thread(self.notify, f"Recover at start failed: {exc}", severity="error")
            return
        self.post_message(RecoverDone(tuple(results), tuple(in_flight)))

    def on_recover_done(self, message: RecoverDone) -> None:
        for r in message.results:
            if r.result == "reconciled":
                self.notify(f"{r.vm} ({r.source} → {r.target}): {r.sentence}",
                            title=f"Recovered migration {r.id}", timeout=15)
            elif r.result == "needs-operator":
                self.notify(f"{r.vm} ({r.source} → {r.target}): {r.sentence}",
                            title=f"Migration {r.id} needs you", severity="error",
                            timeout=30)
        if message.in_flight:
            names = ", ".join(f"{e.vm} ({e.source} → {e.target})" for e in message.in_flight)
            self.notify(f"In flight: {names}. Press M to watch.", title="Migrations running", timeout=15)

    def _check_attention(self) -> None:
        if set(self.backend.host_names()) <= set(self.reports) and hasattr(self.backend, "attention"):
            self._find_attention(tuple(self.reports.values()))

    @work(thread=True, exclusive=True, group="attention", exit_on_error=False)
    def _find_attention(self, reports: tuple[HostReport, ...]) -> None:
        items = self.backend.attention(reports)
        self.post_message(AttentionFound(tuple(items)))

    def on_attention_found(self, message: AttentionFound) -> None:
        new = [i for i in message.items if i not in self.attention]
        self.attention = message.items
        for screen in self.screen_stack:
            if isinstance(screen, ShowsAttention):
                screen.attention_updated()
        if new:
            self.notify("; ".join(f"{i.vm or i.host}: {i.problem}" for i in new[:3]),
                        title=f"{len(message.items)} item(s) need attention: press A", severity="warning",
                        timeout=20)

    def action_attention(self) -> None:
        from sevconsole.tui.screens.attention import AttentionScreen

        if not isinstance(self.screen, AttentionScreen):
            self.push_screen(AttentionScreen())

    def running_migrations(self) -> list[Any]:
        return [s for s in self.screen_stack if getattr(s, "running", False)]

    def action_overview(self) -> None:
        """Back to the start screen (the overview at the bottom of the stack)."""
        from sevconsole.tui.screens.overview import OverviewScreen

        while (len(self.screen_stack) > 2 and not isinstance(self.screen, OverviewScreen)
               and not getattr(self.screen, "running", False)):  # a live view stays until its end
            self.pop_screen()

    def action_migrations(self) -> None:
        from sevconsole.tui.screens.migrations import MigrationsScreen

        if not isinstance(self.screen, MigrationsScreen):
            self.push_screen(MigrationsScreen())

    async def action_quit(self) -> None:
        """Quitting never stops a migration by itself: ask whether to leave it running or cancel."""
        running = self.running_migrations()
        if not running:
            self.exit()
            return
        from sevconsole.tui.screens.migrations import QuitScreen

        def answer(choice: str | None) -> None:
            if choice == "detach":
                self.exit()
            elif choice == "cancel":
                self.quit_when_ended = True
                for screen in running:
                    screen.handle.cancel("cancelled by the operator (quitting the console)")
                self.notify("Cancelling: the console quits once each guest is back on its source.")

        self.push_screen(QuitScreen([s.vm.name for s in running]), answer)

    # -- actions (each one also in the command palette)
    def action_help(self) -> None:
        from sevconsole.tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """F8: an SVG of this screen, named by the time, in the screenshot folder (Textual's
        own arguments are honoured when a caller gives them)."""
        folder = Path(path) if path else self.screenshot_dir
        folder.mkdir(parents=True, exist_ok=True)
        name = filename or f"sevconsole-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        saved = self.save_screenshot(name, str(folder))
        self.notify(f"Screenshot saved to {saved}")

    def action_next_theme(self) -> None:
        labels = sorted(self.themes)
        if labels:
            current = self.theme_label
            nxt = labels[(labels.index(current) + 1) % len(labels)] if current in labels else labels[0]
            self.apply_theme(nxt)
            self.notify(f"Theme: {nxt}")

    def action_set_theme(self, label: str) -> None:
        if self.apply_theme(label):
            self.notify(f"Theme: {label}")

    def action_guide(self) -> None:
        from sevconsole.tui.screens.guide import GuideScreen

        if not any(isinstance(s, GuideScreen) for s in self.screen_stack):
            self.push_screen(GuideScreen())

    def action_probe_all(self) -> None:
        self.probe_all()

    def action_evacuate(self) -> None:
        from sevconsole.tui.screens.evacuate import start_evacuation

        start_evacuation(self)  # E on the hosts and host screens: the host in view

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: every key binding", "List the bindings of this screen and the app", self.action_help)
        yield SystemCommand("Re-probe all hosts", "Run discovery again on every host", self.probe_all)
        yield SystemCommand("Save SVG screenshot", "Save this screen as an SVG file (F8)", self.action_screenshot)
        yield SystemCommand("Guided tour", "Walk through a lab migration step by step", self.action_guide)
        yield SystemCommand("Migrations", "In flight, unfinished and recent migrations; re-attach (M)",
                            self.action_migrations)
        yield SystemCommand("Attention", "Guests with no runnable copy or a stranded copy, hosts out of "
                            "reach, and the fix (A)", self.action_attention)
        yield SystemCommand("Fleet overview", "Hosts, every VM, attention and migrations on one screen",
                            self.action_overview)
        yield SystemCommand("Evacuate host", "Cordon the selected host and move its guests away (E)",
                            self.action_evacuate)
        for label in sorted(self.themes):
            yield SystemCommand(f"Theme: {label}", f"Switch to the {label} theme and remember it",
                                lambda label=label: self.action_set_theme(label))
        for title, help_text, action in getattr(screen, "palette_commands", lambda: [])():
            yield SystemCommand(title, help_text, action)
