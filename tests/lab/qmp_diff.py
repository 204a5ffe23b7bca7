"""Differential QMP: the same script against a real QEMU 7.2 and a lab VM, answers compared.

`Raw` is a byte-level QMP connection: `request(data)` sends anything (malformed JSON included)
followed by a sync marker, and returns every message QEMU sent before the marker's answer, so
the number of answers a bad text earns is compared too, with no sleeping. `normal` replaces what
legitimately differs (timestamps, ports, sizes, times, the package string) by placeholders and
keeps the shape. `diff` lists the steps whose transcripts differ.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sevconsole.lab.qjson import Streamer

QEMU = shutil.which("qemu-system-x86_64")
TIMEOUT_S = 20.0
# Values that differ between two QEMUs as much as between QEMU and the lab: placeholders.
VOLATILE = {"timestamp", "package", "port", "setup-time", "total-time", "downtime", "expected-downtime",
            "base-memory", "path", "start-time", "calc-time", "dirty-rate", "transferred", "remaining", "total",
            "duplicate", "skipped", "normal", "normal-bytes", "dirty-pages-rate", "mbps",
            "dirty-sync-count", "pages-per-second", "precopy-bytes", "downtime-bytes", "multifd-bytes",
            "postcopy-bytes", "postcopy-requests", "dirty-sync-missed-zero-copy"}


def need_qemu() -> str:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed: the lab cannot be compared with QEMU 7.2 here")
    return QEMU


@contextmanager
def qemu(folder: Path, name: str, *extra: str) -> Iterator[str]:
    """A real QEMU (TCG, 16 MiB, nothing attached) with its QMP socket; yields the socket path."""
    binary = need_qemu()
    path = folder / f"{name}.qmp"
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([binary, "-machine", "q35,accel=tcg", "-m", "16", "-nodefaults", "-display", "none",
                             "-name", "plain", "-qmp", f"unix:{path},server=on,wait=off", *extra],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not path.exists():  # QEMU binds its socket during start-up
            assert proc.poll() is None, (folder / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "QEMU made no QMP socket"
            time.sleep(0.01)
        yield str(path)
    finally:
        proc.kill()
        proc.wait()
        log.close()


class Raw:
    """A byte-level QMP client of one monitor."""

    def __init__(self, path: str, *, greet: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.marks = 0
        self.greeting = self.read() if greet else None

    def read(self) -> Any:
        line = self.file.readline()
        if not line:
            return "<EOF>"
        assert line.endswith(b"\r\n"), line
        [parsed] = Streamer().feed(line)  # QEMU's own reader: an echoed id may nest 1024 deep
        assert parsed.error is None, (parsed.error, line[:200])
        return parsed.value

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(json.dumps(data).encode() if isinstance(data, dict) else data)

    def request(self, data: bytes | dict) -> list[Any]:
        """Everything answered to `data`, events included, up to a sync marker's answer."""
        self.marks += 1
        mark = f"sync-{self.marks}"
        self.send(data)
        self.send(b"\n" + json.dumps({"execute": "query-status", "id": mark}).encode())
        out = []
        while True:
            msg = self.read()
            assert msg != "<EOF>", f"the monitor closed after {data!r}: {out}"
            if isinstance(msg, dict) and msg.get("id") == mark:
                return out
            out.append(msg)

    def until(self, done: Callable[[Any], bool]) -> list[Any]:
        """Messages up to and including the first for which `done` holds (events of a migration)."""
        out = []
        while True:
            msg = self.read()
            out.append(msg)
            if msg == "<EOF>" or done(msg):
                return out

    def close(self) -> None:
        self.file.close()  # the file holds the socket open until it is closed too
        self.sock.close()


def event(name: str, status: str | None = None) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, dict) and m.get("event") == name and (
        status is None or m.get("data", {}).get("status") == status)


def normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("*" if k in VOLATILE else normal(v)) for k, v in value.items()
                if k not in ("sev-pdh", "sev-plat-cert", "sev-amd-cert")}  # the series' extension
    if isinstance(value, list):
        return [normal(v) for v in value]
    return value


@dataclass
class Step:
    label: str
    qemu: list[Any]
    lab: list[Any]


def diff(steps: Iterable[Step]) -> list[str]:
    out = []
    for step in steps:
        q, lab = normal(step.qemu), normal(step.lab)
        if q != lab:
            out.append(f"{step.label}\n    qemu: {json.dumps(q)}\n    lab:  {json.dumps(lab)}")
    return out


def both(qemu_side: Raw, lab_side: Raw, label: str, data: bytes | dict) -> Step:
    return Step(label, qemu_side.request(data), lab_side.request(data))

