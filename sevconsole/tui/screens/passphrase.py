"""The passphrase of a protected SSH identity, asked in a modal when the ssh-agent does not hold
the key (hosts/passphrases.py decides when to ask; this is only the console's way of asking)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from sevconsole.tui import safe

ANSWER_TIMEOUT_S = 100.0  # sshd closes an unauthenticated connection after 120 s (LoginGraceTime)


class PassphraseScreen(ModalScreen["str | None"]):
    """Enter submits, Esc gives no passphrase (the host is then reported as refused)."""

    BINDINGS = [Binding("escape", "skip", "No passphrase", id="passphrase.skip")]
    DEFAULT_CSS = """
    PassphraseScreen { align: center middle; }
    PassphraseScreen > Vertical { width: 78; max-width: 98%; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    PassphraseScreen Input { margin: 1 0; }
    PassphraseScreen Horizontal { height: auto; align-horizontal: right; }
    PassphraseScreen Button { margin-left: 2; }
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(safe.show("[b]Passphrase for $path[/]", path=str(self.path)))
            yield Static("The ssh-agent does not hold this key. The passphrase is kept in memory for "
                         "this session only (and handed to the migrations it starts).")
            yield Input(password=True, id="passphrase")
            with Horizontal():
                yield Button("Skip (Esc)", id="skip")
                yield Button("Unlock (Enter)", id="unlock", variant="warning")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value if event.button.id == "unlock" else None)

    def action_skip(self) -> None:
        self.dismiss(None)


def asker_for(app: App[Any]) -> Callable[[Path], str | None]:
    """A hosts.passphrases asker for SSH work in thread workers: shows the modal on the app's
    loop and waits for the answer (None after ANSWER_TIMEOUT_S or when the app is gone)."""

    def ask(path: Path) -> str | None:
        answered = threading.Event()
        result: list[str | None] = [None]

        def done(value: str | None) -> None:
            result[0] = value
            answered.set()

        try:
            app.call_from_thread(app.push_screen, PassphraseScreen(path), done)
        except RuntimeError:  # called on the app's own thread, or the app is not running
            return None
        answered.wait(ANSWER_TIMEOUT_S)
        return result[0]

    return ask
