"""Cordons: hosts that are never offered or chosen as a migration target.

An operator cordons a host before updating its SEV firmware or kernel (`sevconsole cordon`,
and `sevconsole evacuate` does it first); the preflight then refuses it as a target (check
key `cordon`) until `sevconsole uncordon`. The list lives in `paths.state_dir()/cordons.json`:

    {"version": 1, "hosts": {"lab-2": {"since": 1700000000.0, "reason": "...", "by": "alice"}}}

Writers take an exclusive flock on `cordons.lock` and replace the file whole (temporary file,
fsync, rename), so two evacuations or a cordon command at the same time never lose an entry and
a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevconsole import paths
from sevconsole.boundedio import CONFIG_LIMIT, BoundedReadError, read_text_bounded

VERSION = 1
MAX_REASON = 200


class CordonError(OSError):
    """The cordon list cannot be read or written; the sentence says which file and why."""


@dataclass(frozen=True)
class Cordon:
    host: str
    since: float  # epoch seconds
    reason: str = ""
    by: str = ""

    @property
    def since_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.since))

    def sentence(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.host} is cordoned since {self.since_text}{why}; it is never chosen as a target "
                f"(`sevconsole uncordon {self.host}`)")

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "since": self.since, "reason": self.reason, "by": self.by}


def file() -> Path:
    return paths.state_dir() / "cordons.json"


def load() -> dict[str, Cordon]:
    """Every cordon, by host name. A missing file is an empty list; a bad one a CordonError."""
    where = file()
    try:
        text = read_text_bounded(where, CONFIG_LIMIT, "cordon list")
    except BoundedReadError as exc:
        if exc.missing:
            return {}
        raise CordonError(f"{exc}; fix or remove it (`sevconsole cordon` rewrites it)") from None
    try:
        data = json.loads(text)
        hosts = data["hosts"]
        if not isinstance(hosts, dict):
            raise TypeError("hosts is not an object")
        return {str(name): Cordon(str(name), float(entry["since"]), str(entry.get("reason", ""))[:MAX_REASON],
                                  str(entry.get("by", "")))
                for name, entry in hosts.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CordonError(f"cordon list {where}: not a cordon list ({exc}); fix or remove it") from None


def lookup(host: str) -> Cordon | None:
    return load().get(host)


def cordon(host: str, reason: str = "", by: str = "") -> tuple[Cordon, bool]:
    """Cordons `host`; returns its cordon and whether it is new (an existing one keeps its time
    and reason: the host has been out of service since then)."""
    with _locked():
        current = load()
        if host in current:
            return current[host], False
        entry = Cordon(host, time.time(), reason[:MAX_REASON], by)
        current[host] = entry
        _write(current)
        return entry, True


def uncordon(host: str) -> Cordon | None:
    """Lifts the cordon of `host`; returns the one lifted, or None when it had none."""
    with _locked():
        current = load()
        entry = current.pop(host, None)
        if entry is not None:
            _write(current)
        return entry


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    base = paths.state_dir()
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(base / "cordons.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CordonError(f"cordon list {file()}: cannot be written ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(cordons: dict[str, Cordon]) -> None:
    where = file()
    data = {"version": VERSION, "hosts": {c.host: {"since": c.since, "reason": c.reason, "by": c.by}
                                          for c in sorted(cordons.values(), key=lambda c: c.host)}}
    tmp = where.with_name(where.name + ".tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, where)
    except OSError as exc:
        raise CordonError(f"cordon list {where}: cannot be written ({exc.strerror or exc})") from None
