"""sev/ is pure: it never sleeps and reads no clock but the one it is given (the firmware's
`clock`); real time belongs to the lab (lab/psp.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import sevconsole.sev

SEV = Path(sevconsole.sev.__file__).parent
CLOCKS = {"sleep", "time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns"}


def _clock_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [f"{path.name}:{node.lineno} from time import {a.name}" for a in node.names]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "time"
            and node.func.attr in CLOCKS
        ):
            found.append(f"{path.name}:{node.lineno} time.{node.func.attr}()")
    return found


def test_sev_never_sleeps_or_reads_a_clock() -> None:
    modules = sorted(SEV.rglob("*.py"))
    assert any(p.parent.name == "firmware" for p in modules)
    assert [call for path in modules for call in _clock_calls(path)] == []
