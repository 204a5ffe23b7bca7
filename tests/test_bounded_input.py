"""Files an operator names, read safely: regular files only (a FIFO never blocks), a size limit,
UTF-8, and one sentence when any of that fails. The shared reader, then the console's own settings
and theme files, which must be ignored with a sentence rather than stop the console."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sevconsole.boundedio import BoundedReadError, read_bounded, read_text_bounded
from sevconsole.tui.config import ConsoleConfig
from sevconsole.tui.themes import ThemeError, load_theme, load_themes


def test_reads_a_regular_file_within_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, 100, "thing") == b"x" * 100
    with pytest.raises(BoundedReadError) as info:
        read_bounded(path, 99, "thing")
    assert str(info.value) == f"thing {path}: 100 bytes, more than the 99 bytes such a file can be; is it the right file?"


def test_files_without_a_size_are_bounded_by_the_read(tmp_path: Path) -> None:
    assert len(read_bounded("/proc/self/status", 1 << 20, "status")) > 0  # says size 0, has content
    with pytest.raises(BoundedReadError, match="more than the 16 bytes"):
        read_bounded("/proc/self/status", 16, "status")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "missing"])
def test_what_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = {"fifo": tmp_path / "fifo", "device": Path("/dev/zero"), "folder": tmp_path,
            "missing": tmp_path / "none"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(BoundedReadError) as info:
        read_bounded(path, 1 << 20, "inventory")
    assert info.value.missing is (kind == "missing")
    assert str(info.value).startswith(f"inventory {path}: ")
    assert isinstance(info.value, OSError)  # older `except OSError` still catch it


def test_text_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(BoundedReadError, match=r"not UTF-8 text \(line 2, byte 6\)"):
        read_text_bounded(path, 100, "file")


@pytest.mark.parametrize("content", [
    b'theme = "caf\xe9"\n',  # latin-1, not UTF-8
    b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",  # tomllib recurses per level
    b"theme = \n",  # not TOML
])
def test_a_bad_console_toml_is_ignored_with_a_sentence(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "console.toml"
    path.write_bytes(content)
    config = ConsoleConfig.load(path)
    assert config.theme is None and len(config.problems) == 1 and str(path) in config.problems[0]


def test_console_toml_that_is_a_fifo_is_ignored_at_once(tmp_path: Path) -> None:
    path = tmp_path / "console.toml"
    os.mkfifo(path)
    config = ConsoleConfig.load(path)
    assert "FIFO" in config.problems[0] and config.problems[0].endswith("ignored")
    assert ConsoleConfig.load(tmp_path / "absent.toml") == ConsoleConfig()


def test_bad_theme_files_are_skipped_with_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text('primary = "#123456"\n')
    (tmp_path / "latin.toml").write_bytes(b'primary = "#123456"\nname = "th\xe8me"\n')
    (tmp_path / "deep.toml").write_text("primary = " + "[" * 5000 + "]" * 5000 + "\n")
    os.mkfifo(tmp_path / "fifo.toml")
    themes, problems = load_themes([tmp_path])
    assert list(themes) == ["good"]
    assert len(problems) == 3 and all(str(tmp_path) in p for p in problems)
    with pytest.raises(ThemeError, match="not UTF-8"):
        load_theme(tmp_path / "latin.toml")
