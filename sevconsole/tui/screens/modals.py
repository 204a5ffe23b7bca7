"""Small modal questions: confirmations and the unknown-host-key prompt."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from sevconsole.tui import safe
from sevconsole.tui.backend import HostKeyQuestion


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no for what cannot be undone; `y` confirms, `n`/Esc declines (k9s style).
    `title` and `body` are plain text (they carry host names), never markup."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 70; max-width: 95%; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmScreen Button { margin-left: 2; }
    """

    def __init__(self, title: str, body: str, yes: str = "Yes (y)", no: str = "No (n)") -> None:
        super().__init__()
        self.title_text, self.body, self.yes, self.no = title, body, yes, no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(safe.plain(self.title_text, "b"))
            yield Static(safe.plain(self.body), id="body")
            with Horizontal():
                yield Button(self.no, id="no")
                yield Button(self.yes, id="yes", variant="warning")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class HostKeyScreen(ModalScreen[bool]):
    """An unknown host key with its fingerprint: accept (`a`) or refuse (`n`/Esc)."""

    BINDINGS = [
        Binding("a", "answer(True)", "Accept key", id="hostkey.accept"),
        Binding("n,escape", "answer(False)", "Refuse", id="hostkey.refuse"),
    ]
    DEFAULT_CSS = """
    HostKeyScreen { align: center middle; }
    HostKeyScreen > Vertical { width: 78; max-width: 98%; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    HostKeyScreen #fingerprint { color: $accent; text-style: bold; margin: 1 0; }
    HostKeyScreen Horizontal { height: auto; align-horizontal: right; }
    HostKeyScreen Button { margin-left: 2; }
    """

    def __init__(self, question: HostKeyQuestion) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        q = self.question
        with Vertical():
            yield Static(safe.show("[b]Unknown host key for $host[/]", host=q.host))
            yield Static(safe.plain(q.message))
            yield Static(safe.show("$key_type $fingerprint", key_type=q.key_type, fingerprint=q.fingerprint),
                         id="fingerprint")
            yield Static("Compare it with the host's own `ssh-keygen -lf` output before accepting. "
                         "A key that later changes is always refused.")
            with Horizontal():
                yield Button("Refuse (n)", id="no")
                yield Button("Accept and remember (a)", id="yes", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)
