"""The write-ahead journal: checksummed, versioned records; torn and corrupt ones named, never acted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sevconsole.engine import journal
from sevconsole.engine.machine import Step


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEVCONSOLE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = journal.Journal(path)
    j.append(Step.PLANNED, vm="web", sev=True)
    j.append(Step.TARGET_LAUNCHED, target_pid=7)
    read = journal.read(path)
    assert read.trusted and not read.problems
    assert [r.step for r in read.records] == [Step.PLANNED, Step.TARGET_LAUNCHED]
    assert read.data() == {"vm": "web", "sev": True, "target_pid": 7}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_torn_last_record_is_named_and_ignored(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal.Journal(path).append(Step.PLANNED, vm="web")
    whole = journal.encode(journal.Record(2, 1.0, Step.SEND_FINISHED, {}))
    with open(path, "ab") as out:
        out.write(whole[: len(whole) // 2])  # a crash mid-write
    read = journal.read(path)
    assert read.trusted and read.step == Step.PLANNED
    assert "record 2" in read.problems[0] and "torn" in read.problems[0]
    # the next append starts a fresh line, and the torn record stays ignored
    journal.Journal(path).append(Step.ROLLBACK_CHOSEN)
    again = journal.read(path)
    assert not again.trusted  # a bad record in the middle is no longer a torn tail
    assert "record 2" in again.problems[0]


def test_corrupt_record_is_never_acted_on(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = journal.Journal(path)
    j.append(Step.PLANNED, vm="web")
    j.append(Step.STREAMING)
    lines = path.read_bytes().splitlines(keepends=True)
    body = json.loads(lines[0])
    body["data"]["vm"] = "vault"  # edited, checksum left alone
    lines[0] = (json.dumps(body) + "\n").encode()
    path.write_bytes(b"".join(lines))
    read = journal.read(path)
    assert not read.trusted and read.records == ()
    assert "record 1 fails its checksum" in read.problems[0]
    with pytest.raises(journal.JournalError, match="checksum"):
        journal.Journal(path)


def test_reordered_and_future_version_records(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    a = journal.encode(journal.Record(1, 1.0, Step.PLANNED, {}))
    b = journal.encode(journal.Record(2, 2.0, Step.STREAMING, {}))
    path.write_bytes(b + a)
    assert "expected 1" in journal.read(path).problems[0]
    body = json.loads(a)
    body["v"] = 99
    path.write_bytes((json.dumps(body) + "\n").encode() + b)
    assert "version 99" in journal.read(path).problems[0]


def test_entries_and_the_runner_lock(state: Path) -> None:
    migration_id, where = journal.create({"vm": "web", "source": "a", "target": "b", "where": {}})
    entry = journal.entry(migration_id)
    assert entry.vm == "web" and not entry.runner_alive and not entry.unfinished  # nothing recorded yet
    journal.Journal(where / "journal.jsonl").append(Step.STREAMING)
    assert journal.entry(migration_id).unfinished
    # another process holds the lock: the runner is alive, the entry is in flight
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,os,sys;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
                               "fcntl.flock(fd,fcntl.LOCK_EX);print('held',flush=True);sys.stdin.read()",
                               str(journal.lock_path(where))], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert journal.entry(migration_id).in_flight
        with journal.hold(where) as held:
            assert held is False
    finally:
        holder.kill()
        holder.wait()
    assert journal.entry(migration_id).unfinished  # its holder died with its lock
    assert [e.id for e in journal.entries()] == [migration_id]


def test_bad_ids_are_sentences() -> None:
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(journal.JournalError):
            journal.folder(bad)
    with pytest.raises(journal.JournalError, match="no migration"):
        journal.entry("20990101-000000-0000")


def test_job_file_is_private(state: Path) -> None:
    _, where = journal.create({"vm": "web"})
    assert os.stat(where / "job.json").st_mode & 0o077 == 0
    assert os.stat(where).st_mode & 0o077 == 0
