"""Guide mode: placeholder until the walkthrough lands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static


class GuideScreen(Screen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Leave guide", id="guide.leave")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("guide", id="guide-text")
        yield Footer()
