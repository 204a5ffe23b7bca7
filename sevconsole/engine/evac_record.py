"""The evacuation record: what an evacuation planned and did, so a re-run continues it.

One JSON file per evacuation, `paths.state_dir()/evacuations/<id>.json`, rewritten whole
(temporary file, fsync, rename) at every change of a guest:

    {"v": 1, "id", "host", "where" (Fleet.where()), "created", "updated", "options",
     "plan" (EvacPlan.to_json() of the latest plan), "excluded": {target: why},
     "guests": {vm: {"status", "target", "migrations": [id, ...], "sentence"}},
     "finished": bool, "exit": int | null}

The migrations themselves are in their journals (engine/journal.py), so `sevconsole recover`
finishes any that an interrupted evacuation left. A re-run of `evacuate HOST` takes the newest
unfinished record of HOST on the same fleet: migrations of it still in flight are followed (not
started twice), unfinished ones are recovered first, guests already moved are counted as moved.
`hold(host)` is an exclusive lock per host, held while an evacuation of it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevconsole import paths
from sevconsole.boundedio import BoundedReadError, read_text_bounded

VERSION = 1
MAX_RECORD = 16 << 20
FINAL = ("moved", "failed", "blocked", "skipped", "needs-operator", "cancelled")


class RecordError(OSError):
    """An evacuation record cannot be read or written; the sentence says which and why."""


def folder() -> Path:
    return paths.state_dir() / "evacuations"


@dataclass
class EvacRecord:
    id: str
    host: str
    where: dict[str, Any]
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    guests: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    exit: int | None = None

    @property
    def path(self) -> Path:
        return folder() / f"{self.id}.json"

    def guest(self, vm: str) -> dict[str, Any]:
        return self.guests.setdefault(vm, {"status": "waiting", "target": None, "migrations": [],
                                           "sentence": ""})

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "id": self.id, "host": self.host, "where": self.where, "created": self.created,
                "updated": self.updated, "options": self.options, "plan": self.plan,
                "excluded": self.excluded, "guests": self.guests, "finished": self.finished,
                "exit": self.exit}

    def save(self) -> None:
        self.updated = time.time()
        base = folder()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
                json.dump(self.to_json(), out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise RecordError(f"evacuation record {self.path}: cannot be written ({exc.strerror or exc})") from None


def new(host: str, where: dict[str, Any], options: dict[str, Any]) -> EvacRecord:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(20):
        record_id = f"{stamp}-{os.urandom(2).hex()}"
        if not (folder() / f"{record_id}.json").exists():
            return EvacRecord(record_id, host, where, options=options)
    raise RecordError(f"no free evacuation id under {folder()}")


def load(path: Path) -> EvacRecord:
    try:
        data = json.loads(read_text_bounded(path, MAX_RECORD, "evacuation record"))
        return EvacRecord(str(data["id"]), str(data["host"]), dict(data["where"]), float(data["created"]),
                          float(data.get("updated", 0.0)), dict(data.get("options") or {}), data.get("plan"),
                          {str(k): str(v) for k, v in (data.get("excluded") or {}).items()},
                          {str(k): dict(v) for k, v in (data.get("guests") or {}).items()},
                          bool(data.get("finished")), data.get("exit"))
    except BoundedReadError as exc:
        raise RecordError(str(exc)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordError(f"evacuation record {path}: not a record ({exc})") from None


def records() -> list[EvacRecord]:
    """Every readable record, newest first (an unreadable one is skipped: it is never acted on)."""
    try:
        found = sorted((p for p in folder().glob("*.json")), reverse=True)
    except OSError:
        return []
    out = []
    for path in found:
        with contextlib.suppress(RecordError):
            out.append(load(path))
    return out


def unfinished(host: str, where: dict[str, Any]) -> EvacRecord | None:
    """The newest unfinished evacuation of `host` on this fleet, if any."""
    return next((r for r in records() if r.host == host and r.where == where and not r.finished), None)


@contextlib.contextmanager
def hold(host: str) -> Iterator[bool]:
    """An exclusive lock for evacuating `host`; yields False when another evacuation holds it."""
    base = folder()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = hashlib.sha256(host.encode()).hexdigest()[:16]  # any host name, a plain file name
    fd = os.open(base / f"host-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
