"""Host strings on screen: our own markup templates, host values inserted as plain text.

Textual reads markup in every `str` given to Static, DataTable cells, Tree labels, RichLog and
notify. A VM named `x[/` raises MarkupError (the console dies), one named `[b]` restyles the
screen, and `escape()` does not cover every case. So host data never becomes markup: a screen
writes a constant template and passes host strings as `$name` values, which Content inserts
verbatim, with control characters shown as visible `\\xNN` (a raw ESC would reach the terminal).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.text import Text
from textual.content import Content

from sevconsole.textsafe import escape_controls

if TYPE_CHECKING:
    from textual.app import App


def show(template: str, /, **values: object) -> Content:
    """`template` is our markup (`[$error]...[/]`, `$name` placeholders); `values` are host
    strings, never parsed: `show("[b]$vm[/] on $host", vm=vm.name, host=report.name)`."""
    return Content.from_markup(template, **{k: escape_controls(v) for k, v in values.items()})


def plain(value: object, style: str = "") -> Content:
    """One host string on its own, optionally in one style (`$error`, `dim`)."""
    return Content.styled(escape_controls(value), style)


def lines(parts: Iterable[Content]) -> Content:
    return Content("\n").join(parts)


_VARIABLE = re.compile(r"\$([a-z][a-z0-9-]*)")


_VARIABLES: weakref.WeakKeyDictionary[App[object], tuple[object, dict[str, str]]] = weakref.WeakKeyDictionary()


def css_variables(app: App[object]) -> dict[str, str]:
    """The theme's variables, computed once per theme: `get_css_variables` builds every colour of
    the design each call (about a millisecond: a table of a hundred rows took a second)."""
    key = (app.theme, app.dark if hasattr(app, "dark") else None, id(app.get_theme(app.theme)))
    cached = _VARIABLES.get(app)
    if cached is None or cached[0] != key:
        cached = (key, app.get_css_variables())
        _VARIABLES[app] = cached
    return cached[1]


def rich(app: App[object], content: Content) -> Text:
    """Content as a Rich Text for widgets that take Rich renderables only (DataTable cells,
    RichLog): the theme's `$variables` resolved to colours now, the text never parsed."""
    variables = css_variables(app)
    text = Text(content.plain, end="")
    for span in content.spans:
        style = span.style
        if isinstance(style, str):
            text.stylize(_VARIABLE.sub(lambda m: variables.get(m.group(1), "default"), style),
                         span.start, span.end)
        else:
            text.stylize(style.rich_style, span.start, span.end)
    return text


def cell(app: App[object], template: str, /, **values: object) -> Text:
    """A DataTable cell: `show(template, **values)` as a Rich Text in the current theme."""
    return rich(app, show(template, **values))
