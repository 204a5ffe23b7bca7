"""Replay a finished migration: its page map, rate chart and firmware panels at any moment.

`ReplayScreen(migration_id)` loads the tape in a thread worker (the backend's `replay`, which
reads the runner's snapshots.jsonl.gz); `ReplayApp` is the same screen on its own, for
`sevconsole migrations show ID` on a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.widgets import Header, Static

from sevconsole.engine.replay import ReplayError, Tape
from sevconsole.textsafe import escape_controls
from sevconsole.tui import safe
from sevconsole.tui.screens.base import ConsoleScreen
from sevconsole.tui.widgets.footer import QuickFooter
from sevconsole.tui.widgets.replay_view import ReplayView


class TapeLoaded(Message):
    def __init__(self, tape: Tape | None, sentence: str = "") -> None:
        super().__init__()
        self.tape = tape
        self.sentence = sentence


class ReplayScreen(ConsoleScreen):
    BINDINGS = [
        Binding("escape", "leave", "Back", id="replay.leave"),
    ]
    DEFAULT_CSS = """
    ReplayScreen #replay-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, migration_id: str | None = None, *, tape: Tape | None = None,
                 loader: Callable[[str], Tape] | None = None, title: str = "",
                 autoplay: bool = False) -> None:
        super().__init__()
        self.migration_id = migration_id
        self.tape = tape
        self.loader = loader
        self.title_text = title
        self.autoplay = autoplay

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="replay-note")
        yield ReplayView()
        yield QuickFooter()

    def on_mount(self) -> None:
        self.sub_title = escape_controls(f"replay {self.title_text or self.migration_id or ''}".strip())
        self.query_one("#replay-note", Static).display = False
        view = self.query_one(ReplayView)
        view.focus()
        if self.tape is not None:
            self._loaded(self.tape)
        elif self.migration_id is not None:
            self._load(self.migration_id)
        else:
            view.empty("no migration was named")

    @work(thread=True, exclusive=True, group="replay-load", exit_on_error=False)
    def _load(self, migration_id: str) -> None:
        backend = getattr(self.app, "backend", None)
        loader = self.loader or getattr(backend, "replay", None) or Tape.for_migration
        try:
            tape = loader(migration_id)
        except ReplayError as exc:
            self.post_message(TapeLoaded(None, str(exc)))
        except Exception as exc:  # an unreadable folder, a bad file: a sentence, not a crash
            self.post_message(TapeLoaded(None, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(TapeLoaded(tape))

    def on_tape_loaded(self, message: TapeLoaded) -> None:
        if message.tape is None:
            self.query_one(ReplayView).empty(message.sentence)
            return
        self._loaded(message.tape)

    def _loaded(self, tape: Tape) -> None:
        self.tape = tape
        self.query_one(ReplayView).load(tape, at_end=not self.autoplay, autoplay=self.autoplay)
        notes = list(tape.problems)
        if tape.thinned:
            notes.append(f"{tape.thinned} frames left out to keep the replay in memory")
        if notes:
            note = self.query_one("#replay-note", Static)
            note.update(safe.plain("; ".join(notes)))
            note.display = True

    def action_leave(self) -> None:
        if len(self.app.screen_stack) > 1 and not isinstance(self.app, ReplayApp):
            self.app.pop_screen()
        else:
            self.app.exit()

    def palette_commands(self) -> list[tuple[str, str, object]]:
        view = self.query_one(ReplayView)
        return [
            ("Replay: play or pause", "Play the migration at the chosen speed (p)", view.action_play),
            ("Replay: start", "The first snapshot (Home)", lambda: view.action_edge(0)),
            ("Replay: end", "The last snapshot (End)", lambda: view.action_edge(1)),
        ]


class ReplayApp(App[int]):
    """`sevconsole migrations show ID` on a terminal: the replay screen alone; q or Esc quits."""

    TITLE = "sevconsole"
    BINDINGS = [Binding("q,ctrl+q", "quit", "Quit", id="quit", priority=True)]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]

    def __init__(self, migration_id: str, *, theme: str | None = None, tape: Tape | None = None) -> None:
        super().__init__()
        self.migration_id = migration_id
        self.requested_theme = theme
        self.tape = tape

    def on_mount(self) -> None:
        from sevconsole.tui.config import ConsoleConfig
        from sevconsole.tui.themes import DEFAULT, load_themes

        themes, _problems = load_themes()
        for named in themes.values():
            self.register_theme(named.theme)
        label = self.requested_theme or ConsoleConfig.load().theme or DEFAULT
        chosen = themes.get(label) or themes.get(DEFAULT)
        if chosen is not None:
            self.theme = chosen.theme.name
        self.push_screen(ReplayScreen(self.migration_id, tape=self.tape, autoplay=True))

    def format_title(self, title: str, sub_title: str) -> Content:
        return safe.plain(f"{title} — {sub_title}" if sub_title else title)


def run_replay(migration_id: str, theme: str | None = None) -> int:
    """Open the replay of `migration_id` in a terminal; 0 when it was shown."""
    return int(ReplayApp(migration_id, theme=theme).run() or 0)
