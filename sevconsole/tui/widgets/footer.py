"""A Footer that is rebuilt only when the keys it shows change.

Textual's Footer recomposes (a widget per key, then a new layout) whenever the active bindings
may have changed, which is every focus change: moving between the overview's four panels, whose
keys are the same, cost tens of milliseconds each for nothing.
"""

from __future__ import annotations

from typing import Any

from textual.screen import Screen
from textual.widgets import Footer


class QuickFooter(Footer):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._shown: tuple[tuple[str, str, bool], ...] | None = None

    def bindings_changed(self, screen: Screen[Any]) -> None:
        if self.is_attached and screen is self.screen and screen.app.app_focus:
            shown = tuple((binding.key, binding.description, enabled)
                          for _node, binding, enabled, _tip in screen.active_bindings.values() if binding.show)
            if shown == self._shown and self._bindings_ready:
                return
            self._shown = shown
        super().bindings_changed(screen)
