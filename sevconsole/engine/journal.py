"""The write-ahead journal of one migration, and the folder that holds it.

Each migration has a folder under `paths.migrations_dir()`:
  job.json       what the operator asked for (written by the client before the runner starts)
  journal.jsonl  the plan and every decision on which copy may run, one record a line
  runner.log     the runner's stdout and stderr
  lock           flock'd by the runner for as long as it lives (free lock: the runner is gone)
  snapshots.jsonl.gz  the Progress snapshots, for replay

A record is `{"v": 1, "seq": n, "time": t, "step": "...", "data": {...}, "sum": sha256}`, where
`sum` covers the canonical JSON of the other fields. Each append is fsync'd before the caller
acts on it. A torn last line (a crash mid-write) is named and ignored; any other bad record makes
the whole journal untrusted: it is named and never acted on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevconsole import leases, paths
from sevconsole.engine.machine import Step

VERSION = 1
MAX_JOURNAL_BYTES = 4 << 20  # a migration writes a few dozen records; more is not ours
MAX_JOB_BYTES = 1 << 20


class JournalError(Exception):
    """A journal that cannot be trusted or written; the sentence names the file and the record."""


@dataclass(frozen=True)
class Record:
    seq: int
    time: float
    step: Step
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JournalRead:
    records: tuple[Record, ...]
    problems: tuple[str, ...] = ()  # sentences: torn or corrupt records, named
    trusted: bool = True  # False: a record other than a torn last one is bad; act on nothing

    @property
    def last(self) -> Record | None:
        return self.records[-1] if self.records else None

    @property
    def step(self) -> Step | None:
        return self.last.step if self.last else None

    def first(self, step: Step) -> Record | None:
        return next((r for r in self.records if r.step == step), None)

    def data(self) -> dict[str, Any]:
        """Every record's data merged, later records winning (the plan, pids, outcome...)."""
        merged: dict[str, Any] = {}
        for record in self.records:
            merged.update(record.data)
        return merged


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def encode(record: Record) -> bytes:
    body = {"v": VERSION, "seq": record.seq, "time": record.time, "step": record.step.value,
            "data": record.data}
    body["sum"] = _checksum(body)
    return (json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def _decode(line: bytes, number: int, expect_seq: int, where: Path) -> Record:
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise JournalError(f"{where}: record {number} is not valid JSON") from None
    if not isinstance(body, dict):
        raise JournalError(f"{where}: record {number} is not a JSON object")
    if body.get("v") != VERSION:
        raise JournalError(f"{where}: record {number} has version {body.get('v')!r}, this sevconsole "
                           f"reads version {VERSION}")
    claimed = body.pop("sum", None)
    if claimed != _checksum(body):
        raise JournalError(f"{where}: record {number} fails its checksum (corrupt or edited)")
    try:
        step = Step(body["step"])
        record = Record(int(body["seq"]), float(body["time"]), step, dict(body["data"]))
    except (KeyError, ValueError, TypeError):
        raise JournalError(f"{where}: record {number} lacks a known step, seq, time or data") from None
    if record.seq != expect_seq:
        raise JournalError(f"{where}: record {number} carries seq {record.seq}, expected {expect_seq} "
                           "(records lost or reordered)")
    return record


def read(path: Path) -> JournalRead:
    """Every good record; a torn last line is named in `problems` (records before it stand)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return JournalRead(())
    except OSError as exc:
        return JournalRead((), (f"{path}: cannot be read: {exc.strerror or exc}",), trusted=False)
    if len(raw) > MAX_JOURNAL_BYTES:
        return JournalRead((), (f"{path}: larger than {MAX_JOURNAL_BYTES >> 20} MiB; not a journal of ours",),
                           trusted=False)
    lines = raw.split(b"\n")
    torn_tail = lines[-1] != b""  # the last write did not reach its newline
    lines = lines[:-1] if not torn_tail else lines
    records: list[Record] = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(_decode(line, number, len(records) + 1, path))
        except JournalError as exc:
            if number == len(lines) and torn_tail:
                return JournalRead(tuple(records), (f"{exc} (torn last record, ignored)",))
            return JournalRead(tuple(records), (str(exc),), trusted=False)
    return JournalRead(tuple(records))


class Journal:
    """Appends records to one journal file, each fsync'd before `append` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        existing = read(path)
        if not existing.trusted:
            raise JournalError("; ".join(existing.problems))
        self._seq = len(existing.records)
        self._torn = bool(existing.problems)

    def append(self, step: Step, **data: Any) -> Record:
        record = Record(self._seq + 1, time.time(), step, data)
        line = encode(record)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if self._torn:  # never glue a record to a torn one
                os.write(fd, b"\n")
                self._torn = False
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if record.seq == 1:
            _fsync_dir(self.path.parent)
        self._seq = record.seq
        return record


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the migration folders

def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def folder(migration_id: str) -> Path:
    if not migration_id or "/" in migration_id or migration_id.startswith("."):
        raise JournalError(f"{migration_id!r} is not a migration id (see `sevconsole migrations`)")
    return paths.migrations_dir() / migration_id


def create(job: dict[str, Any]) -> tuple[str, Path]:
    """A new migration folder holding `job` (fsync'd); returns its id and folder."""
    base = paths.migrations_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(20):
        migration_id = new_id()
        where = base / migration_id
        try:
            where.mkdir(mode=0o700)
        except FileExistsError:
            continue
        job = {**job, "id": migration_id}
        tmp = where / "job.json.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
            json.dump(job, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, where / "job.json")
        _fsync_dir(where)
        return migration_id, where
    raise JournalError(f"could not make a new migration folder under {base}")


def load_job(where: Path) -> dict[str, Any]:
    try:
        with open(where / "job.json", "rb") as handle:
            raw = handle.read(MAX_JOB_BYTES + 1)
        job = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise JournalError(f"{where / 'job.json'}: cannot be read ({exc})") from None
    if not isinstance(job, dict) or len(raw) > MAX_JOB_BYTES:
        raise JournalError(f"{where / 'job.json'}: not a migration job")
    return job


def lock_path(where: Path) -> Path:
    return where / "lock"


def runner_alive(where: Path) -> bool:
    """Whether a runner holds this migration's lock (a lock test, never a pid guess)."""
    return leases.held_exclusive(lock_path(where))


@contextlib.contextmanager
def hold(where: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the migration's lock (the runner for its life, recover while it reconciles).
    Yields False when another process holds it and `wait` is False."""
    fd = os.open(lock_path(where), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    """One migration as the journal shows it."""

    id: str
    folder: Path
    job: dict[str, Any]
    journal: JournalRead
    runner_alive: bool

    @property
    def step(self) -> Step | None:
        return self.journal.step

    @property
    def finished(self) -> bool:
        return self.step is not None and self.step.terminal

    @property
    def in_flight(self) -> bool:
        return self.runner_alive and not self.finished

    @property
    def unfinished(self) -> bool:
        """Needs reconciliation: not finished and no runner owns it."""
        return not self.runner_alive and not self.finished and (
            self.step is not None or not self.journal.trusted)

    @property
    def started(self) -> float:
        first = self.journal.records[0].time if self.journal.records else None
        return first if first is not None else float(self.job.get("created", 0.0))

    @property
    def vm(self) -> str:
        return str(self.job.get("vm", "?"))

    @property
    def source(self) -> str:
        return str(self.job.get("source", "?"))

    @property
    def target(self) -> str:
        return str(self.job.get("target", "?"))

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The runner's Outcome (wire form). When recover wrote the last record, what recover
        found instead (a runner's older outcome would be stale): result is its step (done,
        rolled-back, needs-operator), message its sentence, runnable, and recovered = True."""
        last = self.journal.last
        if last is not None and last.data.get("recovered"):
            return {"result": last.step.value, "message": str(last.data.get("why") or ""),
                    "runnable": [str(h) for h in last.data.get("runnable") or ()], "recovered": True}
        out = self.journal.data().get("outcome")
        return out if isinstance(out, dict) else None


def entry(migration_id: str) -> Entry:
    where = folder(migration_id)
    if not where.is_dir():
        raise JournalError(f"no migration {migration_id} (see `sevconsole migrations`)")
    try:
        job = load_job(where)
    except JournalError:
        job = {}
    alive = runner_alive(where)
    return Entry(migration_id, where, job, read(where / "journal.jsonl"), alive)


def entries() -> list[Entry]:
    """Every migration folder, newest first."""
    base = paths.migrations_dir()
    try:
        names = sorted((p.name for p in base.iterdir() if p.is_dir()), reverse=True)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(JournalError):
            out.append(entry(name))
    return out
