from __future__ import annotations

import subprocess
import sys

from sevconsole import __version__
from sevconsole.cli import build_parser


def test_version_and_help_run_as_module() -> None:
    out = subprocess.run([sys.executable, "-m", "sevconsole", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"sevconsole {__version__}"
    out = subprocess.run([sys.executable, "-m", "sevconsole", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "Live-migrate AMD SEV" in out.stdout and "--inventory" in out.stdout


def test_parser_defaults_to_console() -> None:
    args = build_parser().parse_args([])
    assert args.func.__name__ == "_run_console"
