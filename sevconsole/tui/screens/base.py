"""The console's screens' base: a focus change repaints what changed, not the whole screen.

Textual's Screen repaints itself whole on every focus change (its `focused` reactive repaints):
the compositor then renders every line of the screen again, ~20 ms on the fleet overview, for
a change the blurred and the focused widget already repaint themselves (their :focus styles).
"""

from __future__ import annotations

from textual.reactive import Reactive
from textual.screen import Screen
from textual.widget import Widget


class ConsoleScreen(Screen[None]):
    focused: Reactive[Widget | None] = Reactive(None, repaint=False)
