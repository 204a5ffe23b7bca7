"""The audit log's hash chain: intact logs verify; edited, removed and truncated lines are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sevconsole.engine import audit

ROOT = Path(__file__).resolve().parents[2]


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    for i in range(n):
        audit.append(path, {"vm": f"vm{i}", "outcome": "done", "bytes": i * 1000})
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_intact_chain_verifies(tmp_path: Path) -> None:
    path = _log(tmp_path)
    verdict = audit.verify(path)
    assert verdict.ok and verdict.lines == 5
    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == audit.GENESIS
    assert entries[3]["prev"] == audit.line_hash(_lines(path)[2])


@pytest.mark.parametrize("victim", [1, 3, 5])
def test_edited_line_is_named(tmp_path: Path, victim: int) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[victim - 1] = lines[victim - 1].replace('"outcome":"done"', '"outcome":"fail"')
    path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and verdict.line == victim and "edited" in verdict.reason


def test_removed_line_is_named(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and verdict.line == 3 and "removed" in verdict.reason


def test_removed_last_line_is_caught(tmp_path: Path) -> None:
    path = _log(tmp_path)
    path.write_text("\n".join(_lines(path)[:-1]) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and verdict.line == 5 and "removed" in verdict.reason


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    env = {"SEVCONSOLE_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "sevconsole", "audit", "verify", "--file", str(path)],
                        capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "3 lines" in ok.stdout
    lines = _lines(path)
    lines[1] = lines[1].replace("vm1", "vmX")
    path.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, "-m", "sevconsole", "audit", "verify", "--file", str(path)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 1 and "line 2" in bad.stdout + bad.stderr


def test_cli_show_prints_the_last_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sevconsole.cli import main

    path = tmp_path / "audit.jsonl"
    for i in range(4):
        audit.append(path, {"vm": f"vm{i}", "source": "a", "target": "b", "outcome": "done",
                            "operator": "op", "time": "2026-01-01T00:00:00", "bytes": 2_000_000,
                            "duration_s": 1.5})
    assert main(["audit", "show", "--file", str(path), "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "vm2 a -> b: done (2.0 MB, 1.5 s)" in out[0] and out[1].lstrip().startswith("4 ")
    assert main(["audit", "show", "--file", str(path), "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vm"] == "vm3"
    assert main(["audit", "show", "--file", str(tmp_path / "none.jsonl")]) == 0
    assert "no migrations recorded yet" in capsys.readouterr().out
