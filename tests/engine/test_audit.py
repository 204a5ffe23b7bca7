"""The audit log's hash chain: intact logs verify; edited, removed and truncated lines are named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sevconsole.engine import audit

ROOT = Path(__file__).resolve().parents[2]
CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    for i in range(n):
        audit.append(path, {"vm": f"vm{i}", "outcome": "done", "bytes": i * 1000})
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _env(tmp_path: Path) -> dict[str, str]:
    return {"SEVCONSOLE_DATA_DIR": str(tmp_path / "data"), "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config"),
            "PATH": "/usr/bin:/bin"}


def _cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sevconsole", "audit", *args], capture_output=True,
                          cwd=ROOT, env=_env(tmp_path), timeout=timeout)


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
    env = _env(tmp_path)
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
    assert main(["audit", "show", "--file", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["audit", "show"]) == 0  # the console's own log, not written yet
    assert "no migrations recorded yet" in capsys.readouterr().out


def test_reordered_lines_are_named(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and verdict.line == 2


def test_cli_verify_refuses_a_missing_or_empty_file(tmp_path: Path) -> None:
    missing = _cli(tmp_path, "verify", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and missing.stdout == b""
    assert b"nope.jsonl: no such file" in missing.stderr and len(missing.stderr.splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = _cli(tmp_path, "verify", "--file", str(empty))
    assert result.returncode == 2 and b"is empty" in result.stderr


def test_cli_refuses_devices_and_fifos_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in ("/dev/zero", str(fifo)):
        for action in ("verify", "show"):
            result = _cli(tmp_path, action, "--file", target, timeout=20)
            assert result.returncode == 2, (target, action, result.stderr)
            assert b"not a regular file" in result.stderr and b"Traceback" not in result.stderr


def test_torn_last_line_is_reported_then_closed_by_the_next_append(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    with open(path, "ab") as log:  # a crash in the middle of the fourth write
        log.write(b'{"bytes":3000,"mac":"ab12","outcome":"do')
    verdict = audit.verify(path)
    assert verdict.ok and verdict.lines == 4
    assert any(note.startswith("line 4: torn") for note in verdict.notes)
    entry = audit.append(path, {"vm": "after", "outcome": "done"})
    assert entry["seq"] == 5 and entry["prev"] == audit.line_hash(_lines(path)[3])
    assert _lines(path)[4].startswith('{"') and json.loads(_lines(path)[4])["vm"] == "after"
    verdict = audit.verify(path)
    assert verdict.ok and verdict.lines == 5 and verdict.keyed
    assert any(note.startswith("line 4: torn") and "closed it" in note for note in verdict.notes)
    audit.append(path, {"vm": "later", "outcome": "done"})
    assert audit.verify(path).ok
    # the torn line is part of the chain: changing it is an edit like any other
    lines = _lines(path)
    lines[3] = lines[3].replace("do", "xx")
    path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and verdict.line == 4 and "edited" in verdict.reason


def test_cli_verify_names_the_torn_line(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    with open(path, "ab") as log:
        log.write(b'{"bytes":')
    result = _cli(tmp_path, "verify", "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert b"line 3: torn" in result.stderr and b"3 lines, hash chain intact" in result.stdout


def test_the_key_is_made_0600_and_every_line_carries_a_mac(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    key = audit.key_file()
    assert key.parent == tmp_path / "config"  # the config folder, apart from the log's
    assert key.stat().st_mode & 0o777 == 0o600
    entries = [json.loads(line) for line in _lines(path)]
    assert all(len(e["mac"]) == 64 for e in entries)
    assert "mac" in json.loads(audit.head_file(path).read_text())
    assert audit.verify(path).keyed


def _rewrite_without_key(path: Path, change: dict, keep_macs: bool) -> None:
    """What someone who can write the data folder, but lacks the key, can do: a consistent chain."""
    prev = audit.GENESIS
    out = []
    for line in _lines(path):
        entry = {**json.loads(line), **change, "prev": prev}
        if not keep_macs:
            entry.pop("mac")
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        out.append(text)
        prev = audit.line_hash(text)
    path.write_text("\n".join(out) + "\n")
    audit.head_file(path).write_text(json.dumps({"lines": len(out), "last": prev}) + "\n")


@pytest.mark.parametrize("keep_macs", [True, False])
def test_a_full_rewrite_needs_the_key(tmp_path: Path, keep_macs: bool) -> None:
    path = _log(tmp_path, 3)
    _rewrite_without_key(path, {"outcome": "failed"}, keep_macs)
    verdict = audit.verify(path, key=None)  # without the key only the chain counts: it holds
    assert verdict.ok
    verdict = audit.verify(path)
    assert not verdict.ok
    assert ("MAC does not match" in verdict.reason) if keep_macs else ("no MAC" in verdict.reason)


def test_the_head_needs_the_key_too(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    lines = _lines(path)
    path.write_text("\n".join(lines[:2]) + "\n")  # drop the last line, then fix the head up
    audit.head_file(path).write_text(json.dumps({"lines": 2, "last": audit.line_hash(lines[1])}) + "\n")
    verdict = audit.verify(path)
    assert not verdict.ok and "head file's MAC" in verdict.reason


def test_without_the_key_macs_are_said_to_be_unchecked(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    audit.key_file().unlink()
    verdict = audit.verify(path)
    assert verdict.ok and not verdict.keyed
    assert any("not checked" in note for note in verdict.notes)


def test_lines_from_before_the_key_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for i in range(2):
        audit.append(path, {"vm": f"old{i}"}, key=None)
    assert not audit.key_file().exists()
    audit.append(path, {"vm": "new"})  # makes the key
    verdict = audit.verify(path)
    assert verdict.ok and verdict.keyed and any("lines 1-2 carry no MAC" in n for n in verdict.notes)


def test_an_unwritable_log_is_one_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(audit.AuditError, match=r"cannot be written .*SEVCONSOLE_DATA_DIR"):
        audit.append(blocker / "audit.jsonl", {"vm": "a"})
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(audit.AuditError, match="not a regular file"):
        audit.append(fifo, {"vm": "a"})
    assert issubclass(audit.AuditError, OSError)  # the engine's `except OSError` still holds


def test_show_escapes_control_characters_and_survives_binary(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit.append(path, {"vm": "evil\x1b]0;PWNED\x07\x1b[2J", "source": "a\x9bb", "target": "t",
                        "outcome": "refused"})
    text = _cli(tmp_path, "show", "--file", str(path))
    assert text.returncode == 0 and b"\\x1b]0;PWNED\\x07" in text.stdout
    raw = _cli(tmp_path, "show", "--json", "--file", str(path))
    assert raw.returncode == 0 and json.loads(raw.stdout)["vm"].startswith("evil\x1b")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4 + b"\n\x1b[2J\xff\n")
    shown = _cli(tmp_path, "show", "--file", str(binary))
    assert shown.returncode == 0 and b"(unreadable)" in shown.stdout and b"Traceback" not in shown.stderr
    for result in (text, raw, shown):
        assert not CONTROL_BYTES.search(result.stdout.replace(b"\n", b""))
    verdict = _cli(tmp_path, "verify", "--file", str(binary))
    assert verdict.returncode == 1 and b"line 1: not valid JSON" in verdict.stderr
