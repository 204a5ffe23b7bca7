"""The console's own settings file (config_dir()/console.toml): theme and key remapping.

    theme = "light"
    [keys]            # binding id = keys, comma-separated (Textual keymap)
    reprobe = "r,f5"
    screenshot = "f8"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sevconsole import paths
from sevconsole.boundedio import CONFIG_LIMIT, BoundedReadError, read_text_bounded

FILE_NAME = "console.toml"


@dataclass(frozen=True)
class ConsoleConfig:
    theme: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # sentences about what was ignored, shown as a notification

    @staticmethod
    def path() -> Path:
        return paths.config_dir() / FILE_NAME

    @classmethod
    def load(cls, path: Path | None = None) -> ConsoleConfig:
        path = path or cls.path()
        try:
            data = tomllib.loads(read_text_bounded(path, CONFIG_LIMIT, "console settings"))
        except BoundedReadError as exc:
            return cls() if exc.missing else cls(problems=(f"{exc}; ignored",))
        except tomllib.TOMLDecodeError as exc:
            return cls(problems=(f"{path} was ignored: {exc}",))
        except RecursionError:
            return cls(problems=(f"{path} was ignored: nested too deeply",))
        problems = []
        theme = data.get("theme")
        if theme is not None and not isinstance(theme, str):
            problems.append(f"{path}: theme must be a name like \"dark\"; ignored")
            theme = None
        keys: dict[str, str] = {}
        raw = data.get("keys", {})
        if not isinstance(raw, dict):
            problems.append(f"{path}: [keys] must be a table of binding id = \"key,key\"; ignored")
            raw = {}
        for binding, value in raw.items():
            if isinstance(value, str) and value.strip():
                keys[str(binding)] = value.replace(" ", "")
            else:
                problems.append(f"{path}: keys.{binding} must be a string such as \"f5\"; ignored")
        return cls(theme=theme, keys=keys, problems=tuple(problems))

    def with_theme(self, theme: str) -> ConsoleConfig:
        return ConsoleConfig(theme=theme, keys=dict(self.keys))

    def save(self, path: Path | None = None) -> Path:
        path = path or self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"theme = {_quote(self.theme)}"] if self.theme else []
        if self.keys:
            lines += ["", "[keys]"] + [f"{_quote(k)} = {_quote(v)}" for k, v in sorted(self.keys.items())]
        path.write_text("\n".join(lines) + "\n")
        return path


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
