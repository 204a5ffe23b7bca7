"""Replay: a finished migration's panels at any moment, with a time scrubber.

`ReplayView` holds a MigrationView and a `Scrubber`; `load(tape)` gives it an engine Tape
(engine/replay.py). Keys (on the view, which keeps the focus): left/right a frame, shift+left/
right a second, home/end, p play/pause, -/+ speed. A frame is decoded (page map included) by the
tape; a large one in a thread worker, so holding a key never blocks the screen.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.timer import Timer
from textual.widget import Widget
from textual.worker import get_current_worker

from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.replay import Tape
from sevconsole.textsafe import escape_controls
from sevconsole.tui import format as fmt
from sevconsole.tui.widgets.migration_view import MigrationView

SPEEDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FPS = 20
SYNC_PAGES = 1 << 20  # frames of up to this many pages are decoded on the spot (a few ms)
PHASE_STYLES = {
    Phase.PREFLIGHT: "scrubber--setup", Phase.CONNECTING: "scrubber--setup", Phase.SEND_START: "scrubber--setup",
    Phase.PRECOPY: "scrubber--precopy", Phase.STOP_AND_COPY: "scrubber--stop", Phase.FINISHING: "scrubber--stop",
    Phase.DONE: "scrubber--done", Phase.FAILED: "scrubber--failed", Phase.CANCELLED: "scrubber--failed",
}


def default_speed(duration_s: float) -> float:
    """A replay lasts about ten seconds at first: a one-second migration plays at 0.1x."""
    if duration_s <= 0:
        return 1.0
    wanted = duration_s / 10.0
    return min(SPEEDS, key=lambda s: abs(s - wanted))


class Scrubber(Widget):
    """Phase bands across the width with the position marked, and the time and keys beneath."""

    DEFAULT_CSS = """
    Scrubber { height: 2; padding: 0 1; }
    Scrubber > .scrubber--setup { color: $secondary; }
    Scrubber > .scrubber--precopy { color: $accent; }
    Scrubber > .scrubber--stop { color: $warning; }
    Scrubber > .scrubber--done { color: $success; }
    Scrubber > .scrubber--failed { color: $error; }
    Scrubber > .scrubber--later { color: $panel-lighten-2; }
    Scrubber > .scrubber--cursor { color: $text; text-style: bold; }
    Scrubber > .scrubber--muted { color: $text-muted; }
    """
    COMPONENT_CLASSES = {*PHASE_STYLES.values(), "scrubber--later", "scrubber--cursor", "scrubber--muted"}

    position: reactive[float] = reactive(0.0)
    playing: reactive[bool] = reactive(False)
    speed: reactive[float] = reactive(1.0)

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.tape: Tape | None = None
        self.index = 0
        self.message = "loading the replay…"  # shown while there is no tape

    def render(self) -> Text:
        width = self.size.width
        muted = self.get_component_rich_style("scrubber--muted", partial=True)
        tape = self.tape
        if tape is None or width < 4:
            return Text(self.message, style=muted, end="")
        start, span = tape.start_s, max(tape.duration_s, 1e-9)
        cursor_x = 0 if tape.duration_s <= 0 else round((self.position - start) / span * (width - 1))
        bar = Text(end="")
        later = self.get_component_rich_style("scrubber--later", partial=True)
        for x in range(width):
            t = start + span * (x + 0.5) / width
            phase = tape.frames[tape.index_at(t)].phase
            if x == cursor_x:
                bar.append("●", self.get_component_rich_style("scrubber--cursor", partial=True))
            elif x < cursor_x:
                bar.append("━", self.get_component_rich_style(PHASE_STYLES[phase], partial=True))
            else:
                bar.append("─", later)
        frame = tape.frames[self.index]
        phase_text = frame.phase.value + (f" pass {frame.pass_number}" if frame.pass_number else "")
        state = "▶" if self.playing else "⏸"
        info = (f"{state} {fmt.duration(self.position)} of {fmt.duration(tape.times[-1])} · "
                f"{self.index + 1}/{len(tape)} · {phase_text} · {self.speed:g}×")
        keys = "   ←/→ frame  ⇧←/→ 1 s  Home/End  p play  -/+ speed"
        line = Text(info, end="")
        if len(info) + len(keys) <= width:
            line.append(keys, muted)
        return Text("\n", end="").join([bar, line])


class ReplayView(Vertical, can_focus=True):
    """A MigrationView driven by a tape instead of a running migration."""

    BINDINGS = [
        Binding("left", "step(-1)", "Frame back", id="replay.back", show=False),
        Binding("right", "step(1)", "Frame on", id="replay.on", show=False),
        Binding("shift+left", "jump(-1.0)", "Second back", id="replay.second_back", show=False),
        Binding("shift+right", "jump(1.0)", "Second on", id="replay.second_on", show=False),
        Binding("home", "edge(0)", "Start", id="replay.start", show=False),
        Binding("end", "edge(1)", "End", id="replay.end", show=False),
        Binding("p", "play", "Play/pause", id="replay.play"),
        Binding("minus", "speed(-1)", "Slower", id="replay.slower", show=False),
        Binding("plus,equals_sign", "speed(1)", "Faster", id="replay.faster", show=False),
        Binding("f", "tab('tab-firmware')", "Firmware", id="replay.firmware", show=False),
        Binding("e", "tab('tab-events')", "Events", id="replay.events", show=False),
    ]
    DEFAULT_CSS = """
    ReplayView { height: 1fr; }
    ReplayView:focus-within > Scrubber { background: $boost; }
    """

    class FrameShown(Message):
        """A frame was drawn (tests and the guide wait for it)."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.tape: Tape | None = None
        self.index = -1  # the frame drawn
        self.wanted = -1  # the frame asked for (a large one is decoded in a worker)
        self._timer: Timer | None = None
        self._clock = 0.0

    def compose(self) -> ComposeResult:
        yield MigrationView()
        yield Scrubber()

    def on_mount(self) -> None:
        # the keys stay with the view: tabs and scrolling panels would take left/right otherwise
        for widget in self.query("Tabs, FirmwarePanel, RichLog"):
            widget.can_focus = False

    # -- loading
    def load(self, tape: Tape, *, at_end: bool = True, autoplay: bool = False) -> None:
        self._pause()
        self.tape, self.wanted = tape, -1
        self.query_one(MigrationView).mode = " (replay)"
        scrubber = self.query_one(Scrubber)
        scrubber.tape = tape
        scrubber.speed = default_speed(tape.duration_s)
        self.show(len(tape) - 1 if at_end else 0)
        if autoplay:
            self.action_play()

    def show_live(self, progress: Progress) -> None:
        """Draw a snapshot of a running migration (the guide, before its tape exists)."""
        if self.tape is not None:
            self.go_live()
        self.query_one(MigrationView).apply(progress)

    def go_live(self, message: str = "live: the replay follows once the migration ends") -> None:
        """Forget the tape: the panels follow a running migration again."""
        self._pause()
        self.tape, self.index, self.wanted = None, -1, -1
        self.query_one(MigrationView).mode = ""
        scrubber = self.query_one(Scrubber)
        scrubber.tape = None
        scrubber.message = message
        scrubber.refresh()

    @property
    def position(self) -> float:
        return self.query_one(Scrubber).position

    def show(self, index: int, position: float | None = None) -> None:
        tape = self.tape
        if tape is None:
            return
        index = max(0, min(len(tape) - 1, index))
        scrubber = self.query_one(Scrubber)
        scrubber.index = index
        scrubber.position = tape.times[index] if position is None else position
        scrubber.refresh()
        if index == self.wanted:
            return
        self.wanted = index
        frame = tape.frames[index]
        if frame.bytes_total // 4096 <= SYNC_PAGES:
            self._draw(index, tape.progress(index))
        else:
            self._decode(tape, index)

    @work(thread=True, exclusive=True, group="replay-decode", exit_on_error=False)
    def _decode(self, tape: Tape, index: int) -> None:
        progress = tape.progress(index)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._drawn_later, tape, index, progress)

    def _drawn_later(self, tape: Tape, index: int, progress: Progress) -> None:
        if tape is self.tape and index == self.wanted:
            self._draw(index, progress)

    def _draw(self, index: int, progress: Progress) -> None:
        self.index = index
        self.query_one(MigrationView).apply(progress)
        self.post_message(self.FrameShown(index))

    # -- keys
    def action_step(self, delta: int) -> None:
        self._pause()
        self.show(max(self.wanted, 0) + delta)

    def action_jump(self, seconds: float) -> None:
        if self.tape is None:
            return
        self._pause()
        target = self.position + seconds
        self.show(self.tape.index_at(target), max(self.tape.start_s, min(self.tape.times[-1], target)))

    def action_edge(self, end: int) -> None:
        if self.tape is None:
            return
        self._pause()
        self.show(len(self.tape) - 1 if end else 0)

    def action_speed(self, step: int) -> None:
        scrubber = self.query_one(Scrubber)
        index = min(range(len(SPEEDS)), key=lambda i: abs(SPEEDS[i] - scrubber.speed))
        scrubber.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, index + step))]

    def action_play(self) -> None:
        tape = self.tape
        if tape is None:
            return
        if self._timer is not None:
            self._pause()
            return
        if self.wanted >= len(tape) - 1:  # at the end: play from the start
            self.show(0)
        self._clock = time.monotonic()
        self._timer = self.set_interval(1 / FPS, self._tick)
        self.query_one(Scrubber).playing = True

    def _pause(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.query_one(Scrubber).playing = False

    def _tick(self) -> None:
        tape = self.tape
        if tape is None:
            self._pause()
            return
        now = time.monotonic()
        scrubber = self.query_one(Scrubber)
        position = self.position + (now - self._clock) * scrubber.speed
        self._clock = now
        if position >= tape.times[-1]:
            self.show(len(tape) - 1)
            self._pause()
            return
        self.show(tape.index_at(position), position)

    def action_tab(self, tab: str) -> None:
        self.query_one("TabbedContent").active = tab  # type: ignore[attr-defined]

    @property
    def playing(self) -> bool:
        return self._timer is not None

    def empty(self, sentence: str) -> None:
        """No tape: say why where the scrubber would be (the panels keep what they show)."""
        scrubber = self.query_one(Scrubber)
        scrubber.tape = None
        scrubber.message = escape_controls(f"no replay: {sentence}")
        scrubber.refresh()
