"""The audit log: one JSON line per migration attempt, each carrying the SHA-256 of the line before.

Editing or removing a line breaks the chain at the next line; a small head file beside the log
(line count and hash of the last line) catches an edited or removed last line. The log is
append-only under an exclusive lock, so two consoles never interleave lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sevconsole.engine.checks import Check
from sevconsole.engine.plan import MigrationPlan

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditVerdict:
    ok: bool
    lines: int
    line: int | None = None  # 1-based line number of the first problem
    reason: str = ""

    def sentence(self, path: Path) -> str:
        if self.ok:
            return f"{path}: {self.lines} lines, hash chain intact"
        return f"{path}: line {self.line}: {self.reason}"


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def head_file(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def operator_name() -> str:
    try:
        return os.environ.get("SEVCONSOLE_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def build_record(plan: MigrationPlan, checks: Sequence[Check], outcome: Any,
                 operator: str | None = None) -> dict[str, Any]:
    """The fields of one line (without seq/prev, which `append` adds). `outcome` is an Outcome."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "operator": operator or operator_name(),
        "source": plan.source.name,
        "target": plan.target.name,
        "vm": plan.vm.name,
        "policy": None if plan.vm.policy is None else f"0x{plan.vm.policy:08x}",
        "sev": plan.sev,
        **_target_fingerprints(plan),
        "checks": [{"key": c.key, "status": c.status.value} for c in checks],
        "outcome": outcome.result,
        "message": outcome.message,
        "runnable": list(outcome.runnable),
        "bytes": outcome.bytes_transferred,
        "duration_s": round(outcome.duration_s, 3),
    }


def _target_fingerprints(plan: MigrationPlan) -> dict[str, str | None]:
    from sevconsole.sev.certs import SevCert, split_platform_chain
    from sevconsole.sev.errors import SevFormatError

    caps = plan.target.capabilities
    pdh = pek = None
    if caps is not None:
        with contextlib.suppress(SevFormatError, ValueError):
            pdh = SevCert.from_bytes(caps.pdh, "pdh.cert").fingerprint()
        with contextlib.suppress(SevFormatError, ValueError):
            pek = split_platform_chain(caps.cert_chain)[0].fingerprint()
    return {"target_pdh_sha256": pdh, "target_pek_sha256": pek}


def record(plan: MigrationPlan, checks: Sequence[Check], outcome: Any, path: Path | None = None,
           operator: str | None = None) -> dict[str, Any]:
    """Append the line for one migration attempt (refusals included) to `path` or the console's log."""
    from sevconsole.paths import audit_log_file

    return append(path or audit_log_file(), build_record(plan, checks, outcome, operator))


def append(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append `record` with its sequence number and the previous line's hash; returns the line's dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        try:
            log.seek(0)
            lines = log.read().splitlines()
            prev = line_hash(lines[-1]) if lines else GENESIS
            entry = {"seq": len(lines) + 1, "prev": prev, **record}
            text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
            log.seek(0, os.SEEK_END)
            log.write(text + "\n")
            log.flush()
            os.fsync(log.fileno())
            _write_head(path, len(lines) + 1, line_hash(text))
        finally:
            fcntl.flock(log, fcntl.LOCK_UN)
    return entry


def _write_head(path: Path, count: int, last: str) -> None:
    head = head_file(path)
    tmp = head.with_name(head.name + ".tmp")
    tmp.write_text(json.dumps({"lines": count, "last": last}) + "\n", encoding="utf-8")
    os.replace(tmp, head)


def verify(path: Path) -> AuditVerdict:
    """Walk the chain; the first broken link names its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return AuditVerdict(True, 0) if not head_file(path).exists() else \
            AuditVerdict(False, 0, 1, "the log is missing but its head file says it had lines")
    except (OSError, UnicodeDecodeError) as exc:
        return AuditVerdict(False, 0, 1, f"cannot be read: {exc}")
    lines = text.splitlines()
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return AuditVerdict(False, len(lines), number, "not valid JSON (edited)")
        if not isinstance(entry, dict):
            return AuditVerdict(False, len(lines), number, "not a JSON object (edited)")
        if entry.get("prev") != prev:
            seq = entry.get("seq")
            if isinstance(seq, int) and seq > number:
                return AuditVerdict(False, len(lines), number,
                                    f"{seq - number} line(s) removed before it (it carries seq {seq})")
            if number == 1:
                return AuditVerdict(False, len(lines), 1, "edited (the first line must carry the zero hash)")
            return AuditVerdict(False, len(lines), number - 1,
                                f"edited: its hash no longer matches the one line {number} recorded")
        if entry.get("seq") != number:
            return AuditVerdict(False, len(lines), number, f"carries seq {entry.get('seq')} (edited)")
        prev = line_hash(line)
    return _check_head(path, lines, prev)


def _check_head(path: Path, lines: list[str], last: str) -> AuditVerdict:
    try:
        head = json.loads(head_file(path).read_text(encoding="utf-8"))
        count, head_last = int(head["lines"]), str(head["last"])
    except FileNotFoundError:
        if lines:
            return AuditVerdict(False, len(lines), len(lines), "the head file is missing")
        return AuditVerdict(True, 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return AuditVerdict(False, len(lines), len(lines) or 1, f"the head file cannot be read: {exc}")
    if count > len(lines):
        return AuditVerdict(False, len(lines), len(lines) + 1,
                            f"missing: the log had {count} lines, {count - len(lines)} removed from its end")
    if count < len(lines):
        return AuditVerdict(False, len(lines), count + 1, "appended without the audit writer")
    if lines and head_last != last:
        return AuditVerdict(False, len(lines), len(lines), "the last line was edited")
    return AuditVerdict(True, len(lines))
