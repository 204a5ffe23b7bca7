"""Colour themes: TOML files holding Textual Theme arguments, from the package's builtin_themes/
folder and the user's config folder (a user file of the same label wins)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.theme import Theme

from sevconsole import paths
from sevconsole.boundedio import CONFIG_LIMIT, BoundedReadError, read_text_bounded

# Package data (pyproject.toml), so a checkout and an installed copy read the same files.
PROJECT_THEMES = Path(__file__).resolve().parent / "builtin_themes"
DEFAULT = "dark"
THEME_KEYS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground",
              "background", "surface", "panel", "boost", "dark", "luminosity_spread", "text_alpha")


class ThemeError(ValueError):
    """A theme file that cannot be used; says which file and what is wrong."""


@dataclass(frozen=True)
class NamedTheme:
    label: str  # what the operator types: dark, light, high-contrast
    theme: Theme
    path: Path


def theme_dirs() -> list[Path]:
    return [PROJECT_THEMES, paths.config_dir() / "themes"]


def load_theme(path: Path) -> NamedTheme:
    try:
        data = tomllib.loads(read_text_bounded(path, CONFIG_LIMIT, "theme file"))
    except BoundedReadError as exc:
        raise ThemeError(str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ThemeError(f"theme file {path} cannot be read: {exc}") from None
    except RecursionError:
        raise ThemeError(f"theme file {path}: nested too deeply") from None
    if "primary" not in data:
        raise ThemeError(f"theme file {path} has no 'primary' colour")
    label = str(data.get("label") or path.stem)
    args = {k: data[k] for k in THEME_KEYS if k in data}
    try:
        theme = Theme(name=str(data.get("name") or f"sevconsole-{label}"), **args)
    except (TypeError, ValueError) as exc:
        raise ThemeError(f"theme file {path}: {exc}") from exc
    return NamedTheme(label, theme, path)


def load_themes(dirs: list[Path] | None = None) -> tuple[dict[str, NamedTheme], list[str]]:
    """All themes by label, and a sentence for each file that was skipped."""
    found: dict[str, NamedTheme] = {}
    problems: list[str] = []
    for folder in dirs if dirs is not None else theme_dirs():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                named = load_theme(path)
            except ThemeError as exc:
                problems.append(str(exc))
                continue
            found[named.label] = named
    return found, problems
