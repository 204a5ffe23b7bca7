"""The transfer rate over time as a bar chart in eighth blocks, scaled to its peak.

Unlike a sparkline it has an empty state: before any byte moves it says so instead of drawing
a flat line of full blocks (a sparkline of equal values fills every cell).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from sevconsole.tui import format as fmt

BLOCKS = " ▁▂▃▄▅▆▇█"


def columns(data: Sequence[float], width: int) -> list[float]:
    """One value per column: few samples are widened to fill the width (a second-long migration
    has a handful), many are folded (max per bucket)."""
    if width <= 0 or not data:
        return []
    if len(data) <= width:
        per = width // len(data)
        return [value for value in data for _ in range(per)]
    out = []
    for i in range(width):
        lo, hi = len(data) * i // width, len(data) * (i + 1) // width
        out.append(max(data[lo:max(hi, lo + 1)]))
    return out


def bars(values: Sequence[float], height: int, peak: float) -> list[str]:
    """Rows top to bottom; each value fills height*8 eighths in proportion to `peak`."""
    rows = [[" "] * len(values) for _ in range(height)]
    for x, value in enumerate(values):
        eighths = 0 if peak <= 0 else round(max(0.0, value) / peak * height * 8)
        if value > 0:
            eighths = max(1, eighths)  # anything that moved shows
        for level in range(height):
            fill = max(0, min(8, eighths - level * 8))
            rows[height - 1 - level][x] = BLOCKS[fill]
    return ["".join(r) for r in rows]


class RateChart(Widget):
    """`data`: bytes/s, oldest first (Progress.rate_history)."""

    DEFAULT_CSS = """
    RateChart { height: 3; }
    RateChart > .ratechart--bar { color: $accent; }
    RateChart > .ratechart--label { color: $text-muted; }
    """
    COMPONENT_CLASSES = {"ratechart--bar", "ratechart--label"}

    data: reactive[tuple[float, ...]] = reactive((), layout=False)

    def render(self) -> Text:
        width, height = self.size.width, max(1, self.size.height)
        label_style = self.get_component_rich_style("ratechart--label", partial=True)
        values = columns(self.data, width)
        peak = max(values, default=0.0)
        if peak <= 0:
            text = Text(end="")
            middle = (height - 1) // 2
            for y in range(height):
                if y:
                    text.append("\n")
                if y == middle:
                    text.append("no bytes moved yet".center(width)[:width], label_style)
            return text
        bar_style = self.get_component_rich_style("ratechart--bar", partial=True)
        rows = bars(values, height, peak)
        label = f"peak {fmt.rate(peak)}"
        text = Text(end="")
        for y, row in enumerate(rows):
            if y:
                text.append("\n")
            if y == 0:
                # the scale in the top row's blank cells, left or right; the bars keep their place
                top, n = row.ljust(width), len(label) + 1
                if not top[:n].strip():
                    text.append(label, label_style)
                    text.append(top[len(label):], bar_style)
                    continue
                if not top[-n:].strip():
                    text.append(top[:-len(label)], bar_style)
                    text.append(label, label_style)
                    continue
            text.append(row, bar_style)
        return text
